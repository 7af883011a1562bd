"""Shipped recipes off their beaten path: test accuracy at a few sizes, against two baselines on the same split.

    python3 scripts/small_data_table.py RECIPE [--per-class 10 100] [--data fashion_mnist|DIGITS_DIR]
                                        [--baselines] [--out rows.jsonl]

Each row runs RECIPE unchanged but for its data (``data.train_per_class``; for a folder,
``data.source=image_folder``, ``data.data_dir``, ``data.test_split=0.25``) as ``finetune run`` would.
``--baselines`` also scores, on the very same training and test images (the dataset finetune loads
for that recipe and seed), scikit-learn's ``LogisticRegression`` on the raw pixels and the chapter's
dense network (``recipes/ch11_one_cycle.yaml`` with the same data settings). One JSON line per result
goes to ``--out`` (appended) and to stdout. ``scripts/digits_folder.py DIR`` writes the digits folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`
MLP = ROOT / "recipes" / "ch11_one_cycle.yaml"


def data_overrides(data: str, per_class: str) -> list[str]:
    sets = ["data.test_limit=null", "data.train_limit=null"]
    if data != "fashion_mnist":
        sets += ["data.source=image_folder", f"data.data_dir={data}", "data.test_split=0.25"]
    if per_class != "full":
        sets.append(f"data.train_per_class={per_class}")
    return sets


def run_recipe(path: Path, overrides: list[str]) -> dict:
    import keras

    import finetune

    keras.backend.clear_session()
    recipe = finetune.load_recipe(path, overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-small-data-") as folder:
        result = finetune.run(recipe, out=Path(folder) / "run", log=lambda line: None)
        warnings = result.metrics.get("warnings", [])
    return {
        "test_accuracy": result.test_accuracy,
        "test_images": result.metrics["test"].get("examples"),
        "train_images": result.metrics["train_images"],
        "epochs": _epochs(result.history),
        "seconds": round(time.perf_counter() - started, 1),
        "warnings": [item["message"] for item in warnings],
    }


def _epochs(history: list[dict]) -> dict:
    counts: dict[str, int] = {}
    for row in history:
        counts[row["phase"]] = counts.get(row["phase"], 0) + 1
    return counts


def logistic_regression(path: Path, overrides: list[str]) -> dict:
    """scikit-learn's LogisticRegression on the raw pixels of the recipe's own train and test images."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    import finetune
    from finetune.plan import prepare
    from finetune.runner.session import load_data

    _, plan = prepare(finetune.load_recipe(path, overrides))
    dataset = load_data(plan)
    train_x = np.concatenate(
        [dataset.train.images, *([dataset.validation.images] if dataset.validation is not None else [])]
    )
    train_y = np.concatenate(
        [dataset.train.labels, *([dataset.validation.labels] if dataset.validation is not None else [])]
    )
    started = time.perf_counter()
    model = LogisticRegression(max_iter=2000)
    model.fit(train_x.reshape(len(train_x), -1) / 255.0, train_y)
    accuracy = float(
        model.score(np.asarray(dataset.test.images).reshape(len(dataset.test), -1) / 255.0, dataset.test.labels)
    )
    return {"test_accuracy": accuracy, "train_images": len(train_x), "seconds": round(time.perf_counter() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--per-class", nargs="+", default=["10", "100"])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--baselines", action="store_true")
    parser.add_argument("--no-recipe", action="store_true", help="the baselines alone")
    parser.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every run that changes no result (export.formats=[keras] where TensorFlow is missing)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for per_class in args.per_class:
        overrides = [*data_overrides(args.data, per_class), *args.extra]
        jobs = [] if args.no_recipe else [(args.recipe.stem, lambda o=overrides: run_recipe(args.recipe, o))]
        if args.baselines:
            jobs += [
                ("logistic_regression", lambda o=overrides: logistic_regression(args.recipe, o)),
                ("mlp_from_scratch", lambda o=overrides: run_recipe(MLP, [*o, *_mlp_image_size(args.data)])),
            ]
        for name, job in jobs:
            row = {"model": name, "data": args.data, "per_class": per_class, "sets": args.extra, **job()}
            line = json.dumps(row)
            print(line, flush=True)
            if args.out is not None:
                with args.out.open("a") as handle:
                    handle.write(line + "\n")
    return 0


def _mlp_image_size(data: str) -> list[str]:
    """The dense network reads the images at their stored size (28 for Fashion-MNIST, the folder's at 28 too)."""
    return [] if data == "fashion_mnist" else ["data.image_size=28"]


if __name__ == "__main__":
    raise SystemExit(main())
