"""One process against two MultiWorkerMirroredStrategy workers on this machine, same recipe, same global batch.

    python3 scripts/distributed_bench.py [--train 2000] [--epochs 2] [--batch 64]

Both runs train the mlp backbone on Fashion-MNIST with global batch ``--batch`` (the two workers at half of it
per replica), and the script prints wall time (whole command, start-up included), training seconds (history.csv)
and training images per second side by side. Workers talk over 127.0.0.1 ports chosen free at start.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def recipe(train: int, epochs: int) -> dict:
    return {
        "name": "distributed_bench",
        "seed": 0,
        "precision": "float32",
        "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.1, "train_limit": train},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [300, 100]}}},
        "training": {"verbose": 0, "tensorboard": False, "gradient_health_every": 0},
        "phases": [
            {"name": "train", "epochs": epochs, "trainable": "all", "optimizer": {"name": "sgd", "learning_rate": 0.05}}
        ],
        "export": {"formats": ["keras"]},
    }


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def launch(path: Path, out: Path, batch: int, strategy: str, tf_config: str | None, log: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    env.pop("TF_CONFIG", None)
    if tf_config:
        env["TF_CONFIG"] = tf_config
    command = [sys.executable, "-m", "finetune", "run", str(path), "--out", str(out)]
    command += ["--set", f"training.batch_size={batch}", "--set", f"distribution.strategy={strategy}"]
    with log.open("w") as handle:
        return subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)


def measure(out: Path, wall: float, images: int, epochs: int) -> dict:
    with (out / "history.csv").open() as handle:
        seconds = sum(float(row["seconds"]) for row in csv.DictReader(handle))
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall_s": round(wall, 1),
        "train_s": round(seconds, 1),
        "images_per_s": round(images * epochs / seconds),
        "test_accuracy": metrics["test"]["accuracy"],
        "global_batch": metrics["distribution"]["global_batch"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distributed-bench-"))
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(recipe(args.train, args.epochs)))
    train_images = round(args.train * 0.9)
    results = {}

    start = time.perf_counter()
    launch(path, work / "one", args.batch, "none", None, work / "one.log").wait(timeout=900)
    results["one process"] = measure(work / "one", time.perf_counter() - start, train_images, args.epochs)

    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    start = time.perf_counter()
    processes = [
        launch(
            path,
            work / f"two-{index}",
            args.batch // 2,
            "multi_worker_mirrored",
            json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}),
            work / f"worker{index}.log",
        )
        for index in range(2)
    ]
    for process in processes:
        process.wait(timeout=900)
    results["two workers"] = measure(work / "two-0", time.perf_counter() - start, train_images, args.epochs)

    print(f"{'':12} {'wall s':>7} {'train s':>8} {'images/s':>9} {'global batch':>13} {'test acc':>9}")
    for name, row in results.items():
        print(
            f"{name:12} {row['wall_s']:>7} {row['train_s']:>8} {row['images_per_s']:>9} "
            f"{row['global_batch']:>13} {row['test_accuracy']:>9.4f}"
        )
    print(f"(logs and run folders in {work}; {os.cpu_count()} CPU cores)")


if __name__ == "__main__":
    main()
