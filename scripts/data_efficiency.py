"""Where transfer pays: test accuracy against the number of training images.

    python3 scripts/data_efficiency.py [--per-class 10 100 1000 full] [--seeds 3] [--large-seeds 1]
                                       [--models transfer scratch mlp] [--set KEY=VALUE]...
                                       [--out docs/data_efficiency]

Three models, each trained on N images per class (stratified, seeded) and
tested on the full 10,000-image Fashion-MNIST test set:

* transfer: ``recipes/quickstart_lite0.yaml`` as shipped (EfficientNet-Lite0
  with its ImageNet weights);
* scratch: the same recipe, backbone and time budget from random weights
  (BatchNorm trains, as a from-scratch network needs);
* mlp: ``recipes/ch11_one_cycle.yaml``, the chapter's best dense network.

Every run uses all of its images for training (no validation hold-out). A
phase gets at least ``--min-steps`` optimizer steps (more epochs on small
sets), so ten images per class are not judged after three steps. Sizes under
1,000 per class run ``--seeds`` seeds (mean and half the range), larger ones
and the full set ``--large-seeds``.
Writes ``OUT.json``, ``OUT.md`` (the table) and ``OUT.png`` (accuracy against
images per class, log scale).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "transfer": ("recipes/quickstart_lite0.yaml", []),
    "scratch": ("recipes/quickstart_lite0.yaml", ["model.backbone.weights=null"]),
    "mlp": ("recipes/ch11_one_cycle.yaml", []),
}
FULL_TRAIN_IMAGES = 60000


def recipe_for(model: str, per_class: str, seed: int, min_steps: int, backbone_overrides=()):
    import finetune
    from finetune.recipe import read_recipe

    path, overrides = MODELS[model]
    overrides = [
        *overrides,
        *(backbone_overrides if model != "mlp" else ()),
        f"seed={seed}",
        "data.validation_split=0",
        "data.train_limit=null",
        "data.test_limit=null",
        "export.formats=[keras]",
        "training.verbose=0",
    ]
    if per_class != "full":
        overrides.append(f"data.train_per_class={per_class}")
    recipe = read_recipe(ROOT / path, overrides)
    images = FULL_TRAIN_IMAGES if per_class == "full" else 10 * int(per_class)
    for phase in recipe.phases:
        if model == "scratch":
            phase.train_bn = True  # random BatchNorm statistics must be learned
        steps = math.ceil(images / recipe.training.batch_size_for(phase))
        phase.epochs = max(phase.epochs, math.ceil(min_steps / steps)) if phase.epochs else 0
    return finetune.load_recipe(recipe)


def measure(model: str, per_class: str, seed: int, min_steps: int, backbone_overrides=()) -> dict:
    import keras

    import finetune

    keras.backend.clear_session()
    recipe = recipe_for(model, per_class, seed, min_steps, backbone_overrides)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="finetune-efficiency-") as folder:
        result = finetune.run(recipe, out=Path(folder) / "run", log=lambda line: None)
    return {
        "model": model,
        "per_class": per_class,
        "seed": seed,
        "epochs": [phase.epochs for phase in recipe.phases],
        "test_accuracy": result.test_accuracy,
        "seconds": round(time.perf_counter() - started, 1),
        **({"set": list(backbone_overrides)} if backbone_overrides and model != "mlp" else {}),
    }


def summarize(rows: list[dict]) -> dict:
    table: dict = {}
    for row in rows:
        table.setdefault(row["model"], {}).setdefault(row["per_class"], []).append(row["test_accuracy"])
    return {
        model: {
            size: {
                "mean": statistics.fmean(values),
                "spread": (max(values) - min(values)) / 2 if len(values) > 1 else 0.0,
                "seeds": len(values),
            }
            for size, values in sizes.items()
        }
        for model, sizes in table.items()
    }


def markdown(summary: dict, sizes: list[str]) -> str:
    header = "| model | " + " | ".join(f"{s} per class" if s != "full" else "full set" for s in sizes) + " |"
    lines = [header, "|---" * (len(sizes) + 1) + "|"]
    for model, cells in summary.items():
        values = []
        for size in sizes:
            cell = cells.get(size)
            if cell is None:
                values.append("-")
            elif cell["seeds"] > 1:
                values.append(f"{cell['mean']:.3f} ± {cell['spread']:.3f} ({cell['seeds']} seeds)")
            else:
                values.append(f"{cell['mean']:.3f}")
        lines.append(f"| {model} | " + " | ".join(values) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Accuracy against images per class (log scale), one line per model, drawn with Pillow."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, margin = 720, 460, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=14)
    points = {
        model: sorted((6000 if size == "full" else int(size), cell["mean"]) for size, cell in cells.items())
        for model, cells in summary.items()
    }
    xs = [x for line in points.values() for x, _ in line]
    low_acc = math.floor(min(y for line in points.values() for _, y in line) * 10) / 10
    x_lo, x_hi = math.log10(min(xs)), math.log10(max(xs))

    def to_pixel(x, y):
        px = margin + (math.log10(x) - x_lo) / max(x_hi - x_lo, 1e-9) * (width - 2 * margin)
        py = height - margin - (y - low_acc) / (1.0 - low_acc) * (height - 2 * margin)
        return px, py

    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for tick in range(int(low_acc * 10), 11):
        _, py = to_pixel(min(xs), tick / 10)
        draw.line([margin, py, width - margin, py], fill="#dddddd")
        draw.text((margin - 40, py - 7), f"{tick / 10:.1f}", fill="black", font=font)
    for x in sorted(set(xs)):
        px, _ = to_pixel(x, low_acc)
        draw.text((px - 14, height - margin + 6), "full" if x == 6000 else str(x), fill="black", font=font)
    colours = {"transfer": "#1f77b4", "scratch": "#d62728", "mlp": "#2ca02c"}
    for index, (model, line) in enumerate(points.items()):
        colour = colours.get(model, "black")
        pixels = [to_pixel(x, y) for x, y in line]
        draw.line(pixels, fill=colour, width=3)
        for px, py in pixels:
            draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        draw.text((margin + 10, margin + 8 + 18 * index), model, fill=colour, font=font)
    draw.text((width // 2 - 120, height - 30), "training images per class (log scale)", fill="black", font=font)
    draw.text((10, 10), "Fashion-MNIST test accuracy (10,000 images)", fill="black", font=font)
    image.save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", nargs="+", default=["10", "100", "1000", "full"])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--large-seeds", type=int, default=1, help="seeds for 1,000 per class and more")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--min-steps", type=int, default=200)
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a recipe override for transfer and scratch (the same backbone), e.g. model.backbone.cut_at=block5c",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "data_efficiency")
    parser.add_argument("--from-rows", type=Path, help="only redraw the table and plot from a log of printed rows")
    args = parser.parse_args()
    rows = []
    if args.from_rows:
        lines = args.from_rows.read_text().splitlines()
        rows = [json.loads(line) for line in lines if line.startswith("{")]
        args.per_class = [size for size in args.per_class if any(row["per_class"] == size for row in rows)]
    for size in [] if args.from_rows else args.per_class:
        for model in args.models:
            large = size == "full" or int(size) >= 1000
            for seed in range(args.large_seeds if large else args.seeds):
                row = measure(model, size, seed, args.min_steps, args.overrides)
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarize(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(summary, args.per_class))
    plot(summary, args.out.with_suffix(".png"))
    print(markdown(summary, args.per_class))
    return 0


if __name__ == "__main__":
    sys.exit(main())
