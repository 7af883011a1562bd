"""Every registry in one place, for ``finetune plugins`` and for extension.

Another package adds entries through an entry point in the group
``finetune.<kind>``, e.g. in its pyproject.toml::

    [project.entry-points."finetune.optimizers"]
    lion = "my_package.optim:build_lion"
"""

from __future__ import annotations

from finetune.registry import Registry

KINDS = ("optimizers", "schedules", "regularizers", "initializers", "activations", "backbones", "callbacks", "datasets")


def registries() -> dict[str, Registry]:
    from finetune import backbones, callbacks, data, dense, optimizers, regularizers, schedules

    return {
        "optimizers": optimizers.optimizers,
        "schedules": schedules.schedules,
        "regularizers": regularizers.regularizers,
        "initializers": dense.initializers,
        "activations": dense.activations,
        "backbones": backbones.backbones,
        "callbacks": callbacks.callbacks,
        "datasets": data.datasets,
    }


def catalog() -> dict[str, list[str]]:
    """Each kind mapped to its registered names (entry points included)."""
    return {kind: registry.names() for kind, registry in registries().items()}
