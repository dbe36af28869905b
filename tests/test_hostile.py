"""The adversarial suite (issue 10): every class of hostile input of `hostile.py` against the decoder, the real
`catdog serve`, the `catdog predict` command and the model bundle. The rules it holds them to:

- the decoder raises an `ImageError` subclass for anything it refuses (never `cv2.error` or another type), decodes
  the valid photos (however much metadata they carry) into a small uint8 BGR array, within a known memory ceiling;
- the service answers 4xx to what a client sends (200 for a valid photo, 503 under overload), never 5xx, stays alive,
  fails a bad file of a batch alone, counts a client that hangs up as 499, cuts off a request head that is late or too
  large and a body that is too slow, serves good requests beside 1,000 stalled connections, counts every connection it
  drops, and its problem details carry no exception text and no paths;
- `catdog predict` writes an error line for each unusable path (FIFO, device, hostile file) and goes on;
- a damaged bundle is refused with `BundleError`: `catdog predict` exits 2, the service stays up and not ready.
"""
import asyncio
import base64
import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from catdog_nb.data import ImageError, ImageTooLargeError, decode_image
from hostile import INTERESTING, MUTATIONS, ROWS, base_images, hostile_bytes, large_jpeg, misleading_jpeg, mutated, zeros_png
from servers import free_port, log_tail, running, stop

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROBLEM = "application/problem+json"
DECODED_PIXELS_BOUND = 1040 ** 2  # decode_image shrinks what it decodes to this (twice the 520 px target, squared)
MIB = 1024 * 1024

pytestmark = pytest.mark.timeout(900)

EXPECTED_STATUS = {"too_large": {413}, "refused": {400, 413}, "valid": {200}, "either": {200, 400, 413}}
# what a problem detail must not carry: exception text, class names, source paths, library internals
INTERNALS = re.compile(r"Traceback|\b[A-Za-z_]*(Error|Exception)\b|OpenCV|cv2|lightgbm|onnx|(/[\w.@-]+){2,}"
                       r"|line \d+ column \d+|\(char \d+\)|\.py\b")


def assert_clean_problem(r: httpx.Response, statuses: set[int]) -> dict:
    assert r.status_code in statuses, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith(PROBLEM), r.headers
    body = r.json()
    assert body["status"] == r.status_code and body["title"] and body["detail"], body
    assert not INTERNALS.search(json.dumps(body)), body
    return body


# --- (a) the decoder ----------------------------------------------------------------------------------------------

def check_decoded(image) -> None:
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[0] * image.shape[1] <= DECODED_PIXELS_BOUND, image.shape


@pytest.mark.parametrize("name", ROWS)
def test_decoder_refuses_with_a_typed_error_or_decodes(name):
    data, expected = hostile_bytes(name), ROWS[name][1]
    try: image = decode_image(data)
    except ImageError as e:
        assert expected != "valid", f"a valid image refused: {type(e).__name__}: {e}"
        if expected == "too_large": assert isinstance(e, ImageTooLargeError), f"{type(e).__name__}: {e}"
        assert e.reason and not INTERNALS.search(str(e)), str(e)
        return
    assert expected in ("valid", "either"), f"decoded {image.shape} from a hostile input"
    check_decoded(image)


@pytest.mark.parametrize("channels, depth", [(4, 8), (4, 16), (2, 8), (2, 16)])
def test_transparent_pixels_are_composited_on_white(channels, depth):
    image = decode_image(zeros_png(300, 200, channels=channels, depth=depth))  # all pixels fully transparent
    assert image.shape == (200, 300, 3) and image.min() == 255


@pytest.fixture(scope="module")
def seeds(training_photos) -> list[bytes]:
    "Real photos in every accepted format: JPEG (baseline, progressive), PNG (RGB, RGBA, 16-bit), WebP, BMP."
    seeds = base_images(training_photos[:2])
    assert [name.rstrip("01") for name in seeds][:len(SEED_FORMATS)] == list(SEED_FORMATS)
    return list(seeds.values())


SEED_FORMATS = ("jpeg", "jpeg_progressive", "png", "png_rgba", "png16_", "webp", "webp_lossless", "bmp")
EDIT = st.tuples(st.sampled_from(MUTATIONS), st.integers(0, 63) | st.integers(0, 511), st.integers(0, 1023))
WIDE_BMP_EDITS = [("le32", 18, INTERESTING.index((1 << 20) + 1)), ("le32", 22, INTERESTING.index(2))]


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2 * len(SEED_FORMATS) - 1), edits=st.lists(EDIT, min_size=1, max_size=6))
@example(seed=SEED_FORMATS.index("bmp"), edits=WIDE_BMP_EDITS)  # a width over OpenCV's limit, few pixels
def test_mutated_headers_give_an_image_error_or_an_image(seeds, seed, edits):
    try: image = decode_image(mutated(seeds[seed], edits))
    except ImageError: return
    check_decoded(image)


PEAK_PROBE = r"""
import sys
from catdog_nb.data import decode_image, ImageError
def hwm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
data = open(sys.argv[1], "rb").read()
decode_image(open(sys.argv[2], "rb").read())  # warm up the decoders on a small photo
before = hwm()
try: decode_image(data)
except ImageError: pass
print(hwm() - before)
"""


CEILING_ROWS = {  # what one decode may add to the resident memory, per pixel of the default limit (40 MP)
    "legal_36mp_jpeg": (lambda: large_jpeg(7360, 4912, quality=30), 0.5),  # decoded at 1/8 scale
    "legal_36mp_progressive_jpeg": (lambda: large_jpeg(7360, 4912, quality=30, progressive=True), 4),  # coefficients
    "misleading_100mp_jpeg": (lambda: misleading_jpeg(10_000, 10_000), 0.1),
    "rgb16_png_39mp": (lambda: zeros_png(6300, 6300, channels=3, depth=16), 6),
    "rgba_png_39mp": (lambda: zeros_png(6300, 6300, channels=4), 6),
    "rgba16_png_39mp": (lambda: zeros_png(6300, 6300, channels=4, depth=16), 6),
    "rgba_png_25mp": (lambda: zeros_png(5000, 5000, channels=4), 6),
    "rgba16_png_14mp": (lambda: zeros_png(3800, 3800, channels=4, depth=16), 6),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", CEILING_ROWS)
def test_decoding_memory_has_a_known_ceiling(name, training_photos, tmp_path):
    "Peak resident growth of one decode (fresh process): JPEGs are decoded at reduced scale, other formats in uint8."
    make, bytes_per_pixel = CEILING_ROWS[name]
    blob = tmp_path / "image"
    blob.write_bytes(make())
    run = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(blob), str(training_photos[0])],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.split()[-1])
    assert peak <= bytes_per_pixel * 40_000_000 + 16 * MIB, f"{name}: +{peak / MIB:.0f} MiB"


CAP_PROBE = r"""
import importlib, os, sys
seen = {}
class WatchCv2:
    "Records the environment at the moment cv2 is first imported."
    def find_spec(self, name, path=None, target=None):
        if name == "cv2": seen.setdefault("cap", os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS"))
sys.meta_path.insert(0, WatchCv2())
importlib.import_module(sys.argv[1])
import cv2, numpy as np
png = cv2.imencode(".png", np.zeros((100, 100, 3), np.uint8))[1]
try: cv2.imdecode(png, cv2.IMREAD_COLOR); refused = False
except cv2.error: refused = True
print(seen.get("cap"), refused)
"""


def cv2_importers() -> list[str]:
    "The catdog modules that import cv2 themselves: any other one gets cv2 through one of them."
    import catdog_nb
    return sorted(f"catdog_nb.{p.stem}" for p in Path(catdog_nb.__file__).parent.glob("*.py")
                  if re.search(r"^import cv2\b", p.read_text(), re.M))


@pytest.mark.slow
@pytest.mark.parametrize("module", cv2_importers())
def test_opencv_pixel_cap_is_set_before_cv2_loads(module):
    "Each catdog module that loads cv2 sets OpenCV's own decode limit from CATDOG_MAX_PIXELS first (read once, at load)."
    env = {**os.environ, "CATDOG_MAX_PIXELS": "5000"}
    env.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
    run = subprocess.run([sys.executable, "-c", CAP_PROBE, module], env=env, capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["5000", "True"], run.stdout


# --- (b) the service ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


def assert_alive(server) -> None:
    assert server["process"].poll() is None, f"catdog serve died:\n{log_tail(server['log'])}"
    assert httpx.get(f"{server['url']}/health", timeout=30).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_service_answers_each_hostile_row_with_4xx(client, server, name):
    data, expected = hostile_bytes(name), ROWS[name][1]
    r = client.post("/predict", content=data, headers={"content-type": "application/octet-stream"})
    if r.status_code == 200: assert expected in ("valid", "either") and r.json()["label"] in ("cat", "dog"), r.text
    else: assert_clean_problem(r, EXPECTED_STATUS[expected])
    assert_alive(server)


@pytest.mark.slow
@pytest.mark.parametrize("name", ROWS)
def test_a_hostile_file_fails_alone_in_a_batch(client, server, photo, name):
    data, expected = hostile_bytes(name), ROWS[name][1]
    files = [("files", ("first.jpg", photo, "image/jpeg")), ("files", (f"{name}.bin", data, "application/octet-stream")),
             ("files", ("last.jpg", photo, "image/jpeg"))]
    r = client.post("/predict/batch", files=files)
    assert r.status_code == 200, r.text[:500]
    first, hostile, last = r.json()["results"]
    assert first["label"] and last["label"] and first["probability"] == last["probability"]
    assert hostile["filename"] == f"{name}.bin"
    if hostile.get("error"):
        assert hostile["error"]["status"] in EXPECTED_STATUS[expected] - {200}, hostile
        assert not INTERNALS.search(json.dumps(hostile["error"])), hostile
    else: assert expected in ("valid", "either") and hostile["label"], hostile
    assert_alive(server)


def server_peak_mib(pid: int) -> float:
    "VmHWM (peak resident memory) of process `pid`, in MiB."
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


@pytest.mark.slow
def test_overload_of_large_legal_photos_is_bounded(server):
    "24 concurrent legal 36 MP JPEGs at the default settings: 200 or 503 with Retry-After, peak memory under 1 GiB."
    big = large_jpeg(7360, 4912, quality=30)
    async def send_all():
        limits = httpx.Limits(max_connections=24, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server["url"], timeout=300, limits=limits) as c:
            return await asyncio.gather(*(c.post("/predict", content=big, headers={"content-type": "image/jpeg"})
                                          for _ in range(24)))
    answers = asyncio.run(send_all())
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 503} and 200 in statuses, statuses
    for r in answers:
        if r.status_code == 503: assert int(r.headers["retry-after"]) > 0; assert_clean_problem(r, {503})
    assert_alive(server)
    peak = server_peak_mib(server["process"].pid)
    print(f"statuses {sorted(statuses)}, peak resident memory of the worker {peak:.0f} MiB")
    assert peak < 1024, f"peak resident memory {peak:.0f} MiB"


def metric_value(url: str, name: str, **labels) -> float:
    "Sum of the samples of `name` whose labels include `labels` (a value starting with `~` is a regex)."
    from prometheus_client.parser import text_string_to_metric_families
    total = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in family.samples:
            if s.name != name: continue
            if all(re.fullmatch(v[1:], s.labels.get(k, "")) if v.startswith("~") else s.labels.get(k) == v
                   for k, v in labels.items()):
                total += s.value
    return total


@pytest.mark.slow
def test_client_gone_mid_upload_counts_as_499_not_5xx(server, photo):
    url = server["url"]
    errors, gone = metric_value(url, "catdog_requests_total", status="~5.."), metric_value(url, "catdog_requests_total", status="499")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server["port"]), timeout=10) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                      + f"Content-Length: {10 * len(photo)}\r\n\r\n".encode() + photo[:1000])
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and metric_value(url, "catdog_requests_total", status="499") < gone + 3:
        time.sleep(0.2)
    assert metric_value(url, "catdog_requests_total", status="~5..") == errors
    assert metric_value(url, "catdog_requests_total", status="499", route="/predict") >= 3
    assert_alive(server)


def exception_text(parse, *args) -> str:
    "The message of the exception `parse(*args)` raises: what a problem detail must not repeat."
    try: parse(*args)
    except Exception as e: return str(e)
    raise AssertionError("expected an exception")


BAD_BODIES = {  # name -> (body, content type, the library's exception text for it, or None)
    "json_cut": (b'{"image": ', "application/json", exception_text(json.loads, b'{"image": ')),
    "json_deep": (b"[" * 100_000, "application/json", exception_text(json.loads, b"[" * 100_000)),
    "base64_bad": (b'{"image": "@@@="}', "application/json", exception_text(base64.b64decode, "@@@=", None, True)),
    "base64_length": (b'{"image": "' + b"A" * 4097 + b'"}', "application/json",
                      exception_text(base64.b64decode, "A" * 4097, None, True)),
    "multipart_cut": (b"--x\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                      "multipart/form-data; boundary=x", None),
    "multipart_no_boundary": (b"garbage", "multipart/form-data", None),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_BODIES)
def test_problem_details_carry_no_exception_text(client, name):
    body, content_type, leaked = BAD_BODIES[name]
    problem = assert_clean_problem(client.post("/predict", content=body, headers={"content-type": content_type}),
                                   {400, 413, 415, 422})
    if leaked: assert leaked not in problem["detail"], problem


@pytest.fixture(scope="module")
def strict_server(model_bundle, tmp_path_factory):
    "`catdog serve` with a 2 s request deadline, for the slow-client rows."
    tmp = tmp_path_factory.mktemp("strict")
    port = free_port()
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle), "CATDOG_REQUEST_TIMEOUT_S": "2"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp / "server.log", timeout=180) as proc:
        yield {"url": f"http://127.0.0.1:{port}", "port": port, "process": proc, "log": tmp / "server.log"}


def answer_or_close(sock: socket.socket, wait_s: float) -> bytes:
    "What the server sends before it closes the connection, waiting at most `wait_s` (b'' when it just closes)."
    sock.settimeout(wait_s)
    received = b""
    try:
        while chunk := sock.recv(65536): received += chunk
    except TimeoutError: pytest.fail(f"the server held a stalled connection for {wait_s:.0f} s (received {received[:200]!r})")
    except ConnectionResetError: pass
    return received


@pytest.mark.slow
def test_a_client_that_never_finishes_its_headers_is_cut_off(strict_server):
    with socket.create_connection(("127.0.0.1", strict_server["port"])) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n")
        answer = answer_or_close(s, 10)
    assert answer == b"" or answer.startswith((b"HTTP/1.1 408 ", b"HTTP/1.1 400 ")), answer[:300]
    assert_alive(strict_server)


@pytest.mark.slow
def test_a_client_that_stalls_in_its_body_gets_408(strict_server, photo):
    url = strict_server["url"]
    errors = metric_value(url, "catdog_requests_total", status="~5..")
    with socket.create_connection(("127.0.0.1", strict_server["port"])) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  + f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo[:100])
        answer = answer_or_close(s, 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert metric_value(url, "catdog_requests_total", status="~5..") == errors
    assert_alive(strict_server)


@pytest.mark.slow
@pytest.mark.parametrize("head", [b"GET /" + b"a" * (8 << 20), b"GET / HTTP/1.1\r\nX-Pad: " + b"a" * (8 << 20),
                                  b"GET / HTTP/1.1\r\n" + b"X-Pad: a\r\n" * (1 << 20)], ids=["url", "header", "many headers"])
def test_a_request_head_over_the_limit_gets_431_at_once(server, head):
    "A head sent fast but never finished is cut off at MAX_HEAD_BYTES, not at the head deadline: memory and event-loop time stay bounded."
    from catdog_nb.server import MAX_HEAD_BYTES
    before = metric_value(server["url"], "catdog_connections_dropped_total", reason="head_too_large")
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        try:
            for i in range(0, len(head), 1 << 16): s.sendall(head[i:i + (1 << 16)])
        except OSError: pass  # the server answered and closed
        answer = answer_or_close(s, 10)
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b"", answer[:200]  # b"": the reset came before the answer
    assert time.monotonic() - start < 3
    assert metric_value(server["url"], "catdog_connections_dropped_total", reason="head_too_large") == before + 1
    assert_alive(server)


@pytest.mark.slow
def test_a_kept_alive_connection_whose_next_head_never_ends_is_cut_off(server, photo):
    "After a good answer on a kept-alive connection, a next head sent a byte at a time meets the head deadline too."
    before = metric_value(server["url"], "catdog_connections_dropped_total", reason="header_timeout")
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  + f"Content-Length: {len(photo)}\r\n\r\n".encode() + photo)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        start, closed = time.monotonic(), False
        for byte in b"\r\nGET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 20:
            try: s.sendall(bytes([byte]))
            except OSError: closed = True; break
            s.settimeout(0.5)
            try:
                if s.recv(4096) == b"": closed = True; break
            except TimeoutError: pass
    assert closed and time.monotonic() - start < 10, time.monotonic() - start
    assert metric_value(server["url"], "catdog_connections_dropped_total", reason="header_timeout") == before + 1
    assert_alive(server)


@pytest.mark.slow
def test_a_body_answered_early_is_no_request_head(server):
    "The rest of a body the app answered without reading (404 here) is not taken for an oversized head: one answer only."
    before = metric_value(server["url"], "catdog_connections_dropped_total", reason="head_too_large")
    body = b"x" * (200 << 10)
    with socket.create_connection(("127.0.0.1", server["port"])) as s:
        s.sendall(b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                  + f"Content-Length: {len(body)}\r\n\r\n".encode())
        with contextlib.suppress(OSError):
            for i in range(0, len(body), 4096): s.sendall(body[i:i + 4096])
        answer = answer_or_close(s, 10)
    assert answer.startswith(b"HTTP/1.1 404 ") and answer.count(b"HTTP/1.1 ") == 1, answer[:300]
    assert metric_value(server["url"], "catdog_connections_dropped_total", reason="head_too_large") == before
    assert_alive(server)


@pytest.fixture(scope="module")
def few_files_server(model_bundle, tmp_path_factory):
    "`catdog serve` under a hard limit of 400 open files: its connection cap is 400 - FILES_RESERVE."
    tmp, port = tmp_path_factory.mktemp("few-files"), free_port()
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    limit = lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400))
    with open(tmp / "server.log", "wb") as out:
        proc = subprocess.Popen([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, preexec_fn=limit, start_new_session=True)
    server = {"url": f"http://127.0.0.1:{port}", "port": port, "process": proc, "log": tmp / "server.log"}
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_tail(tmp / "server.log")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{server['url']}/ready", timeout=2).status_code == 200: break
            time.sleep(0.25)
        yield server
    finally:
        stop(proc)


@pytest.mark.slow
def test_connections_over_the_cap_get_503_at_once_and_are_counted(few_files_server):
    from catdog_nb.server import FILES_RESERVE
    url, cap = few_files_server["url"], 400 - FILES_RESERVE
    before = metric_value(url, "catdog_connections_dropped_total", reason="connection_limit")
    held, answers = [], []
    try:
        for _ in range(cap + 20):
            s = socket.create_connection(("127.0.0.1", few_files_server["port"]))
            held.append(s)
        for s in held[-20:]:
            s.settimeout(5)
            answers.append(s.recv(4096).split(b"\r\n")[0])
    finally:
        for s in held: s.close()
    assert answers == [b"HTTP/1.1 503 Service Unavailable"] * 20, answers
    assert metric_value(url, "catdog_connections_dropped_total", reason="connection_limit") - before >= 20
    assert_alive(few_files_server)


def pod_memory_limit_mib() -> float:
    "The memory limit of the service's container in k8s/deployment.yaml, in MiB."
    import yaml
    (c,) = yaml.safe_load((ROOT / "k8s" / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", c["resources"]["limits"]["memory"]).groups()
    return int(number) * (1024 if unit == "Gi" else 1)


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


async def hold_stalled(port: int, head: bytes, until: float, trickle: bool) -> int:
    "Keep one connection that sent `head` (then 1 byte a second when `trickle`) open until `until`, reopening it as the server drops it; how many times it was dropped."
    dropped = 0
    while time.monotonic() < until:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head); await writer.drain()
            while time.monotonic() < until:
                try:
                    await asyncio.wait_for(reader.read(4096), 1.0)  # an answer (408), or b"": the server closed it
                    break
                except TimeoutError:
                    if trickle: writer.write(b"x"); await writer.drain()
            else: writer.close(); return dropped
            dropped += 1; writer.close()
        except OSError: dropped += 1; await asyncio.sleep(0.1)
    return dropped


@pytest.mark.slow
def test_1000_stalled_connections_cost_good_requests_nothing(server, photo):
    """500 connections that send half a request line and 500 that trickle a body at 1 byte/s, each reopened as soon as
    the server drops it, for 12 s (two header deadlines): every good request sent meanwhile is answered 200 within 1 s,
    the server stays under the pod's memory limit, and each drop is counted in /metrics."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # 1,000 sockets here
    url, pid, port = server["url"], server["process"].pid, server["port"]
    before = {"heads": metric_value(url, "catdog_connections_dropped_total", reason="header_timeout"),
              "bodies": metric_value(url, "catdog_requests_total", status="408")}
    half_line = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty"
    body_head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\nx"

    async def run():
        until = time.monotonic() + 12
        holders = [asyncio.create_task(hold_stalled(port, half_line if i % 2 else body_head, until, trickle=i % 2 == 0))
                   for i in range(1000)]
        await asyncio.sleep(2)  # all open
        good, peak = [], rss_mib(pid)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            while time.monotonic() < until - 0.5:
                start = time.monotonic()
                r = await client.post("/predict", content=photo, headers={"content-type": "image/jpeg"})
                good.append((r.status_code, time.monotonic() - start))
                peak = max(peak, rss_mib(pid))
                await asyncio.sleep(0.2)
        return good, peak, await asyncio.gather(*holders)

    good, peak, drops = asyncio.run(run())
    slowest = max(seconds for _, seconds in good)
    print(f"{len(good)} good requests, slowest {slowest * 1000:.0f} ms; server peak {peak:.0f} MiB; {sum(drops)} drops")
    assert len(good) >= 20 and {status for status, _ in good} == {200} and slowest < 1.0, good
    assert peak < pod_memory_limit_mib(), peak
    assert metric_value(url, "catdog_connections_dropped_total", reason="header_timeout") - before["heads"] >= 500
    assert metric_value(url, "catdog_requests_total", status="408") - before["bodies"] >= 500
    assert_alive(server)


@pytest.mark.slow
def test_schemathesis_all_checks_coverage_and_fuzzing(server, tmp_path):
    "The OpenAPI schema says what the handlers enforce: schemathesis with every check finds nothing."
    run = subprocess.run(
        [BIN / "schemathesis", "--config-file", ROOT / "schemathesis.toml", "run",
         f"{server['url']}/schema/openapi.json", "--checks", "all",
         "--phases", "coverage,fuzzing", "--max-examples", "40", "--workers", "1", "--seed", "1"],
        capture_output=True, text=True, cwd=tmp_path, timeout=800)
    assert run.returncode == 0, run.stdout[-8000:] + run.stderr[-2000:]
    assert_alive(server)


@pytest.mark.slow
def test_short_soak(model_bundle):
    "The soak benchmark, short: good and hostile requests at concurrency 16, clients hanging up; no 5xx, nothing unexpected."
    from catdog_nb.soak import bench_soak
    figures = bench_soak(model_bundle, n_requests=200, concurrency=16, warm_up=32, per_class=4)
    print({k: figures[k] for k in ("statuses", "client_5xx", "server_5xx", "good_p50_ms", "good_p99_ms", "rss_warm", "peak", "rss_end")})
    assert figures["alive"] and figures["client_5xx"] == 0 and figures["server_5xx"] == 0, figures
    assert figures["unexpected"] == [], figures["unexpected"][:10]
    assert figures["statuses"].get(200, 0) > 100 and figures["statuses"].get(400, 0) > 0, figures["statuses"]


# --- (c) catdog predict -------------------------------------------------------------------------------------------

def predict_run(bundle: Path, paths: list, timeout: float = 300, memory_limit: int | None = None):
    "`catdog predict` as a subprocess; `memory_limit` caps its address space (for inputs that could read forever)."
    def limit():
        if memory_limit: resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
    try:
        return subprocess.run([BIN / "catdog", "predict", "--model", str(bundle), *map(str, paths)],
                              capture_output=True, text=True, errors="replace", timeout=timeout, cwd=ROOT,
                              preexec_fn=limit)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"catdog predict still running after {timeout:.0f} s (blocked on a path?): {e.stdout!r}")


def json_lines(text: str) -> dict[str, dict]:
    return {line["path"]: line for line in map(json.loads, text.splitlines())}


@pytest.mark.slow
def test_cli_reports_each_unusable_path_and_goes_on(model_bundle, unseen_photos, tmp_path):
    good, other = unseen_photos[0], unseen_photos[-1]
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(other, folder / "inside.jpg")
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    hostile = {name: tmp_path / f"{name}.img" for name in ("wide_bmp", "misleading_marker_chain", "many_scans_jpeg",
                                                            "rgba16_png_14mp", "truncated_png_half")}
    for name, path in hostile.items(): path.write_bytes(hostile_bytes(name))
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    paths = [good, hostile["wide_bmp"], fifo, hostile["misleading_marker_chain"], folder, "/dev/null", empty,
             tmp_path / "missing.jpg", hostile["many_scans_jpeg"], hostile["rgba16_png_14mp"],
             hostile["truncated_png_half"], other]
    run = predict_run(model_bundle, paths)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = json_lines(run.stdout)
    for path in (good, other, folder / "inside.jpg", hostile["rgba16_png_14mp"]):
        assert lines[str(path)]["label"] in ("cat", "dog"), lines.get(str(path))
    for path in (hostile["wide_bmp"], fifo, hostile["misleading_marker_chain"], "/dev/null", empty,
                 tmp_path / "missing.jpg", hostile["many_scans_jpeg"], hostile["truncated_png_half"]):
        assert lines[str(path)]["error"], lines.get(str(path))
    assert list(lines) == [str(p) for p in [good, hostile["wide_bmp"], fifo, hostile["misleading_marker_chain"],
                                           folder / "inside.jpg", *paths[5:]]]


@pytest.mark.slow
def test_cli_does_not_read_a_device_named_on_the_command_line(model_bundle, unseen_photos):
    "/dev/zero never ends: it is refused from `stat`, not read (the address space cap makes a read fail fast)."
    run = predict_run(model_bundle, [unseen_photos[0], "/dev/zero"], timeout=120, memory_limit=4 << 30)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = json_lines(run.stdout)
    assert lines[str(unseen_photos[0])]["label"] and lines["/dev/zero"]["error"], lines


# --- (d) the bundle -----------------------------------------------------------------------------------------------

def truncate_booster(bundle: Path, keep: float) -> None:
    booster = bundle / json.loads((bundle / "bundle.json").read_text())["booster"]
    data = booster.read_bytes()
    booster.write_bytes(data[:int(len(data) * keep)])


def damage_truncated_booster(bundle: Path) -> None:
    truncate_booster(bundle, 0.5)  # LightGBM raises


def damage_booster_cut_at_90(bundle: Path) -> None:
    truncate_booster(bundle, 0.9)  # LightGBM aborts the process (SIGABRT) on a tree cut in the middle


def damage_booster_cut_at_99(bundle: Path) -> None:
    truncate_booster(bundle, 0.99)  # a segmentation fault


def damage_booster_cut_at_999(bundle: Path) -> None:
    truncate_booster(bundle, 0.999)  # loads: a different model, silently


def damage_edited_leaf(bundle: Path) -> None:
    "One digit of a leaf value changed (same length: `tree_sizes` still match): LightGBM loads a different model."
    booster = bundle / json.loads((bundle / "bundle.json").read_text())["booster"]
    text = booster.read_text()
    start = text.index("leaf_value=") + len("leaf_value=")
    digit = next(i for i in range(start, len(text)) if text[i] in "123456789")
    booster.write_text(text[:digit] + str(int(text[digit]) % 9 + 1) + text[digit + 1:])


def damage_truncated_backbone(bundle: Path) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    for file in meta["backbones"].values():
        path = bundle / file
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 3])


def damage_name_outside(bundle: Path) -> None:
    "bundle.json names a booster outside the bundle (the file exists there)."
    meta = json.loads((bundle / "bundle.json").read_text())
    shutil.copy(bundle / meta["booster"], bundle.parent / "elsewhere.txt")
    meta["booster"] = "../elsewhere.txt"
    (bundle / "bundle.json").write_text(json.dumps(meta))


def damage_absolute_name(bundle: Path) -> None:
    meta = json.loads((bundle / "bundle.json").read_text())
    meta["booster"] = str((bundle / meta["booster"]).resolve())
    (bundle / "bundle.json").write_text(json.dumps(meta))


def damage_no_checksums(bundle: Path) -> None:
    "A bundle that cannot prove itself: bundle.json without the sha256 of its files."
    meta = json.loads((bundle / "bundle.json").read_text())
    meta.pop("sha256", None)
    (bundle / "bundle.json").write_text(json.dumps(meta))


DAMAGES = {f.__name__.removeprefix("damage_"): f for f in (
    damage_truncated_booster, damage_booster_cut_at_90, damage_booster_cut_at_99, damage_booster_cut_at_999,
    damage_edited_leaf, damage_truncated_backbone, damage_name_outside, damage_absolute_name, damage_no_checksums)}

LOAD = r"""
import json, sys
from catdog_nb.predict import BundleError, Classifier
for path in sys.argv[1:]:
    try: Classifier.load(path)
    except BundleError as e: print(json.dumps([path, f"BundleError: {e}"]), flush=True)
    else: print(json.dumps([path, "loaded"]), flush=True)
"""


@pytest.fixture
def bundle_copy(model_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(model_bundle, tmp_path / "catdog"))


@pytest.fixture(scope="module")
def damaged_bundle_loads(model_bundle, tmp_path_factory) -> dict[str, str]:
    "Damage name -> what loading that damaged copy of the bundle gave, all loaded in one process (one import)."
    tmp = tmp_path_factory.mktemp("damaged")
    copies = {name: Path(shutil.copytree(model_bundle, tmp / name / "catdog")) for name in DAMAGES}
    for name, path in copies.items(): DAMAGES[name](path)
    run = subprocess.run([sys.executable, "-c", LOAD, *map(str, copies.values())], capture_output=True, text=True,
                         errors="replace", timeout=300, cwd=ROOT)  # a subprocess: LightGBM aborts on some damages
    assert run.returncode == 0, (run.returncode, run.stdout, run.stderr[-2000:])
    outcomes = dict(json.loads(line) for line in run.stdout.splitlines())
    return {name: outcomes[str(path)] for name, path in copies.items()}


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_bundle_is_refused_with_bundle_error(damaged_bundle_loads, damage):
    assert damaged_bundle_loads[damage].startswith("BundleError:"), damaged_bundle_loads[damage]


@pytest.mark.slow
def test_cli_exits_2_on_a_damaged_bundle(bundle_copy, unseen_photos):
    damage_booster_cut_at_90(bundle_copy)
    run = predict_run(bundle_copy, [unseen_photos[0]], timeout=300)
    assert run.returncode == 2, (run.returncode, run.stdout, run.stderr[-2000:])
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr[-2000:]


@pytest.mark.slow
def test_service_with_a_damaged_bundle_stays_up_and_not_ready(bundle_copy, tmp_path):
    damage_booster_cut_at_90(bundle_copy)
    port, log = free_port(), tmp_path / "server.log"
    env = {**os.environ, "CATDOG_MODEL_URI": str(bundle_copy)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
    from servers import stop
    try:
        deadline, url = time.monotonic() + 180, f"http://127.0.0.1:{port}"
        while "booster" not in log.read_text(errors="replace") and time.monotonic() < deadline:
            assert proc.poll() is None, f"catdog serve exited with {proc.returncode}:\n{log_tail(log)}"
            time.sleep(0.25)
        time.sleep(1)
        assert proc.poll() is None, f"catdog serve exited with {proc.returncode}:\n{log_tail(log)}"
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        body = assert_clean_problem(httpx.get(f"{url}/ready", timeout=30), {503})
        assert str(bundle_copy) not in json.dumps(body)
        r = httpx.post(f"{url}/predict", content=b"x", headers={"content-type": "image/jpeg"}, timeout=30)
        assert_clean_problem(r, {503})
        text = log.read_text(errors="replace")
        assert "Traceback" not in text, text[-3000:]
        assert len([line for line in text.splitlines() if " ERROR " in line]) == 1, text[-3000:]
    finally:
        stop(proc)
