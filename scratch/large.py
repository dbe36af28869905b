"""Peak memory and time of decoding legal large images, today (catdog_nb.data) and with the prototype (decode)."""
import subprocess, sys, tempfile, os
sys.path.insert(0, "tests")
import hostile
CHILD = open("scratch/survey.py").read().split("CHILD = r'''")[1].split("'''")[0]
cases = {"jpeg_6000x6000_q10": hostile.large_jpeg(6000, 6000),
         "jpeg_7360x4912_q30": hostile.large_jpeg(7360, 4912, quality=30),
         "jpeg_7360x4912_progressive": hostile.large_jpeg(7360, 4912, quality=30, progressive=True),
         "png_6300x6300_rgb": hostile.encode(hostile.gradient(6300, 6300), ".png", [16, 1]),
         "webp_6000x6000": hostile.encode(hostile.gradient(6000, 6000), ".webp", [64, 10]),
         "bmp_6300x6300": hostile.encode(hostile.gradient(6300, 6300), ".bmp")}
for name, data in cases.items():
    for mod in ("catdog_nb.data", "decode"):
        with tempfile.NamedTemporaryFile() as f:
            f.write(data); f.flush()
            r = subprocess.run([sys.executable, "-c", CHILD, f.name, mod], capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
        print(f"{name:28s} {len(data):>11,d} B {mod:15s} {r.stdout.strip() or r.stderr[-300:]}", flush=True)
