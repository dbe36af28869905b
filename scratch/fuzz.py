"""A longer random mutation run against the prototype decoder: anything but ImageError or a small BGR array is a bug."""
import random, sys, time
sys.path.insert(0, "tests"); sys.path.insert(0, "scratch")
import importlib, hostile, numpy as np
decode = importlib.import_module(sys.argv[3] if len(sys.argv) > 3 else "decode")
from catdog_nb.data import ImageError, sample_photos
seeds = list(hostile.base_images(sample_photos(2)).values()) + [hostile.small_jpeg(64, progressive=True), hostile.wide_bmp(64, 4)]
rng, n, bad, big, start = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 1), int(sys.argv[1]), 0, 0, time.time()
for i in range(n):
    seed = rng.choice(seeds)
    edits = [(rng.choice(hostile.MUTATIONS), rng.choice([rng.randrange(64), rng.randrange(512)]), rng.randrange(1024))
             for _ in range(rng.randint(1, 6))]
    blob = hostile.mutated(seed, edits)
    try: img = decode.decode_image(blob)
    except ImageError: continue
    except Exception as e: bad += 1; print("BUG", type(e).__name__, str(e)[:80], edits); continue
    if not (img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3 and img.shape[0] * img.shape[1] <= 1040 ** 2): big += 1
print(f"{n} mutations: {bad} other exceptions, {big} decoded over the size bound, {time.time() - start:.0f} s")
