"""Every use of a private Keras API, in one place.

Keras 3 has no public way to walk a functional graph by node, to ask an
optimizer for a variable's slot, or to see the downloads
``keras.applications`` makes. Each helper here wraps one such private name;
``tests/test_keras_compat.py`` checks each against public behaviour, so a
Keras release that moves one fails there, by name, and nowhere else.
pyproject.toml bounds Keras below 4.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


def inbound_nodes(operation: Any) -> list:
    """The calls of a layer or operation, in the order they were made."""
    return list(getattr(operation, "_inbound_nodes", []))


def producer(tensor: Any) -> Any | None:
    """The layer or operation whose call made the symbolic ``tensor`` (None for an input)."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def parent_operations(operation: Any) -> list:
    """Operations whose outputs feed ``operation``, over all its calls."""
    found = []
    for node in inbound_nodes(operation):
        for tensor in node.input_tensors:
            parent = producer(tensor)
            if parent is not None:
                found.append(parent)
    return found


def calls_in_graph(layer: Any, graph: Any) -> list:
    """The calls (nodes) of ``layer`` that belong to the functional model ``graph``.

    A layer reused in a derived model (a cut of a model) gains calls of its
    own; only those recorded in ``graph`` describe ``graph``.
    """
    from keras.src.ops.function import make_node_key

    return [node for index, node in enumerate(inbound_nodes(layer)) if make_node_key(layer, index) in graph._nodes]


def variable_index(optimizer: Any, variable: Any) -> int:
    """The position of ``variable`` among the variables ``optimizer`` was built for."""
    return optimizer._get_variable_index(variable)


@contextlib.contextmanager
def keras_downloads(handler: Callable[[str, str, str | None, Callable[[], str]], str]) -> Iterator[None]:
    """Route the file downloads Keras makes inside this block through ``handler``.

    ``handler(fname, origin, file_hash, download)`` gets what
    ``keras.applications`` asks for (the file name, its URL and its published
    hash) and returns the local path, as ``keras.utils.get_file`` would;
    ``download()`` makes the download Keras meant to make. Outside the block
    Keras downloads as before.
    """
    from keras.src.utils import file_utils

    original = file_utils.get_file

    def routed(fname=None, origin=None, *args, **kwargs):
        file_hash = kwargs.get("file_hash") or kwargs.get("md5_hash")
        return handler(fname, origin, file_hash, lambda: original(fname, origin, *args, **kwargs))

    file_utils.get_file = routed
    try:
        yield
    finally:
        file_utils.get_file = original


@contextlib.contextmanager
def multi_worker_fit() -> Iterator[None]:
    """Let Keras 3's TensorFlow trainer fit under ``MultiWorkerMirroredStrategy`` inside this block.

    Two places reduce values across workers in a way that strategy rejects
    (keras-team/keras#20585): the build before the first step reduces a whole
    data batch (only its shapes are used), and each step's logs are reduced
    with ``MEAN`` along an axis that scalars do not have. Inside the block the
    build takes this worker's first replica's batch, and step logs take the
    first replica's values: Keras's metric variables are summed across
    replicas as they update, so every replica holds the global value.
    """
    import tensorflow as tf
    from keras.src import tree
    from keras.src.backend.tensorflow import trainer

    original_build = trainer.TensorFlowTrainer._maybe_symbolic_build
    original_reduce = trainer.reduce_per_replica

    def local(value, strategy):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def build(self, iterator=None, data_batch=None):
        if iterator is not None and data_batch is None and self._distribute_strategy is not None:
            strategy = self.distribute_strategy
            for _, _, batches in iterator:
                data_batch = tree.map_structure(lambda value: local(value, strategy), next(batches))
                break
        return original_build(self, data_batch=data_batch)

    def reduce(values, strategy, reduction):
        return original_reduce(values, strategy, "first" if reduction == "auto" else reduction)

    trainer.TensorFlowTrainer._maybe_symbolic_build = build
    trainer.reduce_per_replica = reduce
    try:
        yield
    finally:
        trainer.TensorFlowTrainer._maybe_symbolic_build = original_build
        trainer.reduce_per_replica = original_reduce
