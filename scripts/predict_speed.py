"""A run's model called eagerly against its compiled predict function, side by side in one process.

    python3 scripts/predict_speed.py RUN_DIR [--batches 1 8 32] [--calls 30]

The median seconds of ``model(images, training=False)`` (what finetune's predictor called until
2026-12-05) and of ``model.predict_on_batch(images)`` (what it calls now) on random uint8 images of the
model's stored shape, after three warm-up calls each, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def median_seconds(call, images: np.ndarray, calls: int) -> float:
    for _ in range(3):
        call(images)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call(images)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()

    import keras

    from finetune.model import load_model

    model = load_model(args.run_dir, compile=False)
    shape = tuple(int(size) for size in model.input_shape[1:])
    for batch in args.batches:
        images = np.random.default_rng(0).integers(0, 256, (batch, *shape), dtype=np.uint8)
        eager = median_seconds(lambda x: keras.ops.convert_to_numpy(model(x, training=False)), images, args.calls)
        compiled = median_seconds(model.predict_on_batch, images, args.calls)
        row = {"batch": batch, "eager_ms": round(1000 * eager, 2), "predict_on_batch_ms": round(1000 * compiled, 2)}
        print(json.dumps({**row, "ratio": round(eager / compiled, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
