"""Inception feature speed against batch size on this machine (the evaluators' FID cost).

    python benchmarks/inception_speed.py                 # batches 10, 20, 50, 100 of 32-px images
    python benchmarks/inception_speed.py --images 200 --batches 20,50

Random uint8 images go through ``InceptionFeatures.extract`` (resize to 299, channels-last) at each
batch size, twice, alternating, so a busy machine slows every batch size alike; the best round counts.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from st_ar.eval.inception import InceptionFeatures  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batches", default="10,20,50,100")
    p.add_argument("--size", type=int, default=32, help="side of the input images (px)")
    args = p.parse_args()
    model = InceptionFeatures()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, args.size, args.size, 3), generator=g, dtype=torch.uint8).numpy()
    model.extract(images[:10])  # warm-up
    batches = [int(b) for b in args.batches.split(",")]
    best = {b: 0.0 for b in batches}
    for _ in range(2):
        for b in batches:
            start = time.perf_counter()
            for i in range(0, len(images), b):
                model.extract(images[i : i + b])
            best[b] = max(best[b], len(images) / (time.perf_counter() - start))
    print(f"Inception features, {args.images} images of {args.size} px, {torch.get_num_threads()} threads")
    for b in batches:
        print(f"  batch {b:4d}: {best[b]:6.1f} images/s ({best[b] / best[batches[-1]]:.2f}x batch {batches[-1]})")


if __name__ == "__main__":
    main()
