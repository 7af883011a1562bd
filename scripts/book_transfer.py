"""Reproduce the book's transfer-learning experiment over several seeds.

    python3 scripts/book_transfer.py [--seeds 5] [--out runs/book_transfer-TIME]

Hands-On ML (2nd ed.), ch. 11: model A learns 8 Fashion-MNIST classes; model B
learns sandal vs. shirt from 200 images, once from scratch and once on A's
hidden layers. For each seed the three recipes in recipes/book_transfer_*.yaml
run in that order (B on A reuses that seed's A), each as its own
`finetune run` process with `--set seed=S`. Prints a markdown table of the test
accuracies (per seed, mean, standard deviation, min, max) beside the book's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BOOK = {"b_scratch": 0.9705, "b_on_a": 0.9925}  # 2nd edition, ch. 11


def run(recipe: str, out: Path, overrides: list[str]) -> dict:
    command = [sys.executable, "-m", "finetune", "run", str(ROOT / "recipes" / f"{recipe}.yaml"), "--out", str(out)]
    for override in overrides:
        command += ["--set", override]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{recipe} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
    metrics = json.loads((out / "metrics.json").read_text())["test"]
    return {
        "accuracy": metrics["accuracy"],
        "examples": metrics["examples"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / f"book_transfer-{datetime.now():%Y%m%d-%H%M%S}"
    results: dict[str, list[dict]] = {"a": [], "b_scratch": [], "b_on_a": []}
    for seed in range(args.seeds):
        folder = out / f"seed{seed}"
        seed_set = [f"seed={seed}"]
        results["a"].append(run("book_transfer_a", folder / "a", seed_set))
        results["b_scratch"].append(run("book_transfer_b_scratch", folder / "b_scratch", seed_set))
        results["b_on_a"].append(
            run("book_transfer_b_on_a", folder / "b_on_a", [*seed_set, f"model.backbone.path={folder / 'a'}"])
        )
        print(
            f"seed {seed}: "
            + ", ".join(
                f"{key} {rows[-1]['accuracy']:.4f} ({rows[-1]['seconds']:.0f}s)" for key, rows in results.items()
            ),
            file=sys.stderr,
            flush=True,
        )
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")

    labels = {
        "a": "A: 8 classes, 20 epochs",
        "b_scratch": "B from scratch (200 images)",
        "b_on_a": "B on A (200 images)",
    }
    print(f"| model | test images | book | mean over {args.seeds} seeds | std | min | max | per seed |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, rows in results.items():
        values = [row["accuracy"] for row in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        book = f"{BOOK[key]:.2%}" if key in BOOK else "-"
        print(
            f"| {labels[key]} | {rows[0]['examples']} | {book} | {statistics.mean(values):.2%} | "
            f"{spread:.2%} | {min(values):.2%} | {max(values):.2%} | "
            + ", ".join(f"{value:.4f}" for value in values)
            + " |"
        )
    gains = [b["accuracy"] - s["accuracy"] for b, s in zip(results["b_on_a"], results["b_scratch"], strict=True)]
    print(
        "\nB on A minus B from scratch, per seed: "
        + ", ".join(f"{gain:+.2%}" for gain in gains)
        + f" (book: {BOOK['b_on_a'] - BOOK['b_scratch']:+.2%}); results in {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
