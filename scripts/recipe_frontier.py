"""Accuracy against wall time for settings of one recipe: each a whole `finetune run` process, one after another.

    python3 scripts/recipe_frontier.py RECIPE --try "NAME: KEY=VALUE KEY=VALUE ..." [--try ...]
                                       [--work DIR] [--out rows.jsonl] [--keep]

Each ``--try`` runs ``finetune run RECIPE --set KEY=VALUE ...`` under ``/usr/bin/time -v`` (an empty
list of settings runs the recipe unchanged) and records its test accuracy (metrics.json), wall
seconds, peak RSS, the largest amount of cached features it wrote to disk (from the run log's
"MB in disk" lines) and its phases' timing lines. The runs share the machine with nothing of this
script's; run it on an otherwise idle machine for times that mean something. One JSON line per run
goes to ``--out`` (appended), and a Markdown table to stdout. The run folders are deleted unless
``--keep``.

For the Xception recipe, the ImageNet weights file must be where finetune finds it
(``$FINETUNE_WEIGHTS_DIR`` or Keras's cache); see the README.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_try(text: str) -> tuple[str, list[str]]:
    name, _, settings = text.partition(":")
    return name.strip(), settings.split()


def run_once(recipe: Path, settings: list[str], folder: Path) -> dict:
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "finetune", "run", str(recipe), "--out", str(folder)]
    for setting in settings:
        command += ["--set", setting]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = done.stderr
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", log)
    row: dict = {
        "settings": settings,
        "returncode": done.returncode,
        "wall_s": round(wall, 1),
        "peak_rss_gb": round(int(peak.group(1)) / 1024**2, 2) if peak else None,
        "cached_on_disk_mb": max([float(m.replace(",", "")) for m in re.findall(r"([\d,]+) MB in disk", log)] or [0]),
        "phase_lines": [line for line in log.splitlines() if re.search(r"phase \w+:|epoch \d+", line)][-40:],
    }
    metrics = folder / "metrics.json"
    if metrics.is_file():
        test = json.loads(metrics.read_text())["test"]
        row["test_accuracy"] = test.get("accuracy")
        row["macro_f1"] = test.get("macro_f1")
    else:
        row["error"] = log.strip().splitlines()[-25:]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--try", dest="tries", action="append", required=True, help='"NAME: KEY=VALUE ..."')
    parser.add_argument("--work", type=Path, default=Path("/tmp/finetune-frontier"))
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    args = parser.parse_args()
    rows = []
    for text in args.tries:
        name, settings = parse_try(text)
        folder = args.work / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
        shutil.rmtree(folder, ignore_errors=True)
        row = {"name": name, "recipe": str(args.recipe), **run_once(args.recipe.resolve(), settings, folder)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print("| setting | test accuracy | wall (min) | peak RSS (GB) | features on disk (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        accuracy = f"{row['test_accuracy']:.4f}" if row.get("test_accuracy") is not None else "failed"
        print(
            f"| {row['name']} | {accuracy} | {row['wall_s'] / 60:.1f} | {row['peak_rss_gb']} | "
            f"{row['cached_on_disk_mb']:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
