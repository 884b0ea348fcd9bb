"""Time zsad.metrics on an MVTec-AD-sized random test split (1725 images, 518x518, 15 classes).

    python bench/metrics_speed.py [anomalyclip|mvtec]

Random maps with elliptic blob anomalies in ~70 % of the images; only the class_metrics() calls are timed.
The issue's budget: the whole split in under a minute on a 2-core box.
"""
import resource
import sys
import threading
import time

import numpy as np

from zsad import metrics as M

SIZES = {"bottle": 83, "cable": 150, "capsule": 132, "carpet": 117, "grid": 78, "hazelnut": 110,
         "leather": 124, "metal_nut": 115, "pill": 167, "screw": 160, "tile": 117, "toothbrush": 42,
         "transistor": 100, "wood": 79, "zipper": 151}
H = W = 518
mode = sys.argv[1] if len(sys.argv) > 1 else "anomalyclip"
assert sum(SIZES.values()) == 1725


def make_class(rng, n) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    labels = (rng.random(n) < 0.7).astype(np.uint8)
    masks = np.zeros((n, H, W), dtype=bool)
    yy, xx = np.mgrid[:H, :W]
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):  # 1-3 elliptic blobs
            cy, cx = rng.integers(0, H), rng.integers(0, W)
            ry, rx = rng.integers(5, 60), rng.integers(5, 60)
            y0, y1, x0, x1 = max(cy - ry, 0), min(cy + ry + 1, H), max(cx - rx, 0), min(cx + rx + 1, W)
            masks[i, y0:y1, x0:x1] |= ((yy[y0:y1, x0:x1] - cy) / ry) ** 2 + ((xx[y0:y1, x0:x1] - cx) / rx) ** 2 <= 1
    maps = rng.random((n, H, W), dtype=np.float32)
    maps += 0.6 * masks
    scores = maps.reshape(n, -1).max(1) + rng.normal(0, 0.05, n).astype(np.float32)
    labels = masks.reshape(n, -1).any(1).astype(np.uint8)
    return labels, scores, masks, maps


# peak-RSS sampler (the generated data of the current class is included in the numbers)
peak = [0]


def sampler():
    while True:
        with open("/proc/self/statm") as f:
            peak[0] = max(peak[0], int(f.read().split()[1]) * 4096)
        time.sleep(0.01)


threading.Thread(target=sampler, daemon=True).start()

rng = np.random.default_rng(0)
per_class, total, npx = {}, 0.0, 0
for name, n in SIZES.items():
    data = make_class(rng, n)
    base = peak[0]
    t0 = time.perf_counter()
    per_class[name] = M.class_metrics(*data, aupro_mode=mode)
    dt = time.perf_counter() - t0
    total += dt
    npx += data[3].size
    print(f"{name:11s} n={n:3d} anom_px={data[2].mean():.3f} {dt:5.2f}s "
          + " ".join(f"{k}={v:.3f}" for k, v in per_class[name].items()), flush=True)
    del data
means, skipped = M.summarize(per_class)
print("mean:", {k: round(v, 4) for k, v in means.items()}, "skipped:", skipped)
print(f"mode={mode} pixels={npx/1e6:.1f}M  metric time total={total:.2f}s  "
      f"peak RSS={peak[0]/2**30:.2f} GiB  ru_maxrss={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/2**20:.2f} GiB")
