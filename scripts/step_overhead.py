"""finetune's fit against plain ``model.fit`` on in-memory arrays, the same compiled model, side by side.

    python3 scripts/step_overhead.py [--case head|quickstart ...] [--epochs 4] [--rounds 2] [--set KEY=VALUE]

What finetune adds to each training step (its ``FileBatches`` input, its callbacks: Ctrl-C check, NaN
stop, divergence watch, history, progress, TensorBoard, gradient health every 200 steps, checkpoints;
the recipe's defaults, ``--set`` to change them) is measured as the ratio of epoch seconds, after the
first epoch (tracing):

* ``head``: the cached head phase of the quick start (EfficientNet-Lite0 at 64 px, random weights:
  speed does not depend on them) on 57,000 training and 3,000 validation images, which trains a
  small dense head on pooled features: the case where per-step overhead shows most;
* ``quickstart``: the quick start's whole-backbone phase on 3,000 training images at 64 px.

For each case and round, finetune's training (``finetune.training.train``, the run's own loop with
its callbacks, epoch seconds from its history.csv) and then plain ``fit_model.fit(x, y,
batch_size, shuffle=True, validation_data=...)`` on the same arrays and the same compiled model
(timed per epoch by a callback that does nothing per batch). Prints the median epoch seconds and
the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def epoch_seconds_plain(fit_model, train_x, train_y, val, batch_size: int, epochs: int) -> list[float]:
    import keras

    seconds: list[float] = []

    class EpochClock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.began = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            seconds.append(time.perf_counter() - self.began)

    fit_model.fit(
        train_x,
        train_y,
        batch_size=batch_size,
        shuffle=True,
        epochs=epochs,
        validation_data=val,
        callbacks=[EpochClock()],
        verbose=0,
    )
    return seconds


def one_case(case: str, epochs: int, extra: list[str]) -> tuple[float, float]:
    import keras

    import finetune
    from finetune.data import load_dataset
    from finetune.model import layout
    from finetune.plan import resolve
    from finetune.training.context import RunContext
    from finetune.training.features import FeatureStore
    from finetune.training.history import read_history
    from finetune.training.phases import fit_inputs
    from finetune.training.train import train

    # The recipe's own callbacks (TensorBoard and gradient health included), its progress line on.
    overrides = ["model.backbone.weights=null", "training.verbose=auto", *extra]
    if case == "quickstart":
        overrides += ["data.train_limit=3000", "data.test_limit=100"]
    else:  # the quick start augments its images, which keeps its head phase off the cache: not this case
        overrides += ["model.augment=[]"]
    recipe = finetune.load_recipe(ROOT / "recipes" / "quickstart_lite0.yaml", overrides)
    plan = resolve(recipe)
    phase_index = 0 if case == "head" else len(plan.phases) - 1
    phase = plan.phases[phase_index].model_copy(update={"epochs": epochs, "min_steps": 0})
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    dataset = load_dataset(plan.data, plan.seed)
    model = finetune.build_model(recipe)
    parts = layout(model, plan.model)
    folder = Path(tempfile.mkdtemp(prefix="step-overhead-"))
    run = RunContext(model, parts, dataset, (phase,), plan.training, seed=plan.seed, run_dir=folder)
    train(run)
    finetune_seconds = [float(row["seconds"]) for row in read_history(folder / "history.csv")][1:]
    # The same compiled model (the cached top for the head), on the same inputs as in-memory arrays.
    store = FeatureStore([phase], plan.training, parts)
    inputs = fit_inputs(model, phase, dataset, plan.training, store)
    val = (np.asarray(inputs.val_x), dataset.validation.labels) if dataset.validation is not None else None
    batch_size = plan.training.batch_size_for(phase)
    plain = epoch_seconds_plain(
        inputs.fit_model, np.asarray(inputs.train_x), dataset.train.labels, val, batch_size, epochs
    )[1:]
    store.close()
    return statistics.median(finetune_seconds), statistics.median(plain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", default=["head", "quickstart"], choices=["head", "quickstart"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    for case in args.case:
        for round_number in range(args.rounds):
            ours, plain = one_case(case, args.epochs, args.overrides)
            rows.append((case, round_number + 1, ours, plain))
            print(
                f"{case} round {round_number + 1}: finetune {ours:.2f} s/epoch, plain fit {plain:.2f} s/epoch, "
                f"{ours / plain:.3f}x",
                file=sys.stderr,
                flush=True,
            )
    print("| case | round | finetune's fit, s/epoch | plain model.fit, s/epoch | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for case, round_number, ours, plain in rows:
        print(f"| {case} | {round_number} | {ours:.2f} | {plain:.2f} | {ours / plain:.3f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
