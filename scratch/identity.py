"""The prototype decoder gives bit-identical arrays to today's decode_image on a sample of data/raw (and their PNG/WebP/BMP re-encodings)."""
import sys, random, glob, time
sys.path.insert(0, "scratch")
import decode, cv2, numpy as np
from catdog_nb import data
files = sorted(glob.glob("data/raw/*/*"))
random.Random(0).shuffle(files)
n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
diff = 0; t_old = t_new = 0
for f in files[:n]:
    b = open(f, "rb").read()
    t = time.perf_counter(); a = data.decode_image(b); t_old += time.perf_counter() - t
    t = time.perf_counter(); c = decode.decode_image(b); t_new += time.perf_counter() - t
    if a.shape != c.shape or not np.array_equal(a, c): diff += 1; print("DIFF", f)
for f in files[:100]:
    img = cv2.imread(f)
    for ext in (".png", ".webp", ".bmp"):
        b = cv2.imencode(ext, img)[1].tobytes()
        if not np.array_equal(data.decode_image(b), decode.decode_image(b)): diff += 1; print("DIFF", ext, f)
print(f"{n} jpegs + 300 re-encodings: {diff} differ; decode time old {t_old:.2f}s new {t_new:.2f}s")
