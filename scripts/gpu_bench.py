"""GPU throughput of finetune on Keras 3's JAX backend (no TensorFlow needed).

    KERAS_BACKEND=jax python3 scripts/gpu_bench.py --out DIR [--size 299] [--batch 128] [--images 8192]

1. An end-to-end `finetune.run` of the flagship recipe on a Fashion-MNIST subset
   (random Xception weights: no ImageNet files here), with precision auto.
2. Images/s of the head phase's work (the frozen Xception forward pass that
   feature caching runs once) and of full fine-tuning (every layer trainable),
   each fed two ways through the same `predict`/`fit` loop: real data through
   the pipeline (uint8 28x28 arrays from host memory; resize and RGB happen
   inside the model on the GPU) and one synthetic batch already on the GPU,
   handed out again at every step (`OnDevice`). Neither way waits for a step
   to finish before dispatching the next, so the ratio is the input
   pipeline's overhead.

Writes DIR/gpu_bench.json and prints a markdown table.
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


def timed(function, repeats: int = 1):
    started = time.perf_counter()
    for _ in range(repeats):
        result = function()
    _block(result)
    return time.perf_counter() - started


def _block(value):
    import jax

    jax.block_until_ready(value) if value is not None else None


def on_device_batches(x, y, steps: int):
    """A Keras PyDataset that hands out the same device-resident batch ``steps`` times: no host work."""
    import keras

    class OnDevice(keras.utils.PyDataset):
        def __len__(self):
            return steps

        def __getitem__(self, index):
            return (x,) if y is None else (x, y)

    return OnDevice()


def _calibrated_weights(path: Path, size: int) -> None:
    from finetune.backbones.calibration import save_calibrated_weights

    save_calibrated_weights("xception", size, path, images=128, batch_size=16, data_seed=1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=299)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--skip-run", action="store_true")
    parser.add_argument("--run-images", type=int, default=6000, help="training images of the end-to-end run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    import jax
    import keras
    import numpy as np

    import finetune
    from finetune import data
    from finetune.model import layout, resolve_precision
    from finetune.plan import resolve
    from finetune.training.cuts import plan_cut
    from finetune.training.phases import compile_for_phase, configure_phase

    device = jax.devices()[0]
    report = {
        "device": str(getattr(device, "device_kind", device)),
        "backend": keras.backend.backend(),
        "keras": keras.__version__,
        "jax": jax.__version__,
        "size": args.size,
        "batch": args.batch,
    }
    # No ImageNet files here: random weights with BatchNorm statistics calibrated on the data,
    # so the frozen features carry signal and the accuracy means something.
    weights = args.out / "xception_calibrated.weights.h5"
    _calibrated_weights(weights, args.size)
    overrides = {
        "model.backbone.weights": str(weights),
        "data.image_size": args.size,
        "precision": args.precision,
        "training.batch_size": args.batch,
        "export.formats": ["keras"],
        "training.verbose": 2,
    }

    if not args.skip_run:
        recipe = finetune.load_recipe(
            "recipes/xception_fmnist.yaml",
            overrides={
                **overrides,
                "data.train_limit": args.run_images,
                "data.test_limit": 2000,
                "phases.head.epochs": 3,
                "phases.finetune.epochs": 2,
            },
        )
        started = time.perf_counter()
        result = finetune.run(recipe, out=args.out / "run", log=lambda line: print(line, flush=True))
        report["end_to_end"] = {
            "seconds": time.perf_counter() - started,
            "precision": result.metrics["precision"],
            "test_accuracy": result.metrics["test"]["accuracy"],
            "history": result.history,
        }
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))

    recipe = finetune.load_recipe("recipes/xception_fmnist.yaml", overrides=overrides)
    report["precision"] = resolve_precision(recipe.precision)
    split = data.load_dataset(
        recipe.data.model_copy(update={"train_limit": args.images, "validation_split": 0.0}), seed=0
    ).train
    images, labels = split.images[: args.images], split.labels[: args.images]
    steps = len(images) // args.batch
    synthetic_x = jax.device_put(np.random.default_rng(0).integers(0, 256, (args.batch, 28, 28, 1), dtype=np.uint8))
    synthetic_y = jax.device_put(np.random.default_rng(1).integers(0, 10, (args.batch,), dtype=np.int32))

    # Head phase: the frozen backbone's forward pass (what caching runs once per split).
    model = finetune.build_model(recipe)
    model_layout = layout(model, resolve(recipe).model)
    cut = plan_cut(model, model_layout, recipe.phase("head"))
    cut.bottom.predict(images[: args.batch * 2], batch_size=args.batch, verbose=0)  # compile
    real = timed(lambda: cut.bottom.predict(images, batch_size=args.batch, verbose=0))
    cut.bottom.predict(on_device_batches(synthetic_x, None, 2), verbose=0)
    synthetic = timed(lambda: cut.bottom.predict(on_device_batches(synthetic_x, None, steps), verbose=0))
    report["head_forward"] = {
        "real_images_per_s": len(images) / real,
        "synthetic_images_per_s": steps * args.batch / synthetic,
    }
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    print(report["head_forward"], flush=True)

    # Full fine-tuning: every layer trainable (BatchNorm frozen, the Keras rule), mixed precision.
    phase = recipe.phase("finetune").model_copy(update={"trainable": "all", "epochs": 1})
    configure_phase(model, model_layout, phase)
    compile_for_phase(model, model_layout, phase, steps, settings=recipe.training)
    model.fit(images[: args.batch * 4], labels[: args.batch * 4], batch_size=args.batch, epochs=1, verbose=0)
    real = timed(lambda: model.fit(images, labels, batch_size=args.batch, epochs=1, verbose=0, shuffle=True) and None)
    model.fit(on_device_batches(synthetic_x, synthetic_y, 2), epochs=1, verbose=0)
    synthetic = timed(
        lambda: model.fit(on_device_batches(synthetic_x, synthetic_y, steps), epochs=1, verbose=0) and None
    )
    report["full_finetune"] = {
        "real_images_per_s": len(images) / real,
        "synthetic_images_per_s": steps * args.batch / synthetic,
    }

    for key in ("head_forward", "full_finetune"):
        entry = report[key]
        entry["input_overhead"] = 1 - entry["real_images_per_s"] / entry["synthetic_images_per_s"]
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    print(
        f"\n{report['device']}, Keras {report['keras']} on JAX {report['jax']}, {report['precision']}, "
        f"Xception at {args.size}px, batch {args.batch}"
    )
    print("| work | real data, images/s | synthetic on GPU, images/s | input overhead |")
    print("| --- | --- | --- | --- |")
    for key, label in (("head_forward", "head phase (frozen forward)"), ("full_finetune", "full fine-tuning")):
        entry = report[key]
        print(
            f"| {label} | {entry['real_images_per_s']:.0f} | {entry['synthetic_images_per_s']:.0f} | "
            f"{entry['input_overhead']:.1%} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
