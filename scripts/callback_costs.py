"""Milliseconds per epoch spent inside each of finetune's callback hooks, for the quick start's cached head.

    python3 scripts/callback_costs.py [--epochs 5] [--set KEY=VALUE ...]

Runs the head phase of ``recipes/quickstart_lite0.yaml`` (EfficientNet-Lite0 at 64 px, random weights, no
augmentation so the head trains on cached features: 57,000 images, 446 steps per epoch) through
finetune's own training, with every hook of every callback finetune adds wrapped in a timer. Batch-end
hooks may run on Keras's callback thread; the time is what the hook itself took wherever it ran. Prints
each hook's milliseconds per epoch, its number of calls and its slowest call (a first call that traces a
function shows there), the costliest first: the part of the per-step overhead
(``scripts/step_overhead.py``) that is finetune's own Python.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HOOKS = ("on_train_batch_begin", "on_train_batch_end", "on_test_batch_end", "on_epoch_begin", "on_epoch_end")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    import keras

    import finetune
    from finetune.data import load_dataset
    from finetune.model import layout
    from finetune.plan import resolve
    from finetune.training import train as training
    from finetune.training.context import RunContext

    spent: dict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()
    slowest: dict[str, float] = collections.defaultdict(float)

    def timed(callback: keras.callbacks.Callback, hook: str) -> None:
        method = getattr(callback, hook)
        name = f"{type(callback).__name__}.{hook}"

        def hook_timed(*positional, **named):
            began = time.perf_counter()
            try:
                return method(*positional, **named)
            finally:
                took = time.perf_counter() - began
                spent[name] += took
                calls[name] += 1
                slowest[name] = max(slowest[name], took)

        setattr(callback, hook, hook_timed)

    phase_callbacks = training.phase_callbacks

    def timed_callbacks(*positional, **named):
        callbacks = phase_callbacks(*positional, **named)
        for callback in callbacks:
            for hook in HOOKS:
                overridden = hook in vars(callback) or getattr(type(callback), hook) is not getattr(
                    keras.callbacks.Callback, hook
                )
                if overridden:  # a default hook stays default, so Keras's dispatch is unchanged
                    timed(callback, hook)
        return callbacks

    training.phase_callbacks = timed_callbacks
    overrides = ["model.backbone.weights=null", "training.verbose=auto", "model.augment=[]", *args.overrides]
    recipe = finetune.load_recipe(ROOT / "recipes" / "quickstart_lite0.yaml", overrides)
    plan = resolve(recipe)
    phase = plan.phases[0].model_copy(update={"epochs": args.epochs, "min_steps": 0})
    keras.utils.set_random_seed(0)
    dataset = load_dataset(plan.data, plan.seed)
    model = finetune.build_model(recipe)
    folder = Path(tempfile.mkdtemp(prefix="callback-costs-"))
    run = RunContext(model, layout(model, plan.model), dataset, (phase,), plan.training, seed=plan.seed, run_dir=folder)
    training.train(run)
    print("| hook | ms per epoch | calls | slowest call, ms | ms per epoch without it |")
    print("| --- | --- | --- | --- | --- |")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(
            f"| {name} | {seconds / args.epochs * 1000:.1f} | {calls[name]} | {slowest[name] * 1000:.1f} "
            f"| {(seconds - slowest[name]) / args.epochs * 1000:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
