"""Which top blocks, rate and epochs pay for a recipe: many settings on one extraction of the frozen part.

    python3 scripts/top_blocks_probe.py [RECIPE] [--set KEY=VALUE ...] --deepest 4
                                        --try "BLOCKS:RATE:EPOCHS[:SMOOTHING]" [--try ...] [--out rows.jsonl]

A `finetune run` extracts the frozen part once per run; comparing ten settings that way pays for ten
extractions. This script builds RECIPE's model (default ``recipes/xception_fmnist.yaml``, with its
ImageNet weights from wherever finetune finds them) and its data once, runs the frozen part below the
``--deepest`` top blocks once for the training, validation and test splits (float16, as
``training.cache_dtype: float16``), and then, for each ``--try``, starting again from the pretrained
weights: trains the head alone on the pooled features (the recipe's head phase: its epochs and
optimizer) and then the top BLOCKS blocks and the head with Adam at RATE, cosine decay to 0 over
EPOCHS epochs, label smoothing SMOOTHING (default 0.1), BatchNorm frozen, through finetune's own cut
models. Prints each epoch's seconds and validation and test accuracy. It is a probe for choosing
settings: the recipe's numbers are those of ``finetune run`` (scripts/recipe_frontier.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def extract(model, images, batch_size: int = 128) -> list[np.ndarray]:
    outputs = None
    for start in range(0, len(images), 2048):
        part = model.predict(np.asarray(images[start : start + 2048]), batch_size=batch_size, verbose=0)
        part = [np.asarray(p, dtype=np.float16) for p in (part if isinstance(part, list) else [part])]
        outputs = part if outputs is None else [np.concatenate([a, b]) for a, b in zip(outputs, part, strict=True)]
    return outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", type=Path, default=ROOT / "recipes" / "xception_fmnist.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--deepest", type=int, required=True, help="the most top blocks any try trains")
    parser.add_argument("--try", dest="tries", action="append", required=True, help="BLOCKS:RATE:EPOCHS[:SMOOTHING]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import keras

    import finetune
    from finetune import data
    from finetune.catalog.losses import training_loss
    from finetune.model import layout
    from finetune.plan import resolve
    from finetune.recipe import TopBlocks
    from finetune.training.cuts import bridge, plan_cut
    from finetune.training.phases import configure_phase

    recipe = finetune.load_recipe(args.recipe, args.overrides)
    plan = resolve(recipe)
    started = time.perf_counter()
    dataset = data.load_dataset(recipe.data, recipe.seed)
    splits = {"train": dataset.train, "validation": dataset.validation, "test": dataset.test}
    labels = {name: np.asarray(split.labels) for name, split in splits.items()}
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in labels.items())}", file=sys.stderr, flush=True)
    head_phase, top_phase = recipe.phases[0], recipe.phases[-1]

    def fresh(blocks: int):
        keras.backend.clear_session()
        model = finetune.build_model(recipe)
        parts = layout(model, plan.model)
        phase = top_phase.model_copy(update={"trainable": TopBlocks(top_blocks=blocks)})
        configure_phase(model, parts, phase)
        return model, parts, phase

    model, parts, deep_phase = fresh(args.deepest)
    deep = plan_cut(model, parts, deep_phase)
    began = time.perf_counter()
    kept = {name: extract(deep.bottom, split.images) for name, split in splits.items()}
    extraction = time.perf_counter() - began
    megabytes = sum(a.nbytes for arrays in kept.values() for a in arrays) / 1e6
    print(
        f"frozen part below top {args.deepest} ({deep.where}): {extraction:.0f}s, {megabytes:,.0f} MB",
        file=sys.stderr,
        flush=True,
    )

    rows = []
    for text in args.tries:
        fields = text.split(":")
        blocks, rate, epochs = int(fields[0]), float(fields[1]), int(fields[2])
        smoothing = float(fields[3]) if len(fields) > 3 else 0.1
        model, parts, phase = fresh(blocks)
        target = plan_cut(model, parts, phase)
        deep_cut = plan_cut(model, parts, deep_phase)
        began = time.perf_counter()
        between = bridge(deep_cut, target) if blocks < args.deepest else None
        inputs = {
            name: (extract(between, arrays if len(arrays) > 1 else arrays[0]) if between else arrays)
            for name, arrays in kept.items()
        }
        bridged = time.perf_counter() - began
        # The head phase: pooled features from the target cut, the head alone.
        configure_phase(model, parts, head_phase)
        head_cut = plan_cut(model, parts, head_phase)
        to_head = bridge(target, head_cut)
        pooled = {
            name: extract(to_head, arrays if len(arrays) > 1 else arrays[0])[0] for name, arrays in inputs.items()
        }
        head_cut.top.compile(
            optimizer=keras.optimizers.Adam(head_phase.optimizer.learning_rate),
            loss=training_loss(recipe.training.loss.label_smoothing),
            metrics=["accuracy"],
        )
        head_cut.top.fit(
            pooled["train"], labels["train"], batch_size=args.batch_size, epochs=head_phase.epochs, verbose=0
        )
        head_accuracy = head_cut.top.evaluate(pooled["test"], labels["test"], verbose=0)[1]
        # The top blocks and the head.
        configure_phase(model, parts, phase)
        steps = epochs * int(np.ceil(len(labels["train"]) / args.batch_size))
        schedule = keras.optimizers.schedules.CosineDecay(rate, steps)
        target.top.compile(
            optimizer=keras.optimizers.Adam(schedule), loss=training_loss(smoothing), metrics=["accuracy"]
        )
        train_x = inputs["train"] if len(inputs["train"]) > 1 else inputs["train"][0]
        epochs_seen = []
        for epoch in range(epochs):
            began = time.perf_counter()
            target.top.fit(train_x, labels["train"], batch_size=args.batch_size, epochs=1, verbose=0, shuffle=True)
            seconds = time.perf_counter() - began
            scores = {}
            for name in ("validation", "test"):
                x = inputs[name] if len(inputs[name]) > 1 else inputs[name][0]
                scores[name] = float(target.top.evaluate(x, labels[name], batch_size=256, verbose=0)[1])
            epochs_seen.append({"epoch": epoch + 1, "seconds": round(seconds, 1), **scores})
            print(
                f"  top {blocks} lr {rate} epoch {epoch + 1}/{epochs}: {seconds:.0f}s, "
                f"val {scores['validation']:.4f} test {scores['test']:.4f}",
                file=sys.stderr,
                flush=True,
            )
        row = {
            "recipe": str(args.recipe),
            "overrides": args.overrides,
            "blocks": blocks,
            "rate": rate,
            "epochs": epochs,
            "label_smoothing": smoothing,
            "head_test_accuracy": float(head_accuracy),
            "extraction_s": round(extraction, 1),
            "bridge_s": round(bridged, 1),
            "per_epoch": epochs_seen,
            "train_images": len(labels["train"]),
        }
        rows.append(row)
        if args.out:
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
    print("| top blocks | rate | epochs | head only | best validation (epoch) | test at the end | s/epoch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        best = max(row["per_epoch"], key=lambda item: item["validation"])
        seconds = np.mean([item["seconds"] for item in row["per_epoch"]])
        print(
            f"| {row['blocks']} | {row['rate']} | {row['epochs']} | {row['head_test_accuracy']:.4f} | "
            f"{best['validation']:.4f} ({best['epoch']}) | {row['per_epoch'][-1]['test']:.4f} | {seconds:.0f} |"
        )
    print(f"\n{time.perf_counter() - started:.0f}s in all", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
