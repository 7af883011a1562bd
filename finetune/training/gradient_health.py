"""Gradient health, the chapter's first problem: vanishing and exploding gradients, dead and saturated units.

Every ``every_steps`` training steps, :class:`GradientHealth` takes one fixed
batch, computes each trainable layer's gradient norm and, for dense layers,
the share of dead units (output zero for every image of the batch) and of
saturated ones (a sigmoid or tanh pinned near its limits), and warns in plain
words when the lowest layers get far smaller gradients than the top
(vanishing) or when gradients grow huge or stop being finite (exploding).
At the end of a phase it draws ``gradient_norms.png``: layers from input to
output on one axis, the norm on a log scale, one line per sample. The
gradient itself is the one backend-specific piece (:func:`layer_gradient_norms`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune._keras_compat import calls_in_graph
from finetune.backbones.blocks import nested_layers
from finetune.catalog.callbacks import RunCallback
from finetune.files import write_atomically, write_json_atomically
from finetune.training.checkpoints import seed_generator_states
from finetune.training.context import PhaseFit

logger = logging.getLogger(__name__)

VANISHING_RATIO = 1e-4  # lowest layer's norm against the largest layer's
EXPLODING_NORM = 1e3


def layer_gradient_norms(model: keras.Model, x: Any, y: Any, loss_fn: Callable[[Any, Any], Any]) -> dict[str, float]:
    """The L2 norm of the loss's gradient over each layer's trainable weights, in the model's layer order.

    Computed eagerly, one way per backend: the reference :class:`HealthSampler`'s traced sample is checked
    against, and the way a distributed model is sampled.
    """
    variables = list(model.trainable_variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        def replica_gradients(x: Any, y: Any) -> Any:
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            return tape.gradient(loss, variables)

        if tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context():
            # A tf.distribute strategy's variables are read inside a replica: each replica sees the
            # same batch here, so the first replica's gradients are the sample's.
            strategy = tf.distribute.get_strategy()
            per_replica = strategy.run(tf.function(replica_gradients), args=(x, y))
            raw = [None if g is None else strategy.experimental_local_results(g)[0] for g in per_replica]
        else:
            raw = replica_gradients(x, y)
        gradients = [None if g is None else np.asarray(g) for g in raw]
    elif backend == "jax":
        import jax

        frozen = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable: Any) -> Any:
            outputs, _ = model.stateless_call(trainable, frozen, x, training=True)
            return loss_fn(y, outputs)

        gradients = [np.asarray(g) for g in jax.grad(loss_of)([v.value for v in variables])]
    elif backend == "torch":
        for variable in variables:
            variable.value.grad = None
        loss_fn(y, model(x, training=True)).backward()
        gradients = [None if v.value.grad is None else v.value.grad.detach().cpu().numpy() for v in variables]
    else:  # pragma: no cover - Keras has no other training backend
        return {}
    squares = [0.0 if g is None else float(np.sum(np.square(g.astype(np.float64)))) for g in gradients]
    return _per_layer(variables, squares)


def _per_layer(variables: list, squares: list[float]) -> dict[str, float]:
    """Each layer's norm from its variables' sums of squared gradients, in the variables' order."""
    totals: dict[str, float] = {}
    for variable, square in zip(variables, squares, strict=True):
        layer = variable.path.rsplit("/", 1)[0]
        totals[layer] = totals.get(layer, 0.0) + float(square)
    return {layer: math.sqrt(total) for layer, total in totals.items()}


def unit_health(
    model: keras.Model, x: Any, probe: tuple[list, keras.Model | None] | None = None
) -> dict[str, dict[str, float]]:
    """For each dense layer on batch ``x``: the share of dead units (zero for every image) and of saturated
    sigmoid/tanh outputs (within 0.01 of a limit, where the slope is nearly zero).

    ``probe``: :func:`dense_probe` of ``model``, when the caller keeps it (building it took longer than
    running it).
    """
    dense, probe_model = probe if probe is not None else dense_probe(model)
    if probe_model is None:
        return {}
    outputs = probe_model(x, training=False)
    return _units(dense, _as_list(outputs))


def _units(dense: list, outputs: list) -> dict[str, dict[str, float]]:
    """Dead and saturated shares of each dense layer's outputs on one batch."""
    health = {}
    for layer, output in zip(dense, outputs, strict=True):
        values = keras.ops.convert_to_numpy(output).astype(np.float64)
        values = values.reshape(len(values), -1)
        activation = getattr(layer.activation, "__name__", "")
        dead = float(np.mean(np.all(values == 0.0, axis=0)))
        if activation == "sigmoid":  # the share of outputs where the slope is nearly zero
            saturated = float(np.mean((values < 0.01) | (values > 0.99)))
        elif activation == "tanh":
            saturated = float(np.mean(np.abs(values) > 0.99))
        else:
            saturated = 0.0
        health[layer.name] = {"dead": dead, "saturated": saturated}
    return health


def dense_probe(model: keras.Model) -> tuple[list, keras.Model | None]:
    """The model's dense layers and a model from its inputs to their outputs (None: no dense layer)."""
    dense, tensors = [], []
    functional = isinstance(model, keras.Model) and not isinstance(model, keras.Sequential)
    for layer in model.layers:
        if not isinstance(layer, keras.layers.Dense):
            continue
        if not functional:
            dense.append(layer)
            tensors.append(layer.output)
            continue
        calls = calls_in_graph(layer, model)
        if calls:  # the layer's output in this graph (a cached top model shares the full model's layers)
            dense.append(layer)
            tensors.append(calls[0].output_tensors[0])
    if not dense:
        return [], None
    inputs = model.inputs
    return dense, keras.Model(inputs[0] if len(inputs) == 1 else inputs, tensors)  # one input as itself, as x is


def _side_effect_variables(model: keras.Model) -> list:
    """The variables a forward pass in training mode changes: BatchNorm statistics and RNG states."""

    found = []
    for layer in nested_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            found += [layer.moving_mean, layer.moving_variance]
    found += seed_generator_states(model)
    return list({id(variable): variable for variable in found}.values())


class HealthSampler:
    """Gradient norms and unit health of one model on one batch: traced once, then one call per sample.

    A sample calls the model in training mode (for the gradient), which moves BatchNorm statistics and
    dropout's random state; the sample puts them back, so a run with samples draws what one without them
    draws. On TensorFlow the whole sample (unit outputs, gradient, its sums of squares, the restore) is
    one traced call; on JAX a jitted pure function (nothing moves, nothing to restore); on torch and under
    a tf.distribute strategy, the eager way. For a small head, where a sample every 200 steps was most of
    what finetune's callbacks add to an epoch, one call halved a sample's time after the first (which
    traces): ``scripts/callback_costs.py``.
    """

    def __init__(self, model: keras.Model, loss_fn: Callable[[Any, Any], Any]):
        self.model = model
        self.loss_fn = loss_fn
        self.variables = list(model.trainable_variables)
        self.dense, self.probe = dense_probe(model)
        self._traced: Callable | None = None

    def __call__(self, x: Any, y: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(each layer's gradient norm, each dense layer's dead and saturated shares) on ``(x, y)``."""
        backend = keras.backend.backend()
        if not self.variables or backend not in ("tensorflow", "jax") or _distributed():
            return self._eager(x, y)
        if self._traced is None:
            self._traced = self._tensorflow() if backend == "tensorflow" else self._jax()
        squares, outputs = self._traced(x, y)
        squares = keras.ops.convert_to_numpy(squares).astype(np.float64)
        return _per_layer(self.variables, list(squares)), _units(self.dense, list(outputs))

    def _eager(self, x: Any, y: Any) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        state = _side_effect_variables(self.model)
        saved = [keras.ops.convert_to_numpy(variable) for variable in state]
        try:
            units = unit_health(self.model, x, (self.dense, self.probe))
            return layer_gradient_norms(self.model, x, y, self.loss_fn), units
        finally:
            for variable, value in zip(state, saved, strict=True):
                variable.assign(value)

    def _tensorflow(self) -> Callable:
        import tensorflow as tf

        model, probe, variables, loss_fn = self.model, self.probe, self.variables, self.loss_fn
        state = _side_effect_variables(model)

        def sample(x: Any, y: Any) -> tuple[Any, list]:
            outputs = _as_list(probe(x, training=False)) if probe is not None else []
            saved = [tf.identity(variable.value) for variable in state]  # read before the call moves them
            with tf.GradientTape() as tape:
                loss = loss_fn(y, model(x, training=True))
            gradients = tape.gradient(loss, variables)
            squares = tf.stack(
                [
                    tf.zeros((), tf.float64)
                    if gradient is None
                    else tf.reduce_sum(tf.square(tf.cast(tf.convert_to_tensor(gradient), tf.float64)))
                    for gradient in gradients
                ]
            )
            for variable, value in zip(state, saved, strict=True):  # after the call: ordered by the graph
                variable.assign(value)
            return squares, outputs

        return tf.function(sample)

    def _jax(self) -> Callable:
        import jax
        import jax.numpy as jnp

        model, probe, loss_fn = self.model, self.probe, self.loss_fn
        # The variables' values are read at each sample (training moves them); which variables, once.
        variables = [
            self.variables,
            model.non_trainable_variables,
            [] if probe is None else probe.trainable_variables,
            [] if probe is None else probe.non_trainable_variables,
        ]

        def pure(values: list, x: Any, y: Any) -> tuple[Any, list]:
            trainable, frozen, probe_trainable, probe_frozen = values

            def loss_of(weights: list) -> Any:
                outputs, _ = model.stateless_call(weights, frozen, x, training=True)
                return loss_fn(y, outputs)

            gradients = jax.grad(loss_of)(trainable)
            squares = jnp.stack([jnp.sum(jnp.square(g.astype(jnp.float32))) for g in gradients])
            if probe is None:
                return squares, []
            outputs, _ = probe.stateless_call(probe_trainable, probe_frozen, x, training=False)
            return squares, _as_list(outputs)

        jitted = jax.jit(pure)

        def sample(x: Any, y: Any) -> tuple[Any, list]:
            return jitted([[v.value for v in group] for group in variables], x, y)

        return sample


def _as_list(outputs: Any) -> list:
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


def _distributed() -> bool:
    """Whether a tf.distribute strategy holds the model's variables (read inside a replica)."""
    if keras.backend.backend() != "tensorflow":
        return False
    import tensorflow as tf

    return tf.distribute.has_strategy() and tf.distribute.in_cross_replica_context()


class GradientHealth(RunCallback):
    """Samples gradient norms and unit health every ``every_steps`` steps; warns once per phase per problem.

    Its sample is one batch of what the fit trains on (cached features under a cached top), handed over
    by the fit through :meth:`set_run`.
    """

    def __init__(
        self,
        run_dir: Path | None,
        phase: str,
        every_steps: int = 200,
        sample_size: int = 64,
    ):
        super().__init__()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.phase = phase
        self.every_steps = every_steps
        self.sample_size = sample_size
        self.sample: tuple | None = None  # (x, y): one batch of what the fit trains on
        self.samples: list[dict] = []
        self.warnings: list[str] = []
        self._step = 0
        self._sampler: HealthSampler | None = None  # kept for the model Keras fits

    def set_model(self, model: keras.Model) -> None:
        super().set_model(model)
        self._sampler = None

    def set_run(self, fit: PhaseFit) -> None:
        super().set_run(fit)
        self.sample = fit.sample()

    # Sampled as the next step begins, not as a step ends: Keras runs batch-end hooks on a thread, overlapping
    # the next step, when every callback allows it, and this one calls the model. The last step's sample
    # is taken when the fit ends.
    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._sample_if_due()
        self._step += 1

    def _sample_if_due(self) -> None:
        due = self._step == 1 or (self._step > 0 and self._step % self.every_steps == 0)
        if self.sample is not None and due and (not self.samples or self.samples[-1]["step"] != self._step):
            self.record()

    def record(self) -> None:
        assert self.sample is not None
        inputs, labels = self.sample
        if isinstance(inputs, (list, tuple)):
            x = [part[: self.sample_size] for part in inputs]
        else:
            x = inputs[: self.sample_size]
        y = labels[: self.sample_size]
        if self._sampler is None:
            loss = self.model.loss
            loss = keras.losses.get(loss) if isinstance(loss, str) else loss
            self._sampler = HealthSampler(self.model, lambda truth, predicted: keras.ops.mean(loss(truth, predicted)))
        norms, health = self._sampler(x, y)
        self.samples.append({"step": self._step, "norms": norms, "units": health})
        self._check(norms, health)

    def _check(self, norms: dict[str, float], health: dict) -> None:
        values = [value for value in norms.values() if value > 0 or not math.isfinite(value)]
        if not values:
            return
        if not all(math.isfinite(v) for v in values) or max(values) > EXPLODING_NORM:
            self._warn(
                "exploding",
                f"gradients explode in phase {self.phase} (largest layer norm {max(values):.3g} at step "
                f"{self._step}): lower the learning rate or clip gradients (optimizer: {{clipnorm: 1.0}})",
            )
        layers = list(norms)
        lowest, top = norms[layers[0]], max(values)
        if top > 0 and lowest / top < VANISHING_RATIO:
            self._warn(
                "vanishing",
                f"gradients vanish in phase {self.phase}: the lowest layer ({layers[0]}) gets {lowest:.2g}, "
                f"{top / max(lowest, 1e-300):.2g} times less than the largest ({top:.2g}); try He init with "
                "ReLU/ELU (or LeCun with SELU), batch norm, or fewer saturating activations",
            )
        for name, units in health.items():
            if units["dead"] >= 0.5:
                self._warn(
                    "dead",
                    f"{units['dead']:.0%} of the units of {name} are dead (always zero) in phase "
                    f"{self.phase}: try LeakyReLU/ELU or a lower learning rate",
                )
            if units["saturated"] >= 0.5:
                self._warn(
                    "saturated",
                    f"{units['saturated']:.0%} of the units of {name} are saturated in phase "
                    f"{self.phase}: try ReLU-family activations or a smaller init",
                )

    def _warn(self, kind: str, message: str) -> None:
        if any(existing.startswith(kind + ":") for existing in self.warnings):
            return
        self.warnings.append(f"{kind}: {message}")
        logger.warning(message)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self._sample_if_due()
        if self.run_dir is None or not self.samples:
            return
        record = self.run_dir / "gradient_norms.json"
        earlier = json.loads(record.read_text()) if record.exists() else {}
        earlier[self.phase] = self.samples
        write_json_atomically(record, earlier)
        write_atomically(self.run_dir / "gradient_norms.png", lambda path: draw_gradient_norms(earlier, path))


def draw_gradient_norms(phases: dict[str, list[dict]], path: Path) -> Path:
    """Layers (input to output) on the x axis, gradient norm on a log y axis, one line per sample."""
    from PIL import Image, ImageDraw, ImageFont

    width, height, left, right, top, bottom = 900, 480, 70, 20, 40, 150
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    samples = [(phase, sample) for phase, items in phases.items() for sample in items]
    layers: list[str] = []
    for _, sample in samples:
        layers += [name for name in sample["norms"] if name not in layers]
    values = [v for _, s in samples for v in s["norms"].values() if v > 0 and math.isfinite(v)]
    if not layers or not values:
        image.save(path, format="PNG")
        return path
    low, high = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    high = max(high, low + 1)

    def xy(index: int, value: float) -> tuple[float, float]:
        x = left + (width - left - right) * (index / max(len(layers) - 1, 1))
        y = top + (height - top - bottom) * (high - math.log10(value)) / (high - low)
        return x, y

    for power in range(low, high + 1):
        y = xy(0, 10.0**power)[1]
        draw.line([(left, y), (width - right, y)], fill="#dddddd")
        draw.text((8, y - 6), f"1e{power}", fill="black", font=font)
    for position, (phase, sample) in enumerate(samples):
        shade = int(200 * (1 - position / max(len(samples) - 1, 1)))
        colour = (shade, shade, 255) if list(phases).index(phase) % 2 == 0 else (255, shade, shade)
        points = [
            xy(layers.index(name), value)
            for name, value in sample["norms"].items()
            if value > 0 and math.isfinite(value)
        ]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
    step = max(1, len(layers) // 40)
    for index in range(0, len(layers), step):
        x = xy(index, 10.0**low)[0]
        label = Image.new("RGBA", (140, 12), (255, 255, 255, 0))
        ImageDraw.Draw(label).text((0, 0), layers[index][-22:], fill="black", font=font)
        image.paste(label.rotate(60, expand=True), (int(x) - 10, height - bottom + 4), label.rotate(60, expand=True))
    draw.text(
        (left, 12),
        "gradient norm per layer (log scale); later samples darker; blue/red alternate by phase",
        fill="black",
        font=font,
    )
    image.save(path, format="PNG")
    return path
