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
its callbacks), and after each of its epochs one epoch of plain ``fit(x, y, batch_size, shuffle=True,
validation_data=...)`` on a twin of the model it trains (a copy compiled as the run compiles it) and the
same inputs as in-memory arrays: the two ways alternate epoch by epoch, so both meet the same state of a
shared machine (run one after the other, rounds of the same measurement spread from 0.70x to 1.41x).
Each epoch is timed in wall seconds and in CPU seconds of the whole process (every thread; a shared
machine's stolen time does not count there). Prints the median epoch of each after the first (tracing),
each round's ratios and their median over the rounds.
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


class EpochClock:
    """A Keras callback's factory: each epoch's wall seconds and CPU seconds (all the process's threads)."""

    def __init__(self) -> None:
        import keras

        self.wall: list[float] = []
        self.cpu: list[float] = []
        clock = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.began = (time.perf_counter(), time.process_time())

            def on_epoch_end(self, epoch, logs=None):
                clock.wall.append(time.perf_counter() - self.began[0])
                clock.cpu.append(time.process_time() - self.began[1])

        self.callback = Callback()


class PlainTwin:
    """A Keras callback's factory: after each of finetune's epochs, one epoch of plain ``fit`` on a twin.

    The twin is a copy of the model finetune's fit trains (the cached top for the head), compiled as the run
    compiles it, fitted on the same inputs as in-memory arrays. Alternating epoch by epoch, both ways see
    the same state of a shared, noisy machine; one process after the other, they did not.
    """

    def __init__(self, ours: EpochClock, train_x, train_y, val, batch_size: int, settings) -> None:
        import keras

        from finetune.training.phases import compile_model

        self.clock = EpochClock()
        self.twin: keras.Model | None = None  # made at finetune's first epoch end, from the model it fits
        plain = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                ours.callback.on_epoch_begin(epoch, logs)

            def on_epoch_end(self, epoch, logs=None):
                ours.callback.on_epoch_end(epoch, logs)
                if plain.twin is None:
                    plain.twin = keras.models.clone_model(self.model)
                    optimizer = type(self.model.optimizer).from_config(self.model.optimizer.get_config())
                    compile_model(plain.twin, optimizer, settings, self.model.steps_per_execution)
                plain.twin.fit(
                    train_x,
                    train_y,
                    batch_size=batch_size,
                    shuffle=True,
                    epochs=1,
                    validation_data=val,
                    callbacks=[plain.clock.callback],
                    verbose=0,
                )

        self.callback = Callback()


def one_case(case: str, epochs: int, extra: list[str]) -> tuple[EpochClock, EpochClock]:
    import keras

    import finetune
    from finetune.data import load_dataset
    from finetune.model import layout
    from finetune.plan import resolve
    from finetune.training.context import RunContext
    from finetune.training.features import FeatureStore
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
    # The same inputs as in-memory arrays: the cached top's features for the head, the images otherwise.
    store = FeatureStore([phase], plan.training, parts)
    cached = store.features(model, phase, dataset, plan.training.batch_size_for(phase))
    train_x = np.array(cached.train if cached is not None else dataset.train.images)
    val_x = (
        None if dataset.validation is None else (cached.validation if cached is not None else dataset.validation.images)
    )
    val = None if val_x is None else (np.array(val_x), dataset.validation.labels)
    store.close()
    ours = EpochClock()  # told of each epoch after finetune's own callbacks
    plain = PlainTwin(ours, train_x, dataset.train.labels, val, plan.training.batch_size_for(phase), plan.training)
    run = RunContext(
        model, parts, dataset, (phase,), plan.training, seed=plan.seed, run_dir=folder, observers=(plain.callback,)
    )
    train(run)
    return ours, plain.clock


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", nargs="+", default=["head", "quickstart"], choices=["head", "quickstart"])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    pairs: dict[str, list[tuple[float, float]]] = {case: [] for case in args.case}
    for case in args.case:
        for round_number in range(args.rounds):
            ours, plain = one_case(case, args.epochs, args.overrides)
            # After the first epoch (tracing): the median epoch, in wall seconds and in CPU seconds.
            row = [statistics.median(values[1:]) for values in (ours.wall, plain.wall, ours.cpu, plain.cpu)]
            rows.append((case, round_number + 1, *row))
            pairs[case] += [
                (wall / plain_wall, cpu / plain_cpu)
                for wall, plain_wall, cpu, plain_cpu in list(
                    zip(ours.wall, plain.wall, ours.cpu, plain.cpu, strict=True)
                )[1:]
            ]
            print(
                f"{case} round {round_number + 1}: wall {row[0]:.2f} against {row[1]:.2f} s/epoch "
                f"({row[0] / row[1]:.3f}x), "
                f"CPU {row[2]:.2f} against {row[3]:.2f} s/epoch ({row[2] / row[3]:.3f}x)",
                file=sys.stderr,
                flush=True,
            )
    print(
        "| case | round | finetune's fit, wall s/epoch | plain model.fit | ratio "
        "| finetune's fit, CPU s/epoch | plain | ratio |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for case, round_number, wall, plain_wall, cpu, plain_cpu in rows:
        print(
            f"| {case} | {round_number} | {wall:.2f} | {plain_wall:.2f} | {wall / plain_wall:.3f}x "
            f"| {cpu:.2f} | {plain_cpu:.2f} | {cpu / plain_cpu:.3f}x |"
        )
    for case in args.case:
        ratios = [(row[2] / row[3], row[4] / row[5]) for row in rows if row[0] == case]
        print(
            f"{case}: median ratio over {len(ratios)} rounds, wall {statistics.median(r[0] for r in ratios):.3f}x, "
            f"CPU {statistics.median(r[1] for r in ratios):.3f}x"
        )
        if len(ratios) > 1:  # how far the mean of the rounds could move: resampled rounds, fixed seed
            draws = np.random.default_rng(0).choice(np.array(ratios), (10_000, len(ratios))).mean(axis=1)
            low, high = np.percentile(draws, [2.5, 97.5], axis=0)
            mean = np.mean(ratios, axis=0)
            print(
                f"{case}: mean of the rounds, wall {mean[0]:.3f}x (95% bootstrap interval {low[0]:.3f}-{high[0]:.3f}), "
                f"CPU {mean[1]:.3f}x ({low[1]:.3f}-{high[1]:.3f})"
            )
        wall_q = statistics.quantiles([pair[0] for pair in pairs[case]], n=4)
        cpu_q = statistics.quantiles([pair[1] for pair in pairs[case]], n=4)
        print(
            f"{case}: {len(pairs[case])} epoch pairs pooled, median wall {wall_q[1]:.3f}x "
            f"(quartiles {wall_q[0]:.3f}-{wall_q[2]:.3f}), CPU {cpu_q[1]:.3f}x ({cpu_q[0]:.3f}-{cpu_q[2]:.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
