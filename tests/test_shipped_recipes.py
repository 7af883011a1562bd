"""Every shipped recipe, end to end on a tiny subset: it ends finished with every export format it names.

The recipes are run as shipped but for their size: a few dozen images, one epoch a phase, no step floors,
the smallest input the backbone takes; ImageNet weights that cannot be had offline (Xception, MobileNetV2)
are replaced by random ones (EfficientNet-Lite0's come from a package and are loaded for real).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, outside_ci_cover

import finetune
from finetune.backbones.registry import get
from finetune.backbones.weight_files import find_imagenet_weights
from finetune.export.formats import artifact_key

# The costliest runs (about two minutes each on a busy 2-core machine) that another shipped recipe covers:
# CI skips them to stay within its 30 minutes; FINETUNE_MATRIX=full runs them.
OUTSIDE_CI = {
    "ch11_xception_sgd_decay.yaml": "Xception, two phases and its SavedModel, as xception_fmnist.yaml",
    "ch11_selu.yaml": "100 dense layers; the dense stack and its exports as ch11_adam.yaml",
    "xception_fmnist_gpu.yaml": "Xception, two phases and its SavedModel, as xception_fmnist.yaml (plus augmentation)",
}
RECIPES = [
    outside_ci_cover(name, reason=OUTSIDE_CI[name]) if name in OUTSIDE_CI else name
    for name in sorted(path.name for path in (ROOT / "recipes").glob("*.yaml"))
    if name != "book_transfer_b_on_a.yaml"  # runs after book_transfer_a below
]


def _image_folder(root: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(("cat", "dog", "fox")):
        (root / name).mkdir(parents=True)
        for number in range(16):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8) + np.uint8(60 * index)
            Image.fromarray(pixels).save(root / name / f"{number}.png")
    return root


def tiny(name: str, tmp_path: Path) -> dict:
    """The recipe ``name`` as shipped, shrunk to seconds."""
    recipe = yaml.safe_load((ROOT / "recipes" / name).read_text())
    data, backbone = recipe["data"], recipe["model"]["backbone"]
    if data["source"] == "image_folder":
        data["data_dir"] = str(_image_folder(tmp_path / "images"))
    elif data["source"] == "csv":
        root = _image_folder(tmp_path / "images")
        rows = [f"{path.relative_to(root)},{path.parent.name}," for path in sorted(root.glob("*/*.png"))]
        (root / "labels.csv").write_text("\n".join(["image,label,split", *rows]) + "\n")
        data["data_dir"] = str(root / "labels.csv")
    elif data.get("train_per_class") is None:
        data["train_limit"] = 64
        data["test_limit"] = 32
    if backbone.get("name") != "run":
        spec = get(backbone["name"])
        data["image_size"] = max(spec.min_size, 32) if spec.name != "mlp" else data["image_size"]
        if backbone.get("weights") == "imagenet" and find_imagenet_weights(spec, (data["image_size"],) * 2) is None:
            backbone["weights"] = None
    for phase in recipe["phases"]:
        phase["epochs"] = 1
        phase.pop("min_steps", None)
        if isinstance(phase.get("schedule"), dict):
            phase["schedule"].pop("min_warmup_steps", None)
    recipe.setdefault("training", {}).update({"verbose": 0, "tensorboard": False})
    return recipe


def _finishes_with_its_formats(recipe: dict, out: Path) -> finetune.RunResult:
    loaded = finetune.load_recipe(recipe)
    result = finetune.run(loaded, out=out, log=None)
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    exported = json.loads((out / "metrics.json").read_text())["export"]
    quantization = loaded.export.tflite_quantization
    for name in loaded.export.formats:
        entry = exported[artifact_key(name, quantization)]
        assert "error" not in entry, entry
        assert (out / entry["file"]).exists()
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_finishes_on_a_tiny_subset_with_every_format_it_names(name, tmp_path):
    _finishes_with_its_formats(tiny(name, tmp_path), tmp_path / "run")


@pytest.mark.slow
def test_the_book_transfer_pair_finishes_one_on_the_other(tmp_path):
    first = _finishes_with_its_formats(tiny("book_transfer_a.yaml", tmp_path), tmp_path / "a")
    second = tiny("book_transfer_b_on_a.yaml", tmp_path)
    second["model"]["backbone"]["path"] = str(first.run_dir)
    _finishes_with_its_formats(second, tmp_path / "b")


@pytest.mark.slow
def test_mirrored_on_one_device_trains_samples_gradients_and_exports_in_the_run(tmp_path):
    """The docs' multi-GPU command shape on a machine with one device: one replica, gradient health sampled at
    every step, the SavedModel written inside the run (it failed there while a later export worked)."""
    recipe = tiny("ch11_adam.yaml", tmp_path)
    recipe["distribution"] = {"strategy": "mirrored"}
    recipe["training"]["gradient_health_every"] = 1
    recipe["export"] = {"formats": ["keras", "saved_model"]}
    result = _finishes_with_its_formats(recipe, tmp_path / "run")
    assert json.loads((result.run_dir / "run.json").read_text())["distribution"]["strategy"] == "mirrored"
    assert result.metrics["export"]["saved_model"]["top1_agreement"] == 1.0
