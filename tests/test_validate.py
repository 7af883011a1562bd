"""`finetune validate` finds, in a second and without training, every error a run would find before training."""

from __future__ import annotations

import copy
import json

import pytest
from conftest import FULL_MATRIX, ROOT, cli_in_process

import finetune
from finetune.backbones import block_names
from finetune.backbones.registry import get
from finetune.errors import RecipeError

XCEPTION = "recipes/xception_fmnist.yaml"


@pytest.fixture
def xception_weights_here(tmp_path, monkeypatch):
    """An ImageNet file where a run looks for it (its contents are not read by validate)."""
    (tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"")
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path))


def _one_line_refusal(result, *expected: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_validate_refuses_imagenet_weights_a_run_could_not_get(monkeypatch):
    from finetune.backbones import weight_files

    monkeypatch.setattr(weight_files, "download_reachable", lambda timeout=3.0: "example.org cannot be reached: x")
    _one_line_refusal(
        cli_in_process("validate", XCEPTION),
        "ImageNet weights for 'xception' are not available offline",
        "put xception_weights_tf_dim_ordering_tf_kernels_notop.h5 in $FINETUNE_WEIGHTS_DIR",
        "example.org cannot be reached",
    )
    # Online, the run downloads them: validate says so and passes.
    monkeypatch.setattr(weight_files, "download_reachable", lambda timeout=3.0: None)
    result = cli_in_process("validate", XCEPTION)
    assert result.returncode == 0, result.stderr
    assert "note: ImageNet weights for xception are not on this machine; Keras downloads them" in result.stdout


def test_validate_names_the_weights_file_it_found(xception_weights_here, tmp_path):
    result = cli_in_process("validate", XCEPTION)
    assert result.returncode == 0, result.stderr
    assert f"note: ImageNet weights for xception: {tmp_path}" in result.stdout


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("model.backbone.cut_at=nonexistent", "model.backbone.cut_at: no block 'nonexistent'; the blocks are block1,"),
        ("phases.head.trainable={top_blocks: 100}", "phases.head.trainable.top_blocks: xception has 14 blocks"),
        ("model.backbone.top_blocks_removed=14", "model.backbone.top_blocks_removed: the backbone has 14 blocks"),
    ],
)
def test_validate_checks_block_settings_from_the_name_table_without_building(
    xception_weights_here, monkeypatch, setting, expected
):
    def no_build(*args, **kwargs):
        raise AssertionError("validate built the network where the name table suffices")

    monkeypatch.setattr(block_names, "built", no_build)
    # The whole Xception's 14 blocks (the shipped recipe cuts it after block 8).
    whole = ("--set", "model.backbone.cut_at=null")
    _one_line_refusal(cli_in_process("validate", XCEPTION, *whole, "--set", setting), expected)


def test_a_cut_backbone_has_fewer_blocks_to_unfreeze(xception_weights_here):
    """top_blocks counts the blocks left after the cut, as the built model's layout does."""
    result = cli_in_process(
        "validate",
        XCEPTION,
        "--set",
        "model.backbone.cut_at=block12",
        "--set",
        "phases.finetune.trainable={top_blocks: 13}",
    )
    _one_line_refusal(
        result, "phases.finetune.trainable.top_blocks: xception has 12 blocks (block1 .. block12), got 13"
    )


def test_validate_builds_a_backbone_the_table_does_not_hold(tmp_path):
    """The mlp's blocks follow its options: validate builds it (no weights) and refuses as the run would."""
    recipe = {
        "name": "mlp_blocks",
        "data": {"source": "fashion_mnist", "image_size": 28},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32, 16]}}},
        "phases": [{"name": "train", "epochs": 1, "trainable": {"top_blocks": 5}}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(json.dumps(recipe))
    finetune.load_recipe(copy.deepcopy(recipe))  # resolving alone does not build
    _one_line_refusal(cli_in_process("validate", str(path)), "phases.train.trainable.top_blocks: mlp has 2 blocks")


def _tabled_backbones(cheap: bool) -> list:
    names = sorted(json.loads(block_names.TABLE_FILE.read_text()))
    cheap_ones = ("xception", "mobilenet_v2", "efficientnet_lite0", "resnet50")
    return [name for name in names if (name in cheap_ones) == cheap or FULL_MATRIX]


@pytest.mark.parametrize("name", _tabled_backbones(cheap=True))
def test_the_name_table_is_what_the_built_backbone_has(name):
    spec = get(name)
    assert block_names.tabled(spec) == block_names.built(spec)


@pytest.mark.slow
@pytest.mark.parametrize("name", _tabled_backbones(cheap=False))
def test_every_table_entry_is_what_the_built_backbone_has(name):
    spec = get(name)
    assert block_names.tabled(spec) == block_names.built(spec)


def test_other_options_are_not_answered_from_the_table():
    spec = get("mobilenet_v2")
    assert block_names.tabled(spec, {"alpha": 0.35}) is None
    assert block_names.tabled(spec, {}) is not None


def test_run_refuses_what_validate_refuses_before_loading_any_data(xception_weights_here):
    with pytest.raises(RecipeError, match=r"top_blocks: xception has 14 blocks"):
        finetune.load_recipe(ROOT / XCEPTION, ["model.backbone.cut_at=null", "phases.head.trainable={top_blocks: 100}"])


@pytest.mark.parametrize(
    "phase_settings, where",
    [
        ({"callbacks": ["early_stopping"]}, "phases.train.callbacks: early_stopping watches val_loss"),
        ({"callbacks": [{"name": "reduce_lr_on_plateau", "patience": 2}]}, "callbacks: reduce_lr_on_plateau"),
        ({"schedule": {"name": "performance", "patience": 2}}, "phases.train.schedule: performance watches val_loss"),
    ],
)
def test_what_watches_validation_numbers_needs_a_validation_split(phase_settings, where):
    recipe = {
        "name": "watchers",
        "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.0},
        "model": {"backbone": {"name": "mlp", "weights": None}},
        "phases": [{"name": "train", "epochs": 3, "trainable": "all", **phase_settings}],
    }
    with pytest.raises(RecipeError, match=r"data\.validation_split is 0") as refused:
        finetune.load_recipe(copy.deepcopy(recipe))
    assert where in str(refused.value) and "monitor: loss" in str(refused.value)
    recipe["data"]["validation_split"] = 0.1
    finetune.load_recipe(copy.deepcopy(recipe))
    recipe["data"]["validation_split"] = 0.0
    for key in ("callbacks", "schedule"):  # watching the training loss needs no validation images
        if key in phase_settings:
            entry = phase_settings[key][0] if key == "callbacks" else phase_settings[key]
            entry = {"name": entry} if isinstance(entry, str) else dict(entry)
            recipe["phases"][0][key] = (
                [{**entry, "monitor": "loss"}] if key == "callbacks" else {**entry, "monitor": "loss"}
            )
    finetune.load_recipe(copy.deepcopy(recipe))
