"""The backbone registry: every ``keras.applications`` model, ``mlp``, ``efficientnet_lite0`` and ``run``.

Other packages add backbones (a :class:`~finetune.backbones.spec.BackboneSpec`)
through the entry-point group ``finetune.backbones``.
"""

from __future__ import annotations

from finetune.backbones.spec import BackboneSpec
from finetune.errors import RecipeError
from finetune.registry import Registry


def _run_placeholder(input_shape, weights, **options):
    raise RecipeError("model.backbone: name run needs path: RUN_DIR")


#: ``name: run`` is resolved from its run folder (:mod:`finetune.backbones.reuse`); this entry lists it.
RUN = BackboneSpec(
    name="run",
    build=_run_placeholder,
    preprocessing="none",
    min_size=1,
    block_pattern=r"^$",
    notes="a finished run's trained backbone, without its head: {name: run, path: RUN_DIR}",
)


def _builtin_backbones() -> dict[str, BackboneSpec]:
    # Imported on the first lookup: the built-in backbone tables load Keras applications.
    from finetune.backbones import applications, efficientnet_lite, mlp

    return {**applications.specs(), "mlp": mlp.SPEC, "efficientnet_lite0": efficientnet_lite.SPEC, "run": RUN}


backbones: Registry[BackboneSpec] = Registry("backbones", instance_type=BackboneSpec, builtins=_builtin_backbones)


def get(identifier: str | BackboneSpec) -> BackboneSpec:
    """The spec registered under a name (or the spec itself)."""
    if isinstance(identifier, BackboneSpec):
        return identifier
    return backbones.entry(identifier)
