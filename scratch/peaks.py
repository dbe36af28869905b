"""VmHWM growth of one decode in a fresh process, today's decoder and the prototype, for the memory-ceiling rows."""
import subprocess, sys, tempfile, os
sys.path.insert(0, "tests")
import hostile
PROBE = r'''
import sys
sys.path.insert(0, "scratch")
mod = __import__(sys.argv[2], fromlist=["decode_image"])
from catdog_nb.data import ImageError
def hwm(): return next(int(l.split()[1]) // 1024 for l in open("/proc/self/status") if l.startswith("VmHWM"))
mod.decode_image(open("data/raw/cat/" + sorted(__import__("os").listdir("data/raw/cat"))[0], "rb").read())
before = hwm()
try: out = mod.decode_image(open(sys.argv[1], "rb").read()).shape
except ImageError as e: out = type(e).__name__
print(out, f"+{hwm() - before} MiB")
'''
cases = {"rgba_png_25mp": lambda: hostile.zeros_png(5000, 5000, channels=4), "rgba_png_39mp": lambda: hostile.zeros_png(6300, 6300, channels=4),
         "rgba16_png_39mp": lambda: hostile.zeros_png(6300, 6300, channels=4, depth=16),
         "rgba16_png_14mp": lambda: hostile.zeros_png(3800, 3800, channels=4, depth=16),
         "gray16_png_39mp": lambda: hostile.zeros_png(6300, 6300, channels=1, depth=16),
         "rgb16_png_39mp": lambda: hostile.zeros_png(6300, 6300, channels=3, depth=16),
         "webp_alpha_16k": lambda: hostile.encode(hostile.np.dstack([hostile.gradient(6000, 6000), hostile.np.full((6000, 6000), 128, hostile.np.uint8)]), ".webp", [64, 101])}
only = sys.argv[1:]
for name, make in cases.items():
    if only and name not in only: continue
    with tempfile.NamedTemporaryFile() as f:
        f.write(make()); f.flush()
        for mod in ("catdog_nb.data", "decode"):
            r = subprocess.run([sys.executable, "-c", PROBE, f.name, mod], capture_output=True, text=True, timeout=600,
                               env={**os.environ, "PYTHONPATH": os.getcwd()})
            print(f"{name:18s} {mod:15s} {r.stdout.strip() or r.stderr[-300:]}", flush=True)
