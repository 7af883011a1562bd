"""Read PyTorch ``.pth`` state dicts as numpy arrays, without torch.

``torch.load`` unpickles whatever the file names, so a ``.pth`` file can run
arbitrary code. This reader's unpickler resolves only the globals a state
dict of tensors needs (``OrderedDict``, the tensor rebuild functions and the
typed storage classes) and refuses every other one before anything runs.
Both layouts are read: the legacy stream (``torch.save`` before 1.6) and the
zip archive (1.6 and later).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.errors import WeightsError, describe

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch.<Name>Storage -> numpy dtype; bfloat16 is read as its raw 16 bits and widened below.
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": np.uint16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


@dataclass(frozen=True, slots=True)  # slots: a pickle's BUILD opcode cannot give it attributes
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(_STORAGE_DTYPES[self.name]).newbyteorder("<")


@dataclass(frozen=True)
class _Storage:
    """A storage named by the pickle; its bytes are read after the pickle (legacy) or beside it (zip)."""

    type: _StorageType
    key: str
    numel: int
    view: tuple | None = None  # (view key, element offset, element count): a slice of this storage (torch < 0.4)


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    if not isinstance(storage, _Storage):
        raise WeightsError("a tensor in the file is not backed by a storage")
    return _Tensor(storage, int(storage_offset), tuple(int(n) for n in size), tuple(int(n) for n in stride))


def _rebuild_parameter(data, *_ignored):
    # nn.Parameter pickles as its tensor plus requires_grad and hooks: keep the tensor.
    if not isinstance(data, _Tensor):
        raise WeightsError("a parameter in the file does not hold a tensor")
    return data


def _fresh(function):
    # A new wrapper per lookup: a pickle that sets attributes on what it gets (BUILD) changes only that.
    return lambda: lambda *args: function(*args)


# (module, name) -> factory of what the pickle gets for that global.
_ALLOWED = {
    ("collections", "OrderedDict"): lambda: collections.OrderedDict,  # a built-in type: immutable
    ("torch._utils", "_rebuild_tensor"): _fresh(_rebuild_tensor),
    ("torch._utils", "_rebuild_tensor_v2"): _fresh(_rebuild_tensor),
    ("torch._utils", "_rebuild_parameter"): _fresh(_rebuild_parameter),
    **{("torch", name): (lambda name=name: _StorageType(name)) for name in _STORAGE_DTYPES},
}


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="utf-8")
        self.source = source

    def find_class(self, module, name):
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise WeightsError(
                f"refusing to load {self.source}: it references {module}.{name}, and only tensors are read"
            )
        return factory()

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise WeightsError(f"refusing to load {self.source}: unknown persistent id {str(pid)[:60]!r}")
        _, storage_type, key, _location, numel, *rest = pid
        view = rest[0] if rest else None
        if view is not None and not (isinstance(view, tuple) and len(view) == 3):
            raise WeightsError(f"refusing to load {self.source}: malformed storage view {str(view)[:60]!r}")
        return _Storage(storage_type, str(key), int(numel), view)


def _unpickle(file, source: str):
    try:
        return _TensorUnpickler(file, source).load()
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - a truncated or corrupt stream, a call with the wrong arguments
        raise WeightsError(f"cannot read {source}: {describe(error)}") from None


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state dict file, by name, as numpy arrays.

    Accepts the legacy layout and the zip one, and a dict holding the state
    dict under ``"state_dict"`` (a common checkpoint shape).
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise WeightsError(f"weights file {source!r} does not exist")
    if zipfile.is_zipfile(path):
        state, storages = _read_zip(path, source)
    else:
        with open(path, "rb") as file:
            state, storages = _read_legacy(file, source)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{source} does not hold a state dict (found {type(state).__name__})")
    tensors = {}
    for name, value in state.items():
        if isinstance(value, _Tensor):
            tensors[str(name)] = _materialize(value, storages, source)
    if not tensors:
        raise WeightsError(f"{source} holds no tensors")
    return tensors


def _read_legacy(file, source: str):
    magic = _unpickle(file, source)
    if magic != _LEGACY_MAGIC:
        raise WeightsError(f"{source} is not a PyTorch weights file (neither zip nor legacy .pth)")
    protocol = _unpickle(file, source)
    if protocol != _LEGACY_PROTOCOL:
        raise WeightsError(f"{source}: unsupported legacy .pth protocol {protocol!r}")
    sys_info = _unpickle(file, source)
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
        raise WeightsError(f"{source} was saved on a big-endian machine, which is not supported")
    state = _unpickle(file, source)
    keys = _unpickle(file, source)
    if not isinstance(keys, list):
        raise WeightsError(f"{source}: malformed storage key list")
    types = _storage_types(state)
    storages = {}
    for key in keys:
        header = file.read(8)
        if len(header) != 8:
            raise WeightsError(f"{source} is truncated (storage {key!r} missing)")
        (numel,) = struct.unpack("<q", header)
        if str(key) not in types:
            raise WeightsError(f"{source}: storage {key!r} belongs to no tensor")
        dtype = types[str(key)]
        if numel < 0:
            raise WeightsError(f"{source}: storage {key!r} has a negative size")
        data = file.read(numel * dtype.itemsize)
        if len(data) != numel * dtype.itemsize:
            raise WeightsError(f"{source} is truncated (storage {key!r} is short)")
        storages[str(key)] = np.frombuffer(data, dtype=dtype)
    return state, storages


def _read_zip(path: Path, source: str):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise WeightsError(f"{source} is a zip file without one <folder>/data.pkl: not a PyTorch weights file")
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder").strip() == b"big"
        state = _unpickle(io.BytesIO(archive.read(pickles[0])), source)
        storages = {}
        declared = _storage_sizes(state)
        for key, storage_type in _storage_types(state).items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise WeightsError(f"{source} lacks the storage {member!r}")
            expected = declared[key] * storage_type.itemsize
            if archive.getinfo(member).file_size > expected:  # checked before a byte of it is read
                raise WeightsError(
                    f"{source}: storage {member!r} holds {archive.getinfo(member).file_size:,} bytes, more than "
                    f"the {expected:,} its tensors declare: not a valid PyTorch weights file"
                )
            dtype = storage_type.newbyteorder(">") if big_endian else storage_type
            storages[key] = np.frombuffer(archive.read(member), dtype=dtype).astype(storage_type)
    return state, storages


def _tensors(state) -> list[_Tensor]:
    """The tensors of a state dict (and of its ``state_dict`` entry, for training checkpoints)."""
    values = list(state.values()) if isinstance(state, dict) else []
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        values += list(state["state_dict"].values())
    return [value for value in values if isinstance(value, _Tensor)]


def _storage_sizes(state) -> dict[str, int]:
    """Each storage key's element count as the pickle declares it."""
    return {tensor.storage.key: tensor.storage.numel for tensor in _tensors(state)}


def _storage_types(state) -> dict[str, np.dtype]:
    """Each storage key's dtype, from the tensors that use it."""
    return {tensor.storage.key: tensor.storage.type.dtype for tensor in _tensors(state)}


def _materialize(tensor: _Tensor, storages: dict, source: str) -> np.ndarray:
    storage = tensor.storage
    if storage.key not in storages:
        raise WeightsError(f"{source} lacks the data of storage {storage.key!r}")
    start, numel = (int(storage.view[1]), int(storage.view[2])) if storage.view else (0, storage.numel)
    flat = storages[storage.key][start : start + numel]
    size, stride = tensor.size, tensor.stride
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride) or tensor.offset < 0:
        raise WeightsError(f"{source}: a tensor has an invalid size {size} or stride {stride}")
    if 0 in size:
        return np.zeros(size, dtype=flat.dtype)
    # as_strided reads raw memory: check the view stays inside its storage first.
    last = tensor.offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= len(flat):
        raise WeightsError(f"{source}: a tensor reaches past the end of its storage")
    itemsize = flat.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[tensor.offset :], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    try:
        # Copy to C order: converted checkpoints often store transposed (non-contiguous) tensors.
        array = np.ascontiguousarray(view, dtype=flat.dtype.newbyteorder("="))
    except (MemoryError, ValueError):  # a zero stride can make a huge tensor of a small storage
        raise WeightsError(f"{source}: a tensor of size {size} does not fit in memory") from None
    if storage.type.name == "BFloat16Storage":
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array
