"""The same prediction, timed call by call: Keras's ``predict`` (autotuned input or not) and ``predict_on_batch``.

    python3 scripts/predict_modes.py [--size 71] [--batch 250] [--calls 8] [--rounds 2]

Each round is a fresh process per way (Xception without weights: the arithmetic is the same), one warm-up
call, then ``--calls`` timed calls on the same batch. On TensorFlow, ``predict`` goes through a tf.data
input pipeline; on this project's 2-core CPU the same call took either about 1.6 s or about 2.6 s, at random,
while ``predict_on_batch`` took the shorter time every call (docs/performance.md). The third way,
``predict_steady``, is ``predict`` on the same batch as a ``tf.data`` pipeline with autotuning off
(finetune's ``steady_options``): the long calls come from the autotuning. finetune's prediction passes
(feature extraction, evaluation) call ``predict_on_batch`` on batches of one shape, and its training input
pipelines run without autotuning.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

WORKER = """
import os, sys, time
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
import numpy as np, keras
way, size, batch, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model = keras.applications.Xception(weights=None, include_top=False, input_shape=(size, size, 3), pooling="avg")
images = np.random.default_rng(0).random((batch, size, size, 3)).astype("float32")
if way == "predict_on_batch":
    call = lambda: model.predict_on_batch(images)
elif way == "predict_steady":
    import tensorflow as tf
    options = tf.data.Options()
    options.autotune.enabled = False
    call = lambda: model.predict(tf.data.Dataset.from_tensors(images).prefetch(2).with_options(options), verbose=0)
else:
    call = lambda: model.predict(images, batch_size=batch, verbose=0)
call()
seconds = []
for _ in range(calls):
    started = time.perf_counter()
    call()
    seconds.append(time.perf_counter() - started)
print(" ".join(f"{value:.2f}" for value in seconds))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=71)
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--calls", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print("| round | way | seconds per call |")
    print("| --- | --- | --- |")
    for round_index in range(args.rounds):
        for way in ("predict", "predict_steady", "predict_on_batch"):
            command = [sys.executable, "-c", WORKER, way, str(args.size), str(args.batch), str(args.calls)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            print(f"| {round_index + 1} | {way} | {done.stdout.strip()} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
