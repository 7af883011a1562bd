"""What TensorFlow's oneDNN CPU kernels change for Xception, measured side by side in fresh processes.

    python3 scripts/onednn_bench.py [--image-size 96] [--top-blocks 1 2 3] [--rounds 2]

finetune sets ``TF_ENABLE_ONEDNN_OPTS=1`` on x86-64 unless the user set it (TensorFlow turns oneDNN on by
itself only on CPUs with AVX-512 VNNI or newer). For each setting (0 and 1, alternating, ``--rounds``
times) a child process builds finetune's Xception (random weights: speed does not depend on them), and
times training steps of its top N blocks and head on the cut features (what each fine-tuning epoch
runs) and the frozen forward pass of the whole model from stored 28x28 images (what the cached extraction
runs), batch 64.
Prints images per second and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np, keras
import finetune
from finetune.model import layout
from finetune.plan import resolve
from finetune.recipe import TopBlocks
from finetune.training.cuts import plan_cut
from finetune.training.phases import configure_phase

size, blocks_list, recipe_path = int(sys.argv[1]), [int(b) for b in sys.argv[2].split(",")], sys.argv[3]
recipe = finetune.load_recipe(recipe_path, [f"data.image_size={size}", "model.backbone.weights=null"])
plan = resolve(recipe)
rng = np.random.default_rng(0)
row = {}

def per_second(step, batch, repeats=6):
    step()
    began = time.perf_counter()
    for _ in range(repeats):
        step()
    return batch * repeats / (time.perf_counter() - began)

for blocks in blocks_list:
    keras.backend.clear_session()
    model = finetune.build_model(recipe)
    phase = recipe.phases[-1].model_copy(update={"trainable": TopBlocks(top_blocks=blocks)})
    parts = layout(model, plan.model)
    configure_phase(model, parts, phase)
    top = plan_cut(model, parts, phase).top
    x = [rng.random((64, *t.shape[1:]), dtype=np.float32) for t in top.inputs]
    y = rng.integers(0, 10, 64)
    top.compile(optimizer=keras.optimizers.Adam(1e-4), loss="sparse_categorical_crossentropy")
    row[f"train top {blocks}"] = per_second(lambda: top.train_on_batch(x if len(x) > 1 else x[0], y), 64)
images = rng.integers(0, 256, (64, *model.inputs[0].shape[1:]), dtype=np.uint8)  # stored 28x28x1, resized inside
row["forward whole model"] = per_second(lambda: model.predict_on_batch(images), 64, repeats=3)
print(json.dumps(row))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--top-blocks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "xception_fmnist.yaml"))
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"0": [], "1": []}
    for round_number in range(args.rounds):
        for setting in ("0", "1"):
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "3"}
            blocks = ",".join(str(b) for b in args.top_blocks)
            done = subprocess.run(
                [sys.executable, "-c", CHILD, str(args.image_size), blocks, args.recipe],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            results[setting].append(row)
            print(f"round {round_number + 1}, TF_ENABLE_ONEDNN_OPTS={setting}: {row}", file=sys.stderr, flush=True)
    print(f"| {args.image_size} px, batch 64, img/s (median of {args.rounds}) | oneDNN off | oneDNN on | on/off |")
    print("| --- | --- | --- | --- |")
    for key in results["0"][0]:
        off = statistics.median(row[key] for row in results["0"])
        on = statistics.median(row[key] for row in results["1"])
        print(f"| {key} | {off:.0f} | {on:.0f} | {on / off:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
