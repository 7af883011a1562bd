"""What TFLite quantization costs: each of a run's .tflite files on the run's whole test split.

    python3 scripts/tflite_accuracy.py RUN_DIR [--batch 250]

For every ``model*.tflite`` in RUN_DIR (write them with ``finetune export RUN_DIR --format tflite
--quantization none|float16|dynamic_range|int8``): its size, its test accuracy read by the TFLite
interpreter, its top-1 agreement with ``model.keras``, and the seconds the interpreter took for the
whole split on this machine. The test split is the run recipe's own (same source, limit and seed).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batch", type=int, default=250)
    args = parser.parse_args()

    import finetune
    from finetune.data import load_dataset
    from finetune.export.tflite import predict_tflite, tensor_types
    from finetune.plan import prepare

    _, plan = prepare(finetune.load_recipe(args.run_dir / "recipe.yaml"))
    test = load_dataset(plan.data, plan.seed).test
    images, labels = np.asarray(test.images), np.asarray(test.labels)
    model = finetune.load_model(args.run_dir / "model.keras", compile=False)
    reference = model.predict(images, batch_size=args.batch, verbose=0).argmax(1)
    rows = [{"file": "model.keras", "bytes": (args.run_dir / "model.keras").stat().st_size}]
    rows[0]["test_accuracy"] = round(float(np.mean(reference == labels)), 4)
    for path in sorted(args.run_dir.glob("model*.tflite")):
        started = time.perf_counter()
        predicted = np.concatenate(
            [predict_tflite(path, images[start : start + args.batch]) for start in range(0, len(images), args.batch)]
        ).argmax(1)
        rows.append(
            {
                "file": path.name,
                "bytes": path.stat().st_size,
                "test_accuracy": round(float(np.mean(predicted == labels)), 4),
                "agreement_with_keras": round(float(np.mean(predicted == reference)), 4),
                "seconds": round(time.perf_counter() - started, 1),
                "tensors": tensor_types(path),
            }
        )
    for row in rows:
        print(json.dumps({"run_dir": str(args.run_dir), "test_images": len(labels), **row}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
