"""Learning-rate schedules from "Training Deep Neural Networks" (Hands-On ML, ch. 11).

A phase names one schedule; the optimizer's ``learning_rate`` is its
``lr0`` (for one_cycle and cosine: the peak). Durations (``s``,
``boundaries``, ``warmup``) count optimizer steps, or epochs with
``unit: epoch``. Keras's own schedule classes are used where Keras has the
formula; the rest are small ``LearningRateSchedule`` classes written with
``keras.ops`` (serializable, every backend).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from finetune.registry import Registry


@dataclass(frozen=True)
class ScheduleContext:
    """What a schedule needs to know about the phase it drives."""

    initial_learning_rate: float
    steps_per_epoch: int
    epochs: int

    @property
    def total_steps(self) -> int:
        return max(1, self.steps_per_epoch * self.epochs)


@dataclass(frozen=True)
class Schedule:
    """A built schedule: the optimizer's learning rate, and callbacks it needs."""

    learning_rate: Any  # a float or a keras LearningRateSchedule
    callbacks: tuple = ()


@dataclass(frozen=True)
class ScheduleSpec:
    """A registered schedule: ``spec(context, unit="step", **params)`` builds it for one phase."""

    name: str
    build: Callable[..., Schedule]
    step_based: bool
    """True when the schedule computes the rate from the step count (it then owns it)."""
    formula: str = ""

    def __call__(self, context: ScheduleContext, unit: str = "step", **params: Any) -> Schedule:
        if unit not in ("step", "epoch"):
            raise ValueError(f"unit must be 'step' or 'epoch', got {unit!r}")
        return self.build(context, context.steps_per_epoch if unit == "epoch" else 1, **params)


def build_schedule(identifier: str | dict | None, context: ScheduleContext) -> Schedule:
    """A schedule from a name or ``{name: ..., **params}`` for one phase (None: the constant rate)."""
    if identifier is None:
        return Schedule(context.initial_learning_rate)
    return schedules.get(identifier, context=context)


def schedule_spec(identifier) -> ScheduleSpec | None:
    """The registered spec an identifier names, without building it."""
    if identifier is None:
        return None
    return schedules.entry(schedules.split(identifier)[0])


# --- schedule classes -----------------------------------------------------


@keras.saving.register_keras_serializable(package="finetune")
class PowerDecay(keras.optimizers.schedules.LearningRateSchedule):
    """lr0 / (1 + step / s) ** c."""

    def __init__(self, initial_learning_rate: float, s: float, c: float = 1.0):
        self.initial_learning_rate, self.s, self.c = float(initial_learning_rate), float(s), float(c)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        return self.initial_learning_rate / ops.power(1.0 + step / self.s, self.c)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "s": self.s, "c": self.c}


@keras.saving.register_keras_serializable(package="finetune")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """1cycle as the chapter describes it (and its companion notebook computes it).

    Up linearly from ``start`` to ``peak`` over the first half of the cycle,
    down linearly back to ``start`` over the second half, then a final
    annealing (the last ``total_steps // 10 + 1`` steps) down to ``end``.
    """

    def __init__(self, peak: float, total_steps: int, start: float, end: float):
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.start, self.end = float(start), float(end)

    @property
    def half(self) -> int:
        return max(1, (self.total_steps - (self.total_steps // 10 + 1)) // 2)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        half, total = float(self.half), float(max(self.total_steps, 2 * self.half + 1))
        rising = self.start + (self.peak - self.start) * step / half
        falling = self.peak - (self.peak - self.start) * (step - half) / half
        annealing = self.start - (self.start - self.end) * ops.minimum((step - 2 * half) / (total - 2 * half), 1.0)
        return ops.where(step < half, rising, ops.where(step < 2 * half, falling, annealing))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "start": self.start, "end": self.end}


class OneCycleMomentum(keras.callbacks.Callback):
    """Moves momentum against the 1cycle rate: high, low at the peak, high again.

    Sets SGD's ``momentum`` or Adam/Nadam's ``beta_1`` before every batch.
    The optimizer holds that value in a variable (``schedule_hyperparameter``).
    """

    def __init__(self, cycle: OneCycle, low: float, high: float, attribute: str):
        super().__init__()
        self.cycle, self.low, self.high, self.attribute = cycle, float(low), float(high), attribute

    def value_at(self, step: int) -> float:
        half = self.cycle.half
        if step < half:
            return self.high - (self.high - self.low) * step / half
        if step < 2 * half:
            return self.low + (self.high - self.low) * (step - half) / half
        return self.high

    def on_train_batch_begin(self, batch, logs=None):
        optimizer = self.model.optimizer
        inner = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer
        step = int(ops.convert_to_numpy(inner.iterations))
        getattr(inner, self.attribute).assign(self.value_at(step))


def momentum_attribute(optimizer) -> str | None:
    """The optimizer attribute that plays momentum's role, if any."""
    if isinstance(optimizer, keras.optimizers.SGD):
        return "momentum"
    if hasattr(optimizer, "beta_1"):
        return "beta_1"
    return None


# --- registry entries -----------------------------------------------------


def _constant(context, scale) -> Schedule:
    return Schedule(context.initial_learning_rate)


def _power(context, scale, s: float, c: float = 1.0) -> Schedule:
    if s <= 0:
        raise ValueError("s must be positive")
    return Schedule(PowerDecay(context.initial_learning_rate, s * scale, c))


def _exponential(context, scale, s: float) -> Schedule:
    if s <= 0:
        raise ValueError("s must be positive")
    # Keras's ExponentialDecay is lr0 * rate ** (step / decay_steps): the chapter's formula with rate 0.1.
    return Schedule(keras.optimizers.schedules.ExponentialDecay(context.initial_learning_rate, s * scale, 0.1))


def _piecewise_constant(context, scale, boundaries: list, values: list) -> Schedule:
    if len(values) != len(boundaries) + 1:
        raise ValueError(
            f"needs one more value than boundaries, got {len(boundaries)} boundaries and {len(values)} values"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError("boundaries must increase")
    steps = [int(round(boundary * scale)) for boundary in boundaries]
    return Schedule(keras.optimizers.schedules.PiecewiseConstantDecay(steps, [float(v) for v in values]))


def _performance(
    context, scale, factor: float = 0.5, patience: int = 5, monitor: str = "val_loss", min_learning_rate: float = 0.0
) -> Schedule:
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor=monitor, factor=factor, patience=patience, min_lr=min_learning_rate
    )
    return Schedule(context.initial_learning_rate, (callback,))


def _one_cycle(
    context,
    scale,
    div_factor: float = 10.0,
    final_div_factor: float = 1000.0,
    momentum: tuple | list | None = (0.85, 0.95),
) -> Schedule:
    peak = context.initial_learning_rate
    start = peak / div_factor
    cycle = OneCycle(peak, context.total_steps, start, start / final_div_factor)
    callbacks: tuple = ()
    if momentum is not None:
        low, high = momentum
        callbacks = (PendingMomentum(cycle, low, high),)
    return Schedule(cycle, callbacks)


class PendingMomentum:
    """A momentum schedule waiting for the optimizer it will drive."""

    def __init__(self, cycle, low, high):
        self.cycle, self.low, self.high = cycle, low, high

    def bind(self, optimizer) -> keras.callbacks.Callback | None:
        attribute = momentum_attribute(optimizer)
        if attribute is None or not hasattr(optimizer, "schedule_hyperparameter"):
            return None
        if attribute == "momentum" and float(optimizer.momentum) == 0.0:
            return None  # plain SGD has no momentum to cycle
        setattr(optimizer, attribute, self.high)
        optimizer.schedule_hyperparameter(attribute)
        return OneCycleMomentum(self.cycle, self.low, self.high, attribute)


def _cosine(context, scale, warmup: float = 0, alpha: float = 0.0, min_warmup_steps: int = 0) -> Schedule:
    if min_warmup_steps < 0:
        raise ValueError(f"min_warmup_steps must be >= 0, got {min_warmup_steps}")
    # A warm-up in epochs is a step or two on a small dataset; the floor (Ultralytics warms up for
    # max(warmup_epochs * batches, 100) iterations) is capped at half the phase so a decay is left.
    floor = min(int(min_warmup_steps), context.total_steps // 2)
    warmup_steps = max(int(round(warmup * scale)), floor)
    decay_steps = max(1, context.total_steps - warmup_steps)
    peak = context.initial_learning_rate
    if warmup_steps == 0:
        return Schedule(keras.optimizers.schedules.CosineDecay(peak, decay_steps, alpha=alpha))
    return Schedule(
        keras.optimizers.schedules.CosineDecay(
            0.0,
            decay_steps,
            alpha=alpha,
            warmup_target=peak,
            warmup_steps=warmup_steps,
        )
    )


schedules: Registry[ScheduleSpec] = Registry(
    "schedules",
    builtins={
        spec.name: spec
        for spec in (
            ScheduleSpec("constant", _constant, False, "lr0"),
            ScheduleSpec("power", _power, True, "lr0 / (1 + step/s)^c"),
            ScheduleSpec("exponential", _exponential, True, "lr0 * 0.1^(step/s)"),
            ScheduleSpec("piecewise_constant", _piecewise_constant, True, "values[i] between boundaries"),
            ScheduleSpec("performance", _performance, False, "lr * factor after `patience` epochs without improvement"),
            ScheduleSpec(
                "one_cycle", _one_cycle, True, "lr0/10 -> lr0 -> lr0/10 -> lr0/10000, momentum 0.95 -> 0.85 -> 0.95"
            ),
            ScheduleSpec(
                "cosine",
                _cosine,
                True,
                "linear warm-up (at least min_warmup_steps) to lr0, then cosine decay to alpha * lr0",
            ),
        )
    },
)
