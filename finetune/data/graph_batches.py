"""The same batches as a :class:`~finetune.data.batches.FileBatches`, read inside TensorFlow's input pipeline.

Keras feeds a ``PyDataset`` to TensorFlow through a Python generator, one call per batch; on a small
model (a head on cached features) that made an epoch about a third longer than Keras's own array input
(``scripts/feed_bench.py``). Arrays that are already in
memory can instead be handed to ``tf.data`` once and gathered there, as Keras's own array input
does. The epoch's row order is still :attr:`FileBatches.order` (drawn from the seed and the epoch alone),
so a resumed run reads what an uninterrupted one would; :class:`EpochOrder` tells the pipeline which
epoch Keras begins. Only for the TensorFlow backend (the JAX and torch backends read the
``PyDataset``), only for in-memory arrays (a memory-mapped cache is read a batch at a time, never
copied), and only up to :data:`MAX_COPY_BYTES`: TensorFlow copies the arrays it is given. Other batches on
TensorFlow (augmented views, mixed batches, memory-mapped arrays) are read through a generator, as Keras
would, but in a pipeline finetune sets up itself.

Every pipeline here runs with ``tf.data``'s autotuning off (:func:`steady_options`): on this project's
2-core CPU, with it on, an epoch or a prediction took either its usual time or far longer at random, the
longer ones using one core for the same CPU seconds (``scripts/autotune_bench.py``). Nothing here needs
tuning: batches are gathered in one step and two are kept ready.
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from finetune.data.batches import FileBatches

MAX_COPY_BYTES = 2 * 2**30  # above this, a second copy of the arrays costs more than the steps save

__all__ = ["MAX_COPY_BYTES", "EpochOrder", "fit_feed", "steady_options"]


class EpochOrder(keras.callbacks.Callback):
    """Sets the epoch whose row order an in-graph pipeline reads, as Keras begins it (before its first batch)."""

    def __init__(self, batches: FileBatches) -> None:
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.batches.go_to_epoch(epoch)


def can_read_in_graph(batches: keras.utils.PyDataset) -> bool:
    """Plain batches of in-memory arrays, small enough to copy, on the TensorFlow backend."""
    if keras.backend.backend() != "tensorflow" or type(batches) is not FileBatches:
        return False  # views and mixed batches change their arrays or pixels per epoch or batch
    arrays = [*batches.inputs, *([] if batches.labels is None else [batches.labels])]
    if any(isinstance(array, np.memmap) or not isinstance(array, np.ndarray) for array in arrays):  # files
        return False
    if batches.class_weights is not None and (batches.labels is None or batches.labels.ndim != 1):
        return False
    return sum(array.nbytes for array in arrays) <= MAX_COPY_BYTES


def steady_options() -> Any:
    """``tf.data`` options with autotuning off (see the module's docstring for why)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def fit_feed(batches: keras.utils.PyDataset) -> tuple[Any, list[keras.callbacks.Callback]]:
    """What ``fit`` reads for ``batches``, and the callbacks that keep it in step with Keras's epochs.

    On TensorFlow, a ``tf.data.Dataset`` with the batches' rows, order and weights: gathered in the graph
    where :func:`can_read_in_graph`, read through a generator otherwise (any ``PyDataset`` read in one
    epoch, such as the learning-rate sweep's); on other backends the batches themselves and no callback.
    """
    if keras.backend.backend() != "tensorflow":
        return batches, []
    if not can_read_in_graph(batches):
        return _generated(batches), ([EpochOrder(batches)] if isinstance(batches, FileBatches) else [])
    import tensorflow as tf

    rows = batches.rows

    def order() -> np.ndarray:
        return np.asarray(batches.order, dtype=np.int64)  # drawn when EpochOrder moved the batches there

    def epoch_rows(_: Any) -> Any:
        return tf.ensure_shape(tf.numpy_function(order, [], tf.int64, stateful=True), [rows])

    inputs = [tf.constant(array) for array in batches.inputs]
    labels = None if batches.labels is None else tf.constant(batches.labels)
    weights = None if batches.class_weights is None else tf.constant(batches.class_weights)

    def gather(batch_rows: Any) -> Any:
        images = [tf.gather(array, batch_rows) for array in inputs]
        x = images[0] if batches.single else tuple(images)
        if labels is None:
            return x
        y = tf.gather(labels, batch_rows)
        if weights is None:
            return x, y
        return x, y, tf.gather(weights, y)

    size, count = batches.batch_size, len(batches)

    def in_batches(order: Any) -> Any:  # slices of the epoch's order: one element per batch, not per row
        return tf.data.Dataset.range(count).map(lambda index: order[index * size : (index + 1) * size])

    pipeline = tf.data.Dataset.from_tensors(0).map(epoch_rows).flat_map(in_batches)
    return _steady(pipeline.map(gather), count), [EpochOrder(batches)]


def _generated(batches: keras.utils.PyDataset) -> Any:
    """The batches of the epoch :class:`EpochOrder` moved them to, read one call at a time, as Keras would."""
    import tensorflow as tf

    def spec(value: Any) -> Any:  # any batch length: the last batch may be short
        if isinstance(value, (tuple, list)):
            return tuple(spec(part) for part in value)
        array = np.asarray(value)
        return tf.TensorSpec((None, *array.shape[1:]), tf.as_dtype(array.dtype))

    def as_tuples(value: Any) -> Any:  # the structure the signature names
        return tuple(as_tuples(part) for part in value) if isinstance(value, (tuple, list)) else value

    def epoch() -> Any:
        for index in range(len(batches)):
            yield as_tuples(batches[index])

    return _steady(tf.data.Dataset.from_generator(epoch, output_signature=spec(batches[0])), len(batches))


def _steady(pipeline: Any, count: int) -> Any:
    """``pipeline`` with its length stated, two batches kept ready and no autotuning."""
    import tensorflow as tf

    # Known length: Keras then runs each epoch's steps without waiting for the pipeline's end.
    pipeline = pipeline.apply(tf.data.experimental.assert_cardinality(count)).prefetch(2)
    return pipeline.with_options(steady_options())
