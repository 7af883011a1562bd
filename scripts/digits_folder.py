"""Write scikit-learn's 1,797 real handwritten digits (8x8, 17 grey levels) as class folders of PNG files.

A small real image set that is not Fashion-MNIST, for trying recipes off their beaten path:

    python3 scripts/digits_folder.py /tmp/digits
    finetune run recipes/quickstart_lite0.yaml --set data.source=image_folder \\
        --set data.data_dir=/tmp/digits --set data.test_split=0.25
    python3 scripts/digits_folder.py /tmp/digits_csv --csv      # the same images as a labels table
    finetune run recipes/csv_example.yaml --set data.data_dir=/tmp/digits_csv/labels.csv \\
        --set data.test_split=0.25

Each digit is saved at 8x8 (values 0-16 scaled to 0-255, white ink on black, as Fashion-MNIST's
objects are light on dark); the image folder source resizes it to the recipe's size once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def write_digits(out: Path, per_class: int | None = None) -> int:
    """The digits under ``out/0`` .. ``out/9``; ``per_class`` keeps the first that many of each. Returns the count."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    written = 0
    for label in range(10):
        folder = out / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(digits.target == label)[:per_class]
        for number, row in enumerate(rows):
            pixels = np.clip(np.rint(digits.images[row] * 255.0 / 16.0), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{label}_{number:04d}.png")
            written += 1
    return written


def write_digits_csv(out: Path) -> int:
    """The digits as one flat folder ``out/images`` and a table ``out/labels.csv`` (image, label), in the same
    order as the class folders' sorted files, so both sources read the same images with the same labels."""
    import csv
    import shutil

    folders = out / "_by_class"
    written = write_digits(folders)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as handle:
        table = csv.writer(handle)
        table.writerow(["image", "label"])
        for path in sorted(folders.glob("*/*.png")):
            shutil.move(str(path), out / "images" / path.name)
            table.writerow([f"images/{path.name}", path.parent.name])
    shutil.rmtree(folders)
    return written


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=None, help="keep this many images of each digit")
    parser.add_argument("--csv", action="store_true", help="one flat folder and labels.csv instead of class folders")
    args = parser.parse_args()
    count = write_digits_csv(args.out) if args.csv else write_digits(args.out, args.per_class)
    print(f"{count} digits written under {args.out}" + (f" (table {args.out / 'labels.csv'})" if args.csv else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
