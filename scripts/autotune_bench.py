"""Training epochs with ``tf.data`` autotuning on and off, the same pipeline otherwise, side by side.

    python3 scripts/autotune_bench.py [--size 71] [--rows 400] [--batch 50] [--epochs 5] [--rounds 2]

Each round runs one fresh process per way: Xception (random weights: the arithmetic is the same) with a
10-class head, trained on ``--rows`` random images through finetune's ``fit_feed`` (the batches gathered in
TensorFlow's input pipeline), with that pipeline's autotuning switched back on ("autotune", Keras's
default) or left off ("steady", what finetune's pipelines use). Prints every epoch after the first (which
traces) as wall/CPU seconds, and per way the median epoch, the slowest, and how many epochs ran on about
one core (CPU seconds under 1.3x the wall seconds, where the usual epoch keeps both cores busy).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, sys.argv[1])
import finetune  # noqa: F401  (TensorFlow's settings before it loads)
import keras, numpy as np, tensorflow as tf
from finetune.data.batches import FileBatches
from finetune.data.graph_batches import fit_feed
way, size, rows, batch, epochs = sys.argv[2], *map(int, sys.argv[3:7])
rng = np.random.default_rng(0)
x, y = rng.random((rows, size, size, 3)).astype("float32"), rng.integers(0, 10, rows)
keras.utils.set_random_seed(0)
base = keras.applications.Xception(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
model = keras.Sequential([base, keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy")
feed, keep_in_step = fit_feed(FileBatches(x, y, batch, shuffle=True))
if way == "autotune":
    options = tf.data.Options()
    options.autotune.enabled = True
    feed = feed.with_options(options)
seconds = []
class Clock(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.began = (time.perf_counter(), time.process_time())
    def on_epoch_end(self, epoch, logs=None):
        seconds.append((time.perf_counter() - self.began[0], time.process_time() - self.began[1]))
model.fit(feed, shuffle=False, epochs=epochs, verbose=0, callbacks=[*keep_in_step, Clock()])
print(" ".join(f"{wall:.2f}/{cpu:.2f}" for wall, cpu in seconds[1:]))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=71)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    epochs: dict[str, list[tuple[float, float]]] = {"autotune": [], "steady": []}
    print("| round | way | epochs after the first, wall/CPU s |")
    print("| --- | --- | --- |")
    for round_index in range(args.rounds):
        for way in epochs:
            numbers = [str(value) for value in (args.size, args.rows, args.batch, args.epochs)]
            command = [sys.executable, "-c", WORKER, str(ROOT), way, *numbers]
            printed = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
            print(f"| {round_index + 1} | {way} | {' '.join(printed)} |", flush=True)
            epochs[way] += [(float(wall), float(cpu)) for wall, cpu in (pair.split("/") for pair in printed)]
    print()
    print("| way | median epoch, wall s | slowest | epochs on about one core |")
    print("| --- | --- | --- | --- |")
    for way, pairs in epochs.items():
        walls = [wall for wall, _ in pairs]
        one_core = sum(cpu < 1.3 * wall for wall, cpu in pairs)
        print(f"| {way} | {statistics.median(walls):.2f} | {max(walls):.2f} | {one_core} of {len(pairs)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
