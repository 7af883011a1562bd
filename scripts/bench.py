"""Side-by-side benchmark: the Keras transfer-learning guide's way vs finetune.

    python3 scripts/bench.py [--train 2000] [--test 1000] [--sizes 71 96] [--cases head finetune both]
                             [--precisions float32 mixed_bfloat16] [--repeat 3]
    python3 scripts/bench.py --cases whole [--weights XCEPTION_NOTOP.h5] [--repeat 3]
    python3 scripts/bench.py --cases step [--repeat 3]

For each image size and case, runs the same work twice, one process after the
other: a baseline written as the Keras transfer-learning guide writes it
(tf.data map for gray-to-RGB, resize and preprocess_input, prefetch, frozen
Xception called with training=False, the same head and optimizers, the same
two top blocks unfrozen with BatchNorm frozen), then `finetune` with the same
recipe settings. Prints wall time, training images/s, peak memory and test
accuracy of each, and the ratios, as a markdown table.

Cases: head (10 epochs, backbone frozen), finetune (top 2 blocks, 5 epochs, from
the same starting weights), both (head then finetune); whole (alone): the
head case as two whole processes timed from outside, `finetune run` with its
default exports against the guide's script, 1,000 training and 2,000 test
images at 71 px, batch 32, no validation hold-out; step (alone): finetune's training
epoch against plain ``model.fit`` on the same arrays and compiled model, for the cached head and the
quick start's whole-backbone phase (``scripts/step_overhead.py``, --repeat rounds). Both sides start from
the same Xception weights: random, with BatchNorm statistics calibrated on
Fashion-MNIST images (no ImageNet weights can be downloaded here), so the
frozen features carry signal and the accuracies can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
HEAD_EPOCHS, TUNE_EPOCHS, BATCH = 10, 5, 64


def recipe_dict(args, size: int, case: str, weights: str) -> dict:
    head_epochs = HEAD_EPOCHS if case in ("head", "both") else 0
    tune_epochs = TUNE_EPOCHS if case in ("finetune", "both") else 0
    return {
        "name": f"bench_{case}_{size}",
        "seed": 0,
        "precision": "float32",
        "data": {
            "source": "fashion_mnist",
            "image_size": size,
            "validation_split": 0.1,
            "train_limit": args.train,
            "test_limit": args.test,
        },
        "model": {"backbone": {"name": "xception", "weights": weights}, "head": {"dropout": 0.2}},
        "training": {"batch_size": BATCH, "verbose": 0},
        "export": {"formats": ["keras"]},
        "phases": [
            {
                "name": "head",
                "epochs": head_epochs,
                "trainable": "none",
                "optimizer": {"name": "adam", "learning_rate": 1e-3},
            },
            {
                "name": "finetune",
                "epochs": tune_epochs,
                "trainable": {"top_blocks": 2},
                "optimizer": {"name": "adam", "learning_rate": 1e-4},
            },
        ],
    }


# --- workers (each runs in its own process) -------------------------------


def worker_finetune(args) -> dict:
    import finetune

    recipe = finetune.load_recipe(json.loads(args.recipe), json.loads(args.overrides or "[]"))
    started = time.perf_counter()
    lines = []
    result = finetune.run(recipe, out=Path(args.scratch) / "finetune", log=lines.append)
    wall = time.perf_counter() - started
    train_seconds = sum(float(row["seconds"]) for row in result.history)
    extract_seconds = sum(float(line.rsplit(", ", 1)[-1].rstrip("s")) for line in lines if "computed once" in line)
    return {
        "wall": wall,
        "train_seconds": train_seconds + extract_seconds,
        "epochs": len(result.history),
        "accuracy": result.metrics["test"]["accuracy"],
        "extract_seconds": extract_seconds,
        "train_images": result.metrics["train_images"],
        "log": [line for line in lines if "computed once" in line],
    }


def worker_baseline(args) -> dict:
    """The Keras transfer-learning guide's recipe, on the same data and weights."""
    import keras
    import tensorflow as tf

    import finetune
    from finetune import backbones, data
    from finetune.backbones.blocks import split_into_blocks

    recipe = finetune.load_recipe(json.loads(args.recipe))
    keras.utils.set_random_seed(0)
    started = time.perf_counter()
    dataset = data.load_dataset(recipe.data, recipe.seed)
    size = recipe.data.image_size

    def to_backbone_input(images, labels):
        images = tf.image.resize(tf.image.grayscale_to_rgb(tf.cast(images, tf.float32)), (size, size))
        return keras.applications.xception.preprocess_input(images), labels

    def pipeline(split, shuffle):
        ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
        if shuffle:
            ds = ds.shuffle(len(split), seed=0)
        batch = recipe.training.batch_size
        return ds.batch(batch).map(to_backbone_input, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    train, test = pipeline(dataset.train, True), pipeline(dataset.test, False)
    val = pipeline(dataset.validation, False) if dataset.validation is not None else None
    base = keras.applications.Xception(weights=None, input_shape=(size, size, 3), include_top=False)
    base.load_weights(recipe.model.backbone.weights)
    base.trainable = False
    inputs = keras.Input(shape=(size, size, 3))
    x = base(inputs, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    train_seconds, epochs = 0.0, 0
    for phase in recipe.phases:
        if phase.epochs == 0:
            continue
        if phase.trainable != "none":
            _, blocks = split_into_blocks(base, backbones.get("xception"))
            top = {id(layer) for block in blocks[-phase.trainable.top_blocks :] for layer in block.layers}
            base.trainable = True
            for layer in base.layers:
                layer.trainable = id(layer) in top and not isinstance(layer, keras.layers.BatchNormalization)
        model.compile(
            optimizer=keras.optimizers.Adam(phase.optimizer.learning_rate),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
        )
        fit_started = time.perf_counter()
        model.fit(train, epochs=phase.epochs, validation_data=val, verbose=0)
        train_seconds += time.perf_counter() - fit_started
        epochs += phase.epochs
    _, accuracy = model.evaluate(test, verbose=0)
    return {
        "wall": time.perf_counter() - started,
        "train_seconds": train_seconds,
        "epochs": epochs,
        "accuracy": float(accuracy),
        "train_images": len(dataset.train),
    }


def whole_recipe(args, weights: str) -> dict:
    """Issue #24's whole-process job: the head on a frozen Xception, 71 px, 10 epochs, batch 32, no hold-out."""
    recipe = recipe_dict(args, 71, "head", weights)
    recipe["name"] = "bench_whole_71"
    recipe["data"].update(validation_split=0.0)
    recipe["training"]["batch_size"] = 32
    del recipe["export"]  # the default exports (model.keras and the SavedModel), each written and checked
    recipe["phases"] = recipe["phases"][:1]
    return recipe


def timed_process(command: list[str]) -> float:
    """Seconds from starting ``command`` to its exit: interpreter, imports and all."""
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{command[:4]} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def whole_process(args, scratch_root: Path) -> None:
    """Both ways as whole processes, timed from outside: ``finetune run`` (CLI) against the guide's script."""
    weights = args.weights
    if weights is None:
        weights = str(scratch_root / "xception_71_calibrated.weights.h5")
        run_worker("weights", {"path": weights, "size": 71}, scratch_root)
    recipe = whole_recipe(args, weights)
    recipe_file = scratch_root / "whole.json"
    recipe_file.write_text(json.dumps(recipe))
    print("| round | way | whole process s | test accuracy |")
    print("| --- | --- | --- | --- |")
    ratios = []
    for round_index in range(args.repeat):
        scratch = scratch_root / f"whole_{round_index}"
        scratch.mkdir()
        baseline_report = scratch / "baseline.json"
        baseline_command = [sys.executable, __file__, "--worker", "baseline", "--recipe", json.dumps(recipe)]
        baseline_command += ["--scratch", str(scratch), "--report", str(baseline_report)]
        baseline_wall = timed_process(baseline_command)
        baseline_accuracy = json.loads(baseline_report.read_text())["accuracy"]
        run_dir = scratch / "finetune"
        finetune_command = [sys.executable, "-m", "finetune", "run", str(recipe_file), "--out", str(run_dir), "-q"]
        finetune_wall = timed_process([*finetune_command, *(f"--set={item}" for item in args.overrides)])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        for way, wall, accuracy in (
            ("Keras guide", baseline_wall, baseline_accuracy),
            ("finetune run", finetune_wall, metrics["test"]["accuracy"]),
        ):
            print(f"| {round_index + 1} | {way} | {wall:.1f} | {accuracy:.4f} |", flush=True)
        stages = ", ".join(f"{stage} {seconds:.1f}" for stage, seconds in metrics["seconds_by_stage"].items())
        print(f"|  | finetune's stages, s | {stages} |  |", flush=True)
        ratios.append(baseline_wall / finetune_wall)
    print(f"\nwhole process, Keras guide / finetune run: {_spread(ratios)}")


def make_weights(path: Path, size: int, images: int = 512) -> None:
    """Random Xception weights with BatchNorm statistics calibrated on Fashion-MNIST."""
    from finetune.backbones.calibration import save_calibrated_weights

    save_calibrated_weights("xception", size, path, images=images, data_seed=1)


# --- driver ---------------------------------------------------------------


def run_worker(kind: str, recipe: dict, scratch: Path, overrides: list | None = None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--recipe",
        json.dumps(recipe),
        "--scratch",
        str(scratch),
        "--overrides",
        json.dumps(overrides or []),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--train",
        type=int,
        help="training images, 10%% held out for validation (default 2000; whole: 1000, none held out)",
    )
    parser.add_argument("--test", type=int, help="test images (default 1000; whole: 2000)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[71, 96])
    parser.add_argument(
        "--cases",
        nargs="+",
        default=["head", "finetune", "both"],
        help="head, finetune, both; or whole alone: issue #24's job as two whole processes (--train 1000 --test 2000); "
        "or step alone: per-step overhead (scripts/step_overhead.py)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="recipe override for the finetune side, e.g. training.jit_compile=false",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["float32"],
        help="one finetune run per precision, after the (float32) baseline; e.g. float32 mixed_bfloat16",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the ways of each case this many times in turn; ratios are medians of the rounds",
    )
    parser.add_argument(
        "--weights",
        help="whole case: an Xception weights file for both ways (e.g. Keras's ImageNet notop .h5); "
        "default: random weights with calibrated BatchNorm",
    )
    parser.add_argument("--worker", choices=["baseline", "finetune", "weights"], help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "weights":
            recipe = json.loads(args.recipe)
            make_weights(Path(recipe["path"]), recipe["size"])
            print(json.dumps({}))
            return 0
        report = (worker_baseline if args.worker == "baseline" else worker_finetune)(args)
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if args.report:
            Path(args.report).write_text(json.dumps(report))
        print(json.dumps(report))
        return 0

    if args.cases == ["step"]:
        command = [
            sys.executable,
            str(ROOT / "scripts" / "step_overhead.py"),
            "--rounds",
            str(args.repeat),
            "--epochs",
            "6",
        ]
        return subprocess.run([*command, *(f"--set={override}" for override in args.overrides)]).returncode
    whole = args.cases == ["whole"]
    args.train = args.train or (1000 if whole else 2000)
    args.test = args.test or (2000 if whole else 1000)
    if whole:
        with tempfile.TemporaryDirectory(prefix="finetune-bench-") as scratch_root:
            whole_process(args, Path(scratch_root))
        return 0

    print("| size | case | way | wall s | train s | train images/s | peak RSS MB | test accuracy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ratios = []
    with tempfile.TemporaryDirectory(prefix="finetune-bench-") as scratch_root:
        scratch_root = Path(scratch_root)
        for size in args.sizes:
            weights = scratch_root / f"xception_{size}_calibrated.weights.h5"
            run_worker("weights", {"path": str(weights), "size": size}, scratch_root)
            for case in args.cases:
                recipe = recipe_dict(args, size, case, str(weights))
                ways = [("baseline", "baseline", [])] + [
                    (
                        "finetune",
                        "finetune" if len(args.precisions) == 1 else f"finetune, {precision}",
                        [*args.overrides, f"precision={precision}"],
                    )
                    for precision in args.precisions
                ]
                rounds = []
                for round_index in range(args.repeat):
                    reports = {}
                    for kind, way, overrides in ways:
                        scratch = scratch_root / f"{size}_{case}_{round_index}_{len(reports)}"
                        scratch.mkdir()
                        reports[way] = report = run_worker(kind, recipe, scratch, overrides)
                        speed = report["train_images"] * report["epochs"] / report["train_seconds"]
                        print(
                            f"| {size} | {case} | {way} | {report['wall']:.1f} | {report['train_seconds']:.1f} | "
                            f"{speed:.0f} | {report['peak_rss_mb']:.0f} | {report['accuracy']:.4f} |",
                            flush=True,
                        )
                    rounds.append(reports)
                for _, way, _ in ways[1:]:
                    # Each round's ratio is of two runs made one after the other: the machine's drift cancels.
                    pairs = [(r["baseline"], r[way]) for r in rounds]
                    ratios.append(
                        (
                            size,
                            case,
                            way,
                            _spread([b["wall"] / f["wall"] for b, f in pairs]),
                            _spread([b["train_seconds"] / f["train_seconds"] for b, f in pairs]),
                            statistics.median(f["accuracy"] - b["accuracy"] for b, f in pairs),
                            statistics.median(f.get("extract_seconds", 0.0) for _, f in pairs),
                        )
                    )
    print()
    print(
        "| size | case | way | wall: baseline / finetune | training: baseline / finetune | "
        "accuracy: finetune - baseline | finetune's one pass of the frozen part, s |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for size, case, way, wall, train, accuracy, extract in ratios:
        print(f"| {size} | {case} | {way} | {wall} | {train} | {accuracy * 100:+.1f} pt | {extract:.1f} |")
    return 0


def _spread(values: list[float]) -> str:
    """``2.10x``, or the median with the range over rounds: ``2.10x (1.95-2.31)``."""
    if len(values) == 1:
        return f"{values[0]:.2f}x"
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


if __name__ == "__main__":
    sys.exit(main())
