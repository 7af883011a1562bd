"""How a small model's epoch depends on how ``fit`` is fed, side by side in one process (TensorFlow backend).

    python3 scripts/feed_bench.py [--rows 57000] [--features 1280] [--batch 128] [--epochs 5] [--rounds 2]

A dense head (dropout, softmax) on random float32 features, the shape of the quick start's cached head,
fitted three ways on the same arrays: Keras's own array input (``fit(x, y, shuffle=True)``), a
``FileBatches`` handed to ``fit`` as a ``PyDataset`` (Keras calls it once per batch through a Python
generator), and ``fit_feed(FileBatches)`` (the arrays given to ``tf.data`` once, gathered there; what
finetune's phases use on TensorFlow). Prints each way's median and fastest epoch after the first, in wall
seconds and in CPU seconds of the process, the rounds interleaved.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune  # noqa: F401  (TensorFlow's settings before it loads)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=57_000)
    parser.add_argument("--features", type=int, default=1280)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import keras
    import numpy as np

    from finetune.data.batches import FileBatches
    from finetune.data.graph_batches import fit_feed

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.rows, args.features)).astype("float32")
    y = rng.integers(0, 10, args.rows)

    def model() -> keras.Model:
        keras.utils.set_random_seed(0)
        head = keras.Sequential(
            [keras.Input((args.features,)), keras.layers.Dropout(0.2), keras.layers.Dense(10, activation="softmax")]
        )
        head.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        return head

    wall: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    class Clock(keras.callbacks.Callback):
        def __init__(self, way: str) -> None:
            super().__init__()
            self.way = way

        def on_epoch_begin(self, epoch, logs=None):
            self.began = (time.perf_counter(), time.process_time())

        def on_epoch_end(self, epoch, logs=None):
            if epoch > 0:  # the first epoch traces
                wall.setdefault(self.way, []).append(time.perf_counter() - self.began[0])
                cpu.setdefault(self.way, []).append(time.process_time() - self.began[1])

    for _ in range(args.rounds):
        for way in ("arrays", "PyDataset", "fit_feed"):
            clock = Clock(way)
            if way == "arrays":
                model().fit(x, y, batch_size=args.batch, shuffle=True, epochs=args.epochs, verbose=0, callbacks=[clock])
                continue
            batches = FileBatches(x, y, args.batch, shuffle=True)
            feed, keep_in_step = fit_feed(batches) if way == "fit_feed" else (batches, [])
            model().fit(feed, shuffle=False, epochs=args.epochs, verbose=0, callbacks=[*keep_in_step, clock])
    print("| way | wall s/epoch, median | fastest | CPU s/epoch, median |")
    print("| --- | --- | --- | --- |")
    for way in wall:
        print(
            f"| {way} | {statistics.median(wall[way]):.3f} | {min(wall[way]):.3f} | {statistics.median(cpu[way]):.3f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
