"""What a kill costs: a run killed with SIGKILL mid-training, then `finetune resume`, against the same run left alone.

    python3 scripts/resume_check.py RECIPE [--set KEY=VALUE]... [--kill-after-epochs 2] [--out /tmp/resume-check]

Runs RECIPE three ways as whole `finetune` processes, one after the other:
uninterrupted; killed (SIGKILL) once ``--kill-after-epochs`` rows are in
history.csv; and that killed folder resumed. Prints the epochs finished
before the kill, the epochs the checkpoint held (the difference is the work
lost), the wall time of each process, the resume's overhead (killed + resumed
minus uninterrupted, minus the lost epochs' time) and both test accuracies.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def finetune(*args: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    log = (out.parent / f"{out.name}.{args[0]}.log").open("w")
    return subprocess.Popen([sys.executable, "-m", "finetune", *args], stdout=log, stderr=log, env=env, cwd=ROOT)


def rows(run_dir: Path) -> list[dict]:
    path = run_dir / "history.csv"
    if not path.exists():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def timed(process: subprocess.Popen) -> float:
    started = time.perf_counter()
    process.wait()
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--kill-after-epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("/tmp/resume-check"))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    sets = [item for pair in args.overrides for item in ("--set", pair)]
    alone, killed = args.out / "alone", args.out / "killed"

    alone_seconds = timed(finetune("run", args.recipe, *sets, "--out", str(alone), out=alone))
    started = time.perf_counter()
    process = finetune("run", args.recipe, *sets, "--out", str(killed), out=killed)
    while len(rows(killed)) < args.kill_after_epochs:
        if process.poll() is not None:
            raise SystemExit("the run ended before the kill; lower --kill-after-epochs")
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_seconds = time.perf_counter() - started
    finished_before_kill = len(rows(killed))
    saved = json.loads((killed / "state.json").read_text())["epochs_done"]
    resumed_seconds = timed(finetune("resume", str(killed), out=killed))
    epoch_seconds = {int(row["epoch"]): float(row["seconds"]) for row in rows(alone)}
    lost = sum(epoch_seconds[epoch] for epoch in range(saved + 1, finished_before_kill + 1))
    accuracy = {
        name: json.loads((folder / "metrics.json").read_text())["test"]["accuracy"]
        for name, folder in (("alone", alone), ("resumed", killed))
    }
    report = {
        "epochs_finished_before_kill": finished_before_kill,
        "epochs_in_checkpoint": saved,
        "epochs_lost": finished_before_kill - saved,
        "seconds_uninterrupted": round(alone_seconds, 1),
        "seconds_killed_run": round(killed_seconds, 1),
        "seconds_resume": round(resumed_seconds, 1),
        "resume_overhead_seconds": round(killed_seconds + resumed_seconds - alone_seconds - lost, 1),
        "test_accuracy": accuracy,
        "status": json.loads((killed / "run.json").read_text())["status"],
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
