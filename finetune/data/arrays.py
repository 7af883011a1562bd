"""Image arrays that may live in a file: views by row, reads in order, statistics in chunks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, DTypeLike


class MappedImages:
    """Rows of a memory-mapped image array, picked by position and read only when asked for.

    Subsets of a decoded image folder stay on disk this way: training,
    feature extraction and evaluation read them a batch at a time (see
    :mod:`finetune.data.batches`), so memory does not grow with the number of
    images. Indexing returns ordinary arrays.
    """

    def __init__(self, base: np.ndarray, positions: ArrayLike) -> None:
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, positions: np.ndarray) -> MappedImages:
        return MappedImages(self.base, self.positions[positions])

    def __getitem__(self, key: Any) -> np.ndarray:
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = self.positions[key]
        if np.ndim(rows) == 0:
            picked = np.asarray(self.base[int(rows)])
            return picked[rest] if rest else picked
        picked = read_rows(self.base, rows)
        every_row = (slice(None), *rest)
        return picked[every_row] if rest else picked

    def __array__(self, dtype: DTypeLike | None = None, copy: bool | None = None) -> np.ndarray:
        array = self[:]
        return array if dtype is None else array.astype(dtype, copy=False)


def on_disk(images: object) -> bool:
    """Whether ``images`` (or any of a list of arrays) lives in a file rather than in memory."""
    if isinstance(images, (list, tuple)):
        return any(on_disk(item) for item in images)
    return isinstance(images, (MappedImages, np.memmap))


def pick_rows(images: np.ndarray | MappedImages, positions: np.ndarray) -> np.ndarray | MappedImages:
    """``images[positions]``, except that rows of a memory-mapped array stay mapped."""
    if isinstance(images, MappedImages):
        return images.take(positions)
    if isinstance(images, np.memmap):
        return MappedImages(images, positions)
    return images[positions]


def read_rows(array: np.ndarray | MappedImages, rows: ArrayLike) -> np.ndarray:
    """``array[rows]`` as an in-memory array, reading a memory-mapped file in ascending order."""
    if isinstance(array, MappedImages):
        return array[rows]
    rows = np.asarray(rows, dtype=np.int64)
    if not isinstance(array, np.memmap):  # in memory: one gather (sorting first made a batch 6x slower to read)
        return array[rows]
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[rows[order]]
    return out


class Moments:
    """Mean and variance accumulated over chunks, in float64, never the whole set in memory.

    One mean over every value, or with ``per_channel`` one per channel (the
    last axis), as a BatchNorm layer keeps them.
    """

    def __init__(self, per_channel: bool = False) -> None:
        self.per_channel = per_channel
        self.total: np.ndarray | float = 0.0
        self.total_squares: np.ndarray | float = 0.0
        self.count = 0

    def add(self, values: ArrayLike) -> None:
        values = np.asarray(values, dtype=np.float64)
        if self.per_channel:
            values = values.reshape(-1, values.shape[-1])
            self.total = self.total + values.sum(axis=0)
            self.total_squares = self.total_squares + np.square(values).sum(axis=0)
            self.count += len(values)
        else:
            self.total = self.total + float(values.sum())
            self.total_squares = self.total_squares + float(np.square(values).sum())
            self.count += values.size

    @property
    def mean(self) -> np.ndarray | float:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> np.ndarray | float:
        return np.maximum(self.total_squares / max(self.count, 1) - np.square(self.mean), 0.0)


def chunks(array: np.ndarray | MappedImages, size: int = 1024) -> Iterator[np.ndarray]:
    """``array`` in consecutive blocks of ``size`` rows (each an in-memory array)."""
    for start in range(0, len(array), size):
        yield np.asarray(array[start : start + size])


def even_batch_size(count: int, batch_size: int) -> int:
    """The batch size that cuts ``count`` rows into as many batches as ``batch_size`` would, all but one row
    apart in size: 2,000 rows at 256 are 8 batches of 250 instead of 7 of 256 and one of 208.

    A last, shorter batch makes Keras trace its predict function a second time (about 0.6 s for Xception at
    71 px on a busy 2-core CPU); padding it to this size costs at most one row per batch.
    """
    if count <= 0:
        return max(batch_size, 1)
    batches = -(-count // max(batch_size, 1))
    return -(-count // batches)


def predict_in_steady_batches(model: Any, inputs: Any, batch_size: int) -> Any:
    """``model``'s outputs for ``inputs`` (an array or a list of arrays with the same number of rows), one
    ``predict_on_batch`` per ``batch_size`` rows; the last batch is padded with copies of the final row and
    the padding's outputs dropped, so the model is traced once.

    Batch by batch rather than ``model.predict``: on TensorFlow, ``predict``'s input pipeline made the same
    batch take 1.6 s or 2.6 s at random on a 2-core CPU (Xception, 250 images at 71 px), and
    ``predict_on_batch`` the 1.6 s every time (docs/performance.md).
    """
    arrays = list(inputs) if isinstance(inputs, list | tuple) else [inputs]
    rows = len(arrays[0])
    size = max(1, min(batch_size, rows))
    if rows == 0 or _distributed(model):  # Keras's predict shards batches over replicas; predict_on_batch would not
        padded = _padded_to_multiple([np.asarray(array) for array in arrays], size)
        return _first_rows(model.predict(_one_or_list(padded), batch_size=size, verbose=0), rows)
    parts = []
    for start in range(0, rows, size):
        batch = _padded_to_multiple([np.asarray(array[start : start + size]) for array in arrays], size)
        produced = model.predict_on_batch(_one_or_list(batch))
        parts.append(list(produced) if isinstance(produced, list | tuple) else [produced])
    outputs = [np.concatenate([np.asarray(part[index]) for part in parts]) for index in range(len(parts[0]))]
    return _first_rows(_one_or_list(outputs), rows)


def _padded_to_multiple(arrays: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each array with copies of its last row appended up to a multiple of ``size`` rows."""
    short = -len(arrays[0]) % size
    if not short:
        return arrays
    return [np.concatenate([array, np.repeat(array[-1:], short, axis=0)]) for array in arrays]


def _one_or_list(arrays: list) -> Any:
    return arrays if len(arrays) > 1 else arrays[0]


def _first_rows(outputs: Any, rows: int) -> Any:
    if isinstance(outputs, list | tuple):
        return [output[:rows] for output in outputs]
    return outputs[:rows]


def _distributed(model: Any) -> bool:
    """Whether ``model`` runs under a tf.distribute strategy or a Keras (JAX) distribution."""
    if getattr(model, "_distribute_strategy", None) is not None:
        return True
    import keras  # imported here: the data layer's array helpers need no Keras otherwise

    distribution = getattr(keras, "distribution", None)
    return distribution is not None and distribution.distribution() is not None
