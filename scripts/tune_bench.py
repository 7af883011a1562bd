"""`finetune tune` measured: pruning's savings, memory across trials, two workers against one.

    python3 scripts/tune_bench.py [--trials 20] [--worker-trials 8] [--out rows.jsonl]

On a small recipe (the mlp backbone, 600 Fashion-MNIST images, 6 epochs) and a three-key space, in a
temporary folder:

1. the same seeded study of ``--trials`` trials with ``--pruner median`` and ``--pruner none``: the
   trial-epochs each spent (rows of the trials' history.csv) and the best value each reached;
2. resident memory after trial 2 and after the last trial of the unpruned study (``user_attrs.rss_mb``);
3. a ``--worker-trials`` study with ``--workers 1`` and ``--workers 2``: wall time, and whether any trial
   number ran twice.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "name": "tune_bench",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.2,
        "train_limit": 600,
        "test_limit": 200,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [64]}}, "head": {}},
    "training": {"batch_size": 32, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
    "export": {"formats": ["keras"]},
    "phases": [
        {"name": "train", "epochs": 6, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 1e-3}}
    ],
}
SPACE = {
    "phases.train.optimizer.learning_rate": {"low": 1e-5, "high": 3e-1, "log": True},
    "model.head.dropout": {"low": 0.0, "high": 0.6},
    "training.batch_size": [16, 32, 64],
}


def study(folder: Path, *arguments: str) -> tuple[float, list]:
    import optuna

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "finetune", "tune", str(folder.parent / "base.yaml"), "--space",
         str(folder.parent / "space.yaml"), "--out", str(folder), "--quiet", *arguments],
        check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    trials = optuna.load_study(study_name="finetune", storage=f"sqlite:///{folder / 'study.db'}").get_trials()
    return seconds, trials


def trial_epochs(folder: Path) -> int:
    return sum(
        max(len((run / "history.csv").read_text().splitlines()) - 1, 0)
        for run in (folder / "trials").iterdir()
        if (run / "history.csv").is_file()
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--worker-trials", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="finetune-tune-bench-") as scratch:
        root = Path(scratch)
        (root / "base.yaml").write_text(yaml.safe_dump(BASE))
        (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
        for pruner in ("median", "none"):
            seconds, trials = study(root / pruner, "--trials", str(args.trials), "--pruner", pruner, "--seed", "3")
            complete = [trial.value for trial in trials if trial.state.name == "COMPLETE"]
            row = {
                "study": f"pruner {pruner}",
                "trials": len(trials),
                "pruned": sum(trial.state.name == "PRUNED" for trial in trials),
                "trial_epochs": trial_epochs(root / pruner),
                "best_val_accuracy": round(max(complete), 4),
                "seconds": round(seconds, 1),
                "rss_mb_after_trial_2": trials[1].user_attrs.get("rss_mb"),
                f"rss_mb_after_trial_{len(trials)}": trials[-1].user_attrs.get("rss_mb"),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
        for workers in (1, 2):
            name = f"workers{workers}"
            seconds, trials = study(
                root / name, "--trials", str(args.worker_trials), "--pruner", "none", "--workers", str(workers)
            )
            numbers = [trial.number for trial in trials]
            folders = sorted(path.name for path in (root / name / "trials").iterdir())
            row = {
                "study": f"--workers {workers}",
                "trials": len(trials),
                "seconds": round(seconds, 1),
                "numbers_distinct": len(numbers) == len(set(numbers)),
                "one_folder_per_trial": folders == [f"{number:04d}" for number in sorted(numbers)],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
