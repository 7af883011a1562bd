"""Rare classes on real images: class weights and balanced sampling against an unweighted run.

    python3 scripts/rare_classes_table.py [--work DIR] [--rare 3 8] [--keep 0.05] [--recipe RECIPE]
                                          [--out rows.jsonl]

Writes scikit-learn's 1,797 handwritten digits as one flat folder and a labels table with a split
column (``scripts/digits_folder.py --csv``): a stratified quarter of each digit is the test split
(balanced, about 45 per digit, seed 0), and the training rows of the ``--rare`` digits are cut to
``--keep`` of their number (5%: 7 of about 135), so the common digits outnumber them about 20 to 1.
Then runs RECIPE (default ``recipes/csv_example.yaml``, unchanged but for its data file) three times,
as ``finetune run`` would: ``training.class_weight`` none and balanced, and ``data.sampling:
balanced``; and scores scikit-learn's ``LogisticRegression`` (plain and ``class_weight="balanced"``)
on the raw pixels of the very training and test images the runs used. Prints a table of accuracy,
macro-F1 and each rare digit's recall; one JSON line per result goes to ``--out`` (appended).
"""

from __future__ import annotations

import argparse
import csv
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
sys.path.insert(0, str(ROOT / "scripts"))

SETTINGS = {
    "class_weight: none": ["training.class_weight=none"],
    "class_weight: balanced": ["training.class_weight=balanced"],
    "sampling: balanced": ["data.sampling=balanced"],
}


def write_table(work: Path, rare: list[str], keep: float, seed: int = 0) -> Path:
    """The digits' labels.csv with a split column: a balanced test quarter, the rare digits' training rows cut."""
    from digits_folder import write_digits_csv

    table = work / "labels.csv"
    if not table.exists():
        write_digits_csv(work)
    with table.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row["label"]]
    rng = np.random.default_rng(seed)
    kept = []
    for label in sorted({row["label"] for row in rows}):
        mine = [row for row in rows if row["label"] == label]
        order = rng.permutation(len(mine))
        test_count = round(len(mine) * 0.25)
        train = [mine[index] for index in order[test_count:]]
        if label in rare:
            train = train[: max(1, round(len(train) * keep))]
        kept += [{**mine[index], "split": "test"} for index in order[:test_count]]
        kept += [{**row, "split": "train"} for row in train]
    imbalanced = work / "labels_rare.csv"
    with imbalanced.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "label", "split"])
        writer.writeheader()
        writer.writerows({key: row[key] for key in ("image", "label", "split")} for row in kept)
    return imbalanced


def run_setting(recipe_path: Path, table: Path, overrides: list[str], rare: list[str]) -> tuple[dict, object]:
    import keras

    import finetune

    keras.backend.clear_session()
    recipe = finetune.load_recipe(
        recipe_path, [f"data.data_dir={table}", "data.columns={image: image, label: label, split: split}", *overrides]
    )
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-rare-") as folder:
        result = finetune.run(recipe, out=Path(folder) / "run", log=lambda line: None)
    test = result.metrics["test"]
    row = {
        "accuracy": test["accuracy"],
        "macro_f1": test["macro_f1"],
        "balanced_accuracy": test["balanced_accuracy"],
        "rare_recall": {name: test["per_class"][name]["recall"] for name in rare},
        "train_images": result.metrics["train_images"],
        "seconds": round(time.perf_counter() - started, 1),
        "warnings": [item["message"] for item in result.metrics.get("warnings", [])],
    }
    return row, recipe


def logistic_rows(recipe, rare: list[str]) -> dict[str, dict]:
    """scikit-learn's LogisticRegression on the raw pixels of the runs' own training and test images."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score, recall_score

    from finetune import data

    dataset = data.load_dataset(recipe.data, recipe.seed)

    def pixels(split) -> np.ndarray:
        return np.asarray(split.images, dtype=np.float32).reshape(len(split.labels), -1) / 255.0

    names = list(dataset.class_names)
    train_x, train_y = pixels(dataset.train), np.asarray(dataset.train.labels)
    test_x, test_y = pixels(dataset.test), np.asarray(dataset.test.labels)
    rows = {}
    for weighting in (None, "balanced"):
        model = LogisticRegression(max_iter=2000, class_weight=weighting).fit(train_x, train_y)
        predicted = model.predict(test_x)
        recalls = recall_score(test_y, predicted, average=None, labels=range(len(names)), zero_division=0)
        rows[f"LogisticRegression(class_weight={weighting!r})"] = {
            "accuracy": float(np.mean(predicted == test_y)),
            "macro_f1": float(f1_score(test_y, predicted, average="macro")),
            "balanced_accuracy": float(balanced_accuracy_score(test_y, predicted)),
            "rare_recall": {name: float(recalls[names.index(name)]) for name in rare},
            "train_images": len(train_y),
        }
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "finetune-rare-digits")
    parser.add_argument("--rare", nargs="+", default=["3", "8"])
    parser.add_argument("--keep", type=float, default=0.05, help="share of the rare digits' training rows kept")
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "csv_example.yaml")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = write_table(args.work, args.rare, args.keep)
    print(f"table: {table}", file=sys.stderr, flush=True)
    results: dict[str, dict] = {}
    recipe = None
    for name, overrides in SETTINGS.items():
        results[f"{args.recipe.name}, {name}"], recipe = run_setting(args.recipe, table, overrides, args.rare)
        print(name, json.dumps(results[f"{args.recipe.name}, {name}"]), file=sys.stderr, flush=True)
    results.update(logistic_rows(recipe, args.rare))
    if args.out:
        with args.out.open("a") as handle:
            for name, row in results.items():
                handle.write(json.dumps({"setting": name, "rare": args.rare, "keep": args.keep, **row}) + "\n")
    rare_columns = " | ".join(f"recall of {name}" for name in args.rare)
    print(f"| setting | accuracy | macro-F1 | balanced accuracy | {rare_columns} |")
    print("| --- | --- | --- | --- |" + " --- |" * len(args.rare))
    for name, row in results.items():
        recalls = " | ".join(f"{row['rare_recall'][label]:.3f}" for label in args.rare)
        print(
            f"| {name} | {row['accuracy']:.4f} | {row['macro_f1']:.4f} | {row['balanced_accuracy']:.4f} | {recalls} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
