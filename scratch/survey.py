"""Today's behaviour of decode_image on every hostile row: outcome, exception type, peak memory, time (one subprocess each)."""
import json, subprocess, sys, pickle, tempfile, os
sys.path.insert(0, "tests")
import hostile
CHILD = r'''
import sys, time, pickle, os
def hwm():
    for l in open("/proc/self/status"):
        if l.startswith("VmHWM"): return int(l.split()[1]) // 1024
data = open(sys.argv[1], "rb").read()
mod = sys.argv[2]
if mod != "catdog_nb.data": sys.path.insert(0, "scratch")
import importlib; m = importlib.import_module(mod)
m.decode_image(b"\xff\xd8\xff")  if False else None
before = hwm(); t = time.perf_counter()
try:
    img = m.decode_image(data, 40_000_000); out = f"ok {img.shape} {img.dtype}"
except Exception as e: out = f"{type(e).__module__}.{type(e).__name__}: {str(e)[:90]!r}"
print(f"{out} | +{hwm()-before} MiB peak | {time.perf_counter()-t:.2f}s")
'''
mod = sys.argv[1] if len(sys.argv) > 1 else "catdog_nb.data"
only = sys.argv[2:]
for name, (_, expected) in hostile.ROWS.items():
    data = hostile.hostile_bytes(name) if not only or name in only else b""
    if only and name not in only: continue
    with tempfile.NamedTemporaryFile() as f:
        f.write(data); f.flush()
        r = subprocess.run([sys.executable, "-c", CHILD, f.name, mod], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": os.getcwd()})
    line = r.stdout.strip() or f"CRASH rc={r.returncode} {r.stderr.strip()[-200:]!r}"
    print(f"{name:40s} [{expected:9s}] {line}", flush=True)
