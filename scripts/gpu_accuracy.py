"""Accuracy and time of a recipe on an accelerator, through Keras 3's JAX backend (no TensorFlow needed).

    KERAS_BACKEND=jax python3 scripts/gpu_accuracy.py --out DIR [--recipe recipes/lite0_fmnist_full.yaml]
                                                      [--set KEY=VALUE ...] [--name NAME]

One whole `finetune.run` of the recipe, with `--set` overrides read as the CLI reads them. Appends
one JSON line to DIR/gpu_accuracy.jsonl: the device, the overrides, the wall time of the run, each
epoch's seconds and training images/s, and the test accuracy on the recipe's test split. Run it
several times with other overrides to draw an accuracy-time frontier on the same card
(scripts/gpu_bench.sh accuracy does that on a machine without TensorFlow).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "jax")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def device_name() -> str:
    import keras

    if keras.backend.backend() != "jax":
        return keras.backend.backend()
    import jax

    device = jax.devices()[0]
    return f"{device.platform}: {getattr(device, 'device_kind', device)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", default="recipes/lite0_fmnist_full.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--name", default=None, help="the run folder's name under DIR (default: run1, run2, ...)")
    args = parser.parse_args()

    import finetune

    args.out.mkdir(parents=True, exist_ok=True)
    recipe = finetune.load_recipe(args.recipe, overrides=args.overrides)  # read as the CLI reads --set
    name = args.name or f"run{len(list(args.out.glob('run*'))) + 1}"
    started = time.perf_counter()
    result = finetune.run(recipe, out=args.out / name, log=lambda line: print(line, flush=True))
    seconds = time.perf_counter() - started
    images = result.metrics["train_images"]
    epochs = [
        {"epoch": int(row["epoch"]), "seconds": float(row["seconds"]), "images_per_s": images / float(row["seconds"])}
        for row in result.history
    ]
    row = {
        "device": device_name(),
        "recipe": args.recipe,
        "overrides": args.overrides,
        "run_dir": str(result.run_dir),
        "precision": result.metrics["precision"],
        "wall_seconds": round(seconds, 1),
        "test_accuracy": result.metrics["test"]["accuracy"],
        "test_images": result.metrics["test"]["examples"],
        "epochs": epochs,
    }
    with (args.out / "gpu_accuracy.jsonl").open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps({key: row[key] for key in ("device", "precision", "wall_seconds", "test_accuracy")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
