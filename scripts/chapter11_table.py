"""Run every chapter-11 MLP recipe on full Fashion-MNIST and print a results table.

    python3 scripts/chapter11_table.py [--out runs/chapter11-TIME] [--set KEY=VALUE ...]

Each recipe runs as its own `finetune run` process; the table (markdown) gives
the test accuracy and loss from its metrics.json and the wall time of the
process. Recipes that need ImageNet weights are skipped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--only", nargs="*", default=None, help="recipe names to run")
    args = parser.parse_args()
    out = args.out or ROOT / "runs" / f"chapter11-{datetime.now():%Y%m%d-%H%M%S}"
    recipes = sorted((ROOT / "recipes").glob("ch11_*.yaml"))
    rows = []
    for recipe in recipes:
        if "weights: imagenet" in recipe.read_text() or (args.only and recipe.stem not in args.only):
            continue
        command = [sys.executable, "-m", "finetune", "run", str(recipe), "--out", str(out / recipe.stem)]
        for override in args.overrides:
            command += ["--set", override]
        started = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            rows.append((recipe.stem, "failed", "", f"{seconds:.0f}", result.stderr.strip().splitlines()[-1]))
        else:
            metrics = json.loads((out / recipe.stem / "metrics.json").read_text())["test"]
            extra = ""
            if "mc_dropout" in metrics:
                mc = metrics["mc_dropout"]
                extra = (
                    f"single pass {mc['accuracy_single_pass']:.4f}; "
                    f"mean predictive entropy {mc['mean_predictive_entropy']:.3f}"
                )
            rows.append((recipe.stem, f"{metrics['accuracy']:.4f}", f"{metrics['loss']:.4f}", f"{seconds:.0f}", extra))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    print("| recipe | test accuracy | test loss | wall s | notes |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0 if all(row[1] != "failed" for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
