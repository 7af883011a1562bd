"""Several labels per image, on real pictures: a transfer recipe against the chapter's dense network.

    python3 scripts/multilabel_table.py [--work DIR] [--train 4000] [--validation 500] [--test 1000]
                                        [--recipe RECIPE] [--out rows.jsonl]

Makes a multi-label set from real Fashion-MNIST images (the IDX files finetune reads): each picture
is a 2x2 grid of 28x28 cells (56x56, grey) in which 1 to 3 random cells hold a random Fashion-MNIST
item, and its tags are the distinct classes of the items in it (so 1 to 3 tags of 10). Training and
validation pictures are built from the training images, test pictures from the test images, so no
item is seen in both. They are written as PNG files and one ``labels.csv`` (``image,label,split``,
tags joined by ``|``). Then runs, as ``finetune run`` would, RECIPE (default
``recipes/csv_example.yaml``: EfficientNet-Lite0 transfer) and the chapter's dense network from
scratch (``recipes/ch11_one_cycle.yaml``), each with ``data.source=csv`` and
``data.label_delimiter="|"``, and prints micro-F1, macro-F1, mean average precision and exact match
at the thresholds chosen on the validation split, and micro-F1 and exact match at 0.5 for every tag
(the same model's test probabilities). One JSON line per result goes to ``--out`` (appended).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without `pip install -e .`

DENSE = ROOT / "recipes" / "ch11_one_cycle.yaml"


def write_mosaics(work: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """The pictures under ``work/images`` and ``work/labels.csv``; returns the table's path."""
    from PIL import Image

    from finetune.data.sources.fashion_mnist import load_fashion_mnist
    from finetune.recipe import DataConfig

    table = work / "labels.csv"
    if table.exists():
        return table
    train, test, class_names, _ = load_fashion_mnist(DataConfig(source="fashion_mnist"))
    (train_x, train_y), (test_x, test_y) = (train.images, train.labels), (test.images, test.labels)
    rng = np.random.default_rng(seed)
    (work / "images").mkdir(parents=True, exist_ok=True)
    rows = ["image,label,split"]
    for split, count in counts.items():
        pool_x, pool_y = (test_x, test_y) if split == "test" else (train_x, train_y)
        for number in range(count):
            picture = np.zeros((56, 56), dtype=np.uint8)
            cells = rng.permutation(4)[: int(rng.integers(1, 4))]
            tags = set()
            for cell in cells:
                item = int(rng.integers(len(pool_y)))
                top, left = 28 * (cell // 2), 28 * (cell % 2)
                picture[top : top + 28, left : left + 28] = pool_x[item].reshape(28, 28)
                tags.add(class_names[int(pool_y[item])])
            name = f"images/{split}_{number:05d}.png"
            Image.fromarray(picture, mode="L").save(work / name)
            rows.append(f"{name},{'|'.join(sorted(tags))},{split}")
    table.write_text("\n".join(rows) + "\n")
    return table


def run_recipe(recipe_path: Path, table: Path, overrides: list[str]) -> dict:
    import keras

    import finetune
    from finetune import data
    from finetune.evaluation.metrics import predict_view
    from finetune.evaluation.multilabel import multi_label_metrics

    keras.backend.clear_session()
    recipe = finetune.load_recipe(
        recipe_path,
        [
            "data.source=csv",
            f"data.data_dir={table}",
            "data.columns={image: image, label: label, split: split}",
            'data.label_delimiter="|"',
            "data.train_limit=null",
            "data.test_limit=null",
            *overrides,
        ],
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-multilabel-") as folder:
        result = finetune.run(recipe, out=Path(folder) / "run", log=lambda line: None)
    seconds = round(time.perf_counter() - started, 1)
    test = result.metrics["test"]
    dataset = data.load_dataset(recipe.data, recipe.seed)
    probabilities = predict_view(result.model, dataset.test.images, 256)
    at_half = multi_label_metrics(
        probabilities, np.asarray(dataset.test.labels), dataset.class_names, np.full(len(dataset.class_names), 0.5)
    )
    return {
        "micro_f1": test["micro_f1"],
        "macro_f1": test["macro_f1"],
        "mean_average_precision": test["mean_average_precision"],
        "exact_match": test["exact_match"],
        "thresholds_chosen_on": test["thresholds_chosen_on"],
        "micro_f1_at_0.5": at_half["micro_f1"],
        "macro_f1_at_0.5": at_half["macro_f1"],
        "exact_match_at_0.5": at_half["exact_match"],
        "train_images": result.metrics["train_images"],
        "test_images": test["examples"],
        "seconds": seconds,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finetune-fmnist-mosaics")
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--validation", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "csv_example.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    counts = {"train": args.train, "validation": args.validation, "test": args.test}
    table = write_mosaics(args.work, counts)
    print(f"table: {table}", file=sys.stderr, flush=True)
    runs = {
        f"{args.recipe.stem} (transfer)": (args.recipe, []),
        "ch11_one_cycle (dense network, from scratch)": (DENSE, ["data.image_size=56"]),
    }
    results = {}
    for name, (path, overrides) in runs.items():
        results[name] = run_recipe(path, table, overrides)
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps({"recipe": name, **counts, **results[name]}) + "\n")
    print("| recipe | micro-F1 | macro-F1 | mAP | exact match | micro-F1 at 0.5 | exact match at 0.5 | seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, row in results.items():
        print(
            f"| {name} | {row['micro_f1']:.4f} | {row['macro_f1']:.4f} | {row['mean_average_precision']:.4f} | "
            f"{row['exact_match']:.4f} | {row['micro_f1_at_0.5']:.4f} | {row['exact_match_at_0.5']:.4f} | "
            f"{row['seconds']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
