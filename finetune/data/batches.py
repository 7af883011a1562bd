"""Batches read on demand, for images and features that live in files.

Keras's ``fit`` and ``predict`` turn a numpy array into one tensor before
the first step, copying a memory-mapped file into RAM whole. A
:class:`FileBatches` reads one batch of rows at a time instead, so a decoded
image folder or a disk feature cache of any size trains in flat memory.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import keras
import numpy as np

from finetune.data.arrays import MappedImages, read_rows
from finetune.data.balance import balanced_order

if TYPE_CHECKING:
    from typing import TypeAlias

    from numpy.typing import ArrayLike

    Rows: TypeAlias = np.ndarray | MappedImages  # an array, possibly memory-mapped
    Inputs: TypeAlias = Rows | list[Rows] | tuple[Rows, ...]  # one input, or one array per model input
    Batch: TypeAlias = np.ndarray | tuple[np.ndarray, ...]


class FileBatches(keras.utils.PyDataset):
    """Batches of ``inputs`` (an array or a list of arrays with the same rows) and ``labels``.

    With ``shuffle``, epoch ``e`` reads the rows in an order drawn from
    ``(seed, e)`` alone, so a run resumed at epoch ``e`` (``epoch=e``) sees
    the batches an uninterrupted run would; without it, rows come in order
    (validation, prediction). ``balanced``: each epoch draws as many rows
    as there are, with equal class frequency (with replacement), also from
    ``(seed, e)`` alone. ``class_weights`` (one per class) makes each batch
    ``(x, y, sample_weight)``, each example weighted by its label's class.
    """

    def __init__(
        self,
        inputs: Inputs,
        labels: ArrayLike | None = None,
        batch_size: int = 32,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        *,
        balanced: bool = False,
        class_weights: ArrayLike | None = None,
    ) -> None:
        super().__init__()
        self.inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        self.single = not isinstance(inputs, (list, tuple))
        self.labels = None if labels is None else np.asarray(labels)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.rows = len(self.inputs[0])
        self.epoch = epoch
        if balanced and self.labels is None:
            raise ValueError("balanced batches need labels")
        self.balanced = balanced
        self.class_weights = None if class_weights is None else np.asarray(class_weights, dtype=np.float32)
        self._order = self._order_for(epoch)

    @property
    def order(self) -> np.ndarray:
        """The rows the current epoch reads, in its order (drawn from the seed and the epoch alone)."""
        return self._order

    def _order_for(self, epoch: int) -> np.ndarray:
        if self.balanced:
            assert self.labels is not None
            return balanced_order(self.labels, self.rows, np.random.default_rng([self.seed, epoch]))
        if not self.shuffle:
            return np.arange(self.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.rows)

    def __len__(self) -> int:
        return math.ceil(self.rows / self.batch_size)

    def _rows(self, index: int) -> np.ndarray:
        return self._order[index * self.batch_size : (index + 1) * self.batch_size]

    def _read(self, rows: np.ndarray) -> Batch:
        arrays = [read_rows(array, rows) for array in self.inputs]
        return arrays[0] if self.single else tuple(arrays)

    def __getitem__(self, index: int) -> Batch | tuple[Batch, np.ndarray] | tuple[Batch, np.ndarray, np.ndarray]:
        rows = self._rows(index)
        x = self._read(rows)
        if self.labels is None:
            return x
        labels = self.labels[rows]
        if self.class_weights is None:
            return x, labels
        return x, labels, self.class_weights[labels]

    def on_epoch_end(self) -> None:
        self.go_to_epoch(self.epoch + 1)

    def go_to_epoch(self, epoch: int) -> None:
        """Read epoch ``epoch``'s batches from now on."""
        if epoch != self.epoch:
            self.epoch = epoch
            if self.shuffle or self.balanced:
                self._order = self._order_for(epoch)

    def at_epoch(self, epoch: int) -> FileBatches:
        """A copy that reads epoch ``epoch``'s batches, leaving this one where it is."""
        other = copy.copy(self)
        other.epoch = epoch
        other._order = other._order_for(epoch)
        return other


class ViewBatches(FileBatches):
    """Batches from one of several versions of the same rows, the next version each epoch.

    ``views`` holds K arrays (or lists of arrays) with the same rows and
    ``labels``: the frozen part's outputs for K augmented copies of the
    training images. Epoch ``e`` of the run reads version ``e % K``.
    """

    def __init__(
        self,
        views: Sequence[Inputs],
        labels: ArrayLike,
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        *,
        balanced: bool = False,
        class_weights: ArrayLike | None = None,
    ) -> None:
        super().__init__(
            views[0], labels, batch_size, shuffle, seed, epoch, balanced=balanced, class_weights=class_weights
        )
        self.views = [list(view) if isinstance(view, (list, tuple)) else [view] for view in views]
        self.inputs = self.views[epoch % len(self.views)]

    def go_to_epoch(self, epoch: int) -> None:
        super().go_to_epoch(epoch)
        self.inputs = self.views[self.epoch % len(self.views)]

    def at_epoch(self, epoch: int) -> ViewBatches:
        other = super().at_epoch(epoch)
        other.inputs = other.views[epoch % len(other.views)]
        return other


class MixedBatches(FileBatches):
    """Shuffled training batches with one-hot targets, each batch passed through ``mix``.

    ``mix(images, targets, rng)`` returns the mixed batch (see
    :mod:`finetune.catalog.mixing`). Each batch's generator is seeded from
    the seed, the epoch and the batch's position, so a run repeats exactly.
    With ``class_weights``, a mixed example weighs as its target row mixes
    the classes' weights.
    """

    def __init__(
        self,
        images: Rows,
        labels: ArrayLike,
        classes: int,
        batch_size: int,
        mix: Callable[..., tuple[np.ndarray, np.ndarray]],  # mix(images, targets, rng)
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        *,
        balanced: bool = False,
        class_weights: ArrayLike | None = None,
    ) -> None:
        super().__init__(
            images, labels, batch_size, shuffle, seed, epoch, balanced=balanced, class_weights=class_weights
        )
        self.classes = classes
        self.mix = mix

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        assert self.labels is not None
        rows = self._rows(index)
        targets = one_hot(self.labels[rows], self.classes)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        images, mixed = self.mix(self._read(rows), targets, rng)
        if self.class_weights is None:
            return images, mixed
        return images, mixed, np.asarray(mixed, dtype=np.float32) @ self.class_weights


def one_hot(labels: ArrayLike, classes: int) -> np.ndarray:
    """Integer labels as float32 one-hot rows (the targets mixed batches train on); multi-hot rows (a
    multi-label run's, one column per tag) are already such targets and come back as float32."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == classes and classes > 1:
        return labels.astype(np.float32)
    return np.eye(classes, dtype=np.float32)[labels.reshape(-1)]
