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
