"""API keys on a real `catdog serve`: keys made and revoked with the `catdog keys` command, refusals that say nothing
and take the same time whatever key was sent, a key's rate, the open routes, and the page asking for a key in
headless Chromium. With no keys file the service asks for none (tests/test_service.py runs it so)."""
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from servers import free_port, running

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROBLEM = "application/problem+json"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def keys(*args: str, keys_file: Path) -> subprocess.CompletedProcess:
    "`catdog keys ARGS` on `keys_file`, as a user runs it."
    return subprocess.run([BIN / "catdog", "keys", *args, "--file", keys_file], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def keyed(model_bundle, tmp_path_factory):
    "`catdog serve` with API keys on: `alice` (predict, 2 requests/s), `bob` (predict, no limit), `prometheus` (metrics)."
    tmp = tmp_path_factory.mktemp("keyed")
    keys_file = tmp / "keys.jsonl"
    made = {}
    for name, extra in (("alice", ["--rate", "2"]), ("bob", []), ("prometheus", ["--role", "metrics"])):
        run = keys("add", name, *extra, keys_file=keys_file)
        assert run.returncode == 0 and "shown once" in run.stderr, run.stderr
        made[name] = run.stdout.strip()
    assert oct(keys_file.stat().st_mode & 0o777) == "0o600"
    assert not any(key in keys_file.read_text() for key in made.values())  # hashes only
    port = free_port()
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle), "CATDOG_API_KEYS_FILE": str(keys_file)}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with running([BIN / "catdog", "serve", "--host", "127.0.0.1", "--port", port], env=env, cwd=ROOT,
                 ready_url=f"http://127.0.0.1:{port}/ready", log=tmp / "server.log", timeout=180):
        yield {"url": f"http://127.0.0.1:{port}", "keys": made, "file": keys_file}


def bearer(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def one_off(key: str) -> str:
    "`key` with its last character changed."
    return key[:-1] + ("A" if key[-1] != "A" else "B")


def assert_refused(r: httpx.Response) -> None:
    "401 problem+json that says nothing of the key: no detail, no reason."
    assert r.status_code == 401, r.text
    assert r.headers["content-type"].startswith(PROBLEM) and r.headers["www-authenticate"].startswith("Bearer")
    assert r.json() == {"status": 401, "title": "Unauthorized"}


def test_no_key_a_wrong_key_a_key_one_off_and_a_key_of_another_role_are_401(keyed, photo):
    url, k = keyed["url"], keyed["keys"]
    jpeg = {"content-type": "image/jpeg"}
    for headers in ({}, bearer("catdog_" + "x" * 43), bearer(one_off(k["bob"])), bearer(k["prometheus"]),
                    {"authorization": k["bob"]}, {"authorization": f"Basic {k['bob']}"}):
        assert_refused(httpx.post(f"{url}/predict", content=photo, headers=jpeg | headers))
        assert_refused(httpx.post(f"{url}/predict/batch", files={"files": ("a.jpg", photo, "image/jpeg")}, headers=headers))
    for headers in ({}, bearer(k["bob"]), bearer(one_off(k["prometheus"]))):
        assert_refused(httpx.get(f"{url}/metrics", headers=headers))
    assert httpx.post(f"{url}/predict", content=photo, headers=jpeg | bearer(k["bob"])).json()["label"] in ("cat", "dog")
    assert httpx.get(f"{url}/metrics", headers=bearer(k["prometheus"])).text.startswith("# HELP")
    for path in ("/health", "/ready", "/", "/schema/openapi.json"):
        assert httpx.get(url + path).status_code == 200, path


def test_refusals_take_the_same_time_whatever_key_is_sent(keyed):
    """Over many interleaved tries the 401s to no key, a wrong key, a key one character off and a predict key sent to
    /metrics take the same time: their medians lie within 20% (or 0.3 ms) of each other."""
    url, k = keyed["url"], keyed["keys"]
    kinds = {"no key": {}, "wrong key": bearer("catdog_" + "x" * 43), "one off": bearer(one_off(k["prometheus"])),
             "predict key": bearer(k["bob"])}
    times = {kind: [] for kind in kinds}
    with httpx.Client(base_url=url) as client:
        for _ in range(20): client.get("/metrics")  # warm the connection and the route
        for _ in range(400):
            for kind, headers in kinds.items():
                start = time.perf_counter()
                r = client.get("/metrics", headers=headers)
                times[kind].append(time.perf_counter() - start)
                assert r.status_code == 401
    medians = {kind: statistics.median(t) * 1000 for kind, t in times.items()}
    print({kind: f"{m:.3f} ms" for kind, m in medians.items()})
    spread = max(medians.values()) - min(medians.values())
    assert spread < max(0.3, 0.2 * min(medians.values())), medians


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed, photo):
    url, alice = keyed["url"], keyed["keys"]["alice"]
    time.sleep(1.5)  # a full bucket (no other test spends alice's tokens)
    jpeg = {"content-type": "image/jpeg"} | bearer(alice)
    answers = [httpx.post(f"{url}/predict", content=photo, headers=jpeg) for _ in range(4)]
    statuses = [r.status_code for r in answers]
    assert statuses[:2] == [200, 200] and 429 in statuses[2:], statuses  # 2 tokens, refilled at 2 a second
    limited = next(r for r in answers if r.status_code == 429)
    assert limited.headers["content-type"].startswith(PROBLEM) and limited.json()["reason"] == "rate_limited"
    wait = int(limited.headers["retry-after"])
    assert wait == 1  # a token comes back within half a second: rounded up to whole seconds
    time.sleep(wait)
    assert httpx.post(f"{url}/predict", content=photo, headers=jpeg).status_code == 200


def test_a_revoked_key_is_refused_without_a_restart(keyed, photo, tmp_path):
    url, keys_file = keyed["url"], keyed["file"]
    run = keys("add", "carol", keys_file=keys_file)
    carol, jpeg = run.stdout.strip(), {"content-type": "image/jpeg"}
    deadline = time.monotonic() + 10
    while httpx.post(f"{url}/predict", content=photo, headers=jpeg | bearer(carol)).status_code != 200:
        assert time.monotonic() < deadline, "a key added to the file was not picked up within 10 s"
        time.sleep(0.3)
    assert keys("revoke", "carol", keys_file=keys_file).returncode == 0
    assert "carol" not in keys("list", keys_file=keys_file).stdout
    deadline = time.monotonic() + 10
    while (r := httpx.post(f"{url}/predict", content=photo, headers=jpeg | bearer(carol))).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key was still accepted after 10 s"
        time.sleep(0.3)
    assert_refused(r)


def test_serve_refuses_a_keys_file_it_cannot_read(model_bundle, tmp_path):
    broken = tmp_path / "keys.jsonl"
    broken.write_text('{"name": "x"}\n')
    env = {**os.environ, "CATDOG_MODEL_URI": str(model_bundle), "CATDOG_API_KEYS_FILE": str(broken)}
    run = subprocess.run([BIN / "catdog", "serve", "--port", str(free_port())], env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode != 0 and "catdog serve:" in run.stderr and "line 1" in run.stderr, run.stderr


def test_the_schema_declares_the_bearer_scheme_on_the_keyed_routes_only(keyed):
    schema = httpx.get(f"{keyed['url']}/schema/openapi.json").json()
    assert schema["components"]["securitySchemes"]["apiKey"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["apiKey"]["description"]}
    secured = {(path, method) for path, item in schema["paths"].items() for method, op in item.items() if op.get("security")}
    assert secured == {("/predict", "post"), ("/predict/batch", "post"), ("/feedback", "post"), ("/metrics", "get")}


def test_the_page_asks_for_a_key_and_then_classifies(keyed, training_photos):
    from playwright.sync_api import sync_playwright
    from test_service import launch, VIEWPORT
    dog = training_photos[-1]
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            page.goto(keyed["url"] + "/")
            assert not page.is_visible("#keyform")
            page.set_input_files("#file", str(dog))
            page.wait_for_selector("#keyform", state="visible", timeout=30_000)
            assert "API key" in page.text_content("#error")
            page.fill("#key", one_off(keyed["keys"]["bob"]))
            page.click("#keyform button")
            page.wait_for_function("document.getElementById('error').textContent.includes('not accepted')", timeout=30_000)
            page.fill("#key", keyed["keys"]["bob"])
            page.click("#keyform button")
            page.wait_for_function("document.getElementById('label').textContent === 'dog'", timeout=30_000)
            assert not page.is_visible("#keyform")
        finally:
            browser.close()
