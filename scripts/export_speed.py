"""Keras's SavedModel exporter against finetune's one-trace writer, side by side in one process.

    python3 scripts/export_speed.py RUN_DIR [--rounds 2]

Loads the run's ``model.keras`` once, then for each round writes a SavedModel both ways into a
scratch folder (``model.export(format="tf_saved_model")`` and ``finetune.export.saved_model``'s
writer), and prints for each: seconds to write, seconds for ``tf.saved_model.load`` and one ``serve``
call, the folder's size, and the largest difference of its probabilities from the Keras model's on
eight random images of the model's input shape.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import tensorflow as tf

    from finetune.export.saved_model import _save_traced_once
    from finetune.model import load_model

    model = load_model(args.run_dir / "model.keras", compile=False)
    shape = tuple(model.inputs[0].shape[1:])
    images = np.random.default_rng(0).integers(0, 256, (8, *shape)).astype(model.inputs[0].dtype)
    reference = model.predict_on_batch(images)
    ways = {
        "keras model.export": lambda folder: model.export(str(folder), format="tf_saved_model", verbose=False),
        "finetune, traced once": lambda folder: _save_traced_once(model, folder),
    }
    measured: dict[str, list[tuple[float, float, int, float]]] = {way: [] for way in ways}
    scratch = Path(tempfile.mkdtemp())
    try:
        for _ in range(args.rounds):
            for way, write in ways.items():
                folder = scratch / way.split()[0]
                started = time.perf_counter()
                write(folder)
                written = time.perf_counter() - started
                started = time.perf_counter()
                restored = tf.saved_model.load(str(folder))  # kept alive: serve reads its variables
                served = np.asarray(restored.serve(tf.constant(images)))
                loaded = time.perf_counter() - started
                difference = float(np.abs(served - reference).max())
                measured[way].append((written, loaded, folder_bytes(folder), difference))
                shutil.rmtree(folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("| way | write s (median) | load + serve s | size MB | max probability difference |")
    print("| --- | --- | --- | --- | --- |")
    for way, rows in measured.items():
        write_s = statistics.median(row[0] for row in rows)
        load_s = statistics.median(row[1] for row in rows)
        size = rows[-1][2] / 1e6
        difference = max(row[3] for row in rows)
        print(f"| {way} | {write_s:.2f} | {load_s:.2f} | {size:.1f} | {difference:.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
