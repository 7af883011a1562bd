"""The heatmap check as a number: how often Grad-CAM's peak lies on the object.

    python3 scripts/heatmap_check.py [--train 3000] [--test 50] [--epochs 5] [--seeds 0 1 2]

Fashion-MNIST garments pasted at random places on blank canvases four times their size, a handwritten
digit elsewhere on each as a distractor (tests/test_explain.py's data and tiny nested conv classifier):
the share of test canvases whose heatmap peak lies inside the garment's 28x28 box, for the trained
model and, as the floor, the same model untrained (which peaks on whichever object is brighter).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def share_on_object(model, images, boxes) -> float:
    from finetune.inference.explain import explain

    heatmaps = explain(model, images).heatmaps
    inside = 0
    for heatmap, (top, left) in zip(heatmaps, boxes, strict=True):
        row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        inside += top <= row < top + 28 and left <= column < left + 28
    return inside / len(boxes)


def main() -> int:
    import keras

    from tests.test_explain import garments_on_canvases, tiny_conv_classifier

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--test", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    for seed in args.seeds:
        keras.utils.set_random_seed(seed)
        images, labels, _ = garments_on_canvases(args.train, seed=100 + seed)
        test_images, test_labels, boxes = garments_on_canvases(args.test, seed=200 + seed)
        model = tiny_conv_classifier()
        untrained = share_on_object(model, test_images, boxes)
        model.compile(
            optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        model.fit(images, labels, epochs=args.epochs, batch_size=64, verbose=0)
        accuracy = float(model.evaluate(test_images, test_labels, verbose=0)[1])
        row = {"seed": seed, "untrained": untrained, "trained": share_on_object(model, test_images, boxes)}
        print(json.dumps({**row, "test_accuracy": accuracy, "test_images": args.test}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
