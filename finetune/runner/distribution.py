"""Where a run trains: one device, every device on this machine, or several machines, from the same recipe.

The recipe's ``distribution`` section names an existing engine: TensorFlow's
``tf.distribute`` strategies, or ``keras.distribution.DataParallel`` on JAX.
:func:`start` resolves it once per process (before TensorFlow runs anything:
a multi-worker strategy must configure its collectives first), :func:`scope`
surrounds the whole pipeline (build, every phase's compile and fit, feature
extraction, evaluation), and :meth:`Distribution.adjust` hands the stages a
plan whose batch sizes are global (per replica x replicas) and whose learning
rates follow ``lr_scaling``. Models and training never see any of this.

Multi-worker runs read ``TF_CONFIG``; every worker runs the same command, and
only the chief (task type ``chief``, else worker 0) writes the run folder: the
others work in a temporary folder they remove (:func:`worker_folder`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from finetune import _keras_compat
from finetune.errors import DistributionError, first_line
from finetune.plan import RunPlan
from finetune.recipe import DistributionConfig

ENGINES = {
    "none": "one device",
    "mirrored": "tf.distribute.MirroredStrategy",
    "multi_worker_mirrored": "tf.distribute.MultiWorkerMirroredStrategy",
    "data_parallel": "keras.distribution.DataParallel",
}


@dataclass(frozen=True)
class Cluster:
    """This process's place in the ``TF_CONFIG`` cluster."""

    workers: int
    task_type: str
    index: int
    has_chief: bool = False

    @property
    def chief(self) -> bool:
        """The chief task, or worker 0 when the cluster has none: the one that writes the run folder."""
        return self.task_type == "chief" or (self.task_type == "worker" and self.index == 0 and not self.has_chief)

    def describe(self) -> str:
        return f"{self.task_type} {self.index} of {self.workers} workers"


def cluster_from(env: Mapping[str, str]) -> Cluster | None:
    """The cluster ``TF_CONFIG`` describes, or None when it is unset; one line when it cannot be used."""
    raw = env.get("TF_CONFIG", "").strip()
    if not raw:
        return None
    try:
        config = json.loads(raw)
        members = config["cluster"]
        task = config["task"]
        task_type, index = str(task["type"]), int(task.get("index", 0))
    except (ValueError, KeyError, TypeError) as error:
        raise DistributionError(
            f"TF_CONFIG is not a cluster and task ({first_line(error)}); see docs/distributed.md"
        ) from None
    if task_type not in ("chief", "worker"):
        raise DistributionError(
            f"TF_CONFIG task type {task_type!r}: multi_worker_mirrored runs chief and worker tasks only"
        )
    workers = len(members.get("worker", [])) + len(members.get("chief", []))
    return Cluster(workers=workers, task_type=task_type, index=index, has_chief=bool(members.get("chief")))


@dataclass(frozen=True)
class Distribution:
    """A resolved ``distribution`` section: the engine, its replicas, and what they change in the numbers."""

    strategy: str
    """none, mirrored, multi_worker_mirrored (TensorFlow) or data_parallel (JAX)."""
    replicas: int = 1
    lr_scaling: str = "none"
    cluster: Cluster | None = None
    engine: Any = field(default=None, compare=False, repr=False)
    """The ``tf.distribute.Strategy`` or ``keras.distribution.DataParallel``; None for one device."""
    started_with: int | None = None
    """A resumed multi-worker run's replicas: its batches and rates stay those, on one process."""

    @property
    def scale(self) -> int:
        """The replica count the batch sizes and learning rates are computed for."""
        return self.started_with or self.replicas

    @property
    def chief(self) -> bool:
        """Whether this process writes the run folder (always, outside a multi-worker cluster)."""
        return self.cluster is None or self.cluster.chief

    @property
    def workers(self) -> int:
        return self.cluster.workers if self.cluster is not None else 1

    @property
    def lr_factor(self) -> float:
        return lr_factor(self.lr_scaling, self.scale)

    def adjust(self, plan: RunPlan) -> RunPlan:
        """``plan`` with global batch sizes and scaled learning rates; unchanged for one replica and no scaling."""
        if self.scale == 1:
            return plan
        return adjusted_plan(plan, self.scale, self.lr_factor, multi_worker=self.cluster is not None)

    def record(self, plan: RunPlan) -> dict:
        """What metrics.json keeps: the engine, replicas and workers, the batches and the rate factor."""
        return {
            "strategy": self.strategy,
            "engine": ENGINES[self.strategy],
            "replicas": self.replicas,
            "workers": self.workers,
            "per_replica_batch": plan.training.batch_size,
            "global_batch": plan.training.batch_size * self.scale,
            "lr_scaling": self.lr_scaling,
            "lr_factor": self.lr_factor,
            **({"started_with_replicas": self.started_with} if self.started_with else {}),
        }

    def describe(self, plan: RunPlan) -> str:
        """One line for the run's log."""
        where = f", {self.cluster.describe()}" if self.cluster is not None else ""
        role = "" if self.chief else " (not the chief: its folder is temporary)"
        if self.started_with:
            where += f", resumed alone; started on {self.started_with} replicas"
        return (
            f"distribution {self.strategy} ({ENGINES[self.strategy]}{where}){role}: {self.replicas} replica(s), "
            f"global batch {plan.training.batch_size * self.scale} = {plan.training.batch_size} per replica "
            f"x {self.scale}, learning rates x{self.lr_factor:g} ({self.lr_scaling})"
        )


def lr_factor(scaling: str, replicas: int) -> float:
    """How much the learning rate grows with the global batch: none 1, linear replicas, sqrt sqrt(replicas)."""
    return {"none": 1.0, "linear": float(replicas), "sqrt": math.sqrt(replicas)}[scaling]


def adjusted_plan(plan: RunPlan, replicas: int, factor: float, multi_worker: bool = False) -> RunPlan:
    """Every batch size times ``replicas``, every phase's learning rate times ``factor`` (schedules start there).

    Under several workers, checkpoints are written every epoch: saving can read values every worker
    holds, so all of them must save at the same epochs, which a per-worker clock would not give.
    """
    training = plan.training.model_copy(update={"batch_size": plan.training.batch_size * replicas})
    if multi_worker:
        training = training.model_copy(update={"checkpoint_seconds": 0.0})
    phases = tuple(
        phase.model_copy(
            update={
                "batch_size": None if phase.batch_size is None else phase.batch_size * replicas,
                "optimizer": phase.optimizer.model_copy(
                    update={"learning_rate": phase.optimizer.learning_rate * factor}
                ),
            }
        )
        for phase in plan.phases
    )
    evaluation = plan.evaluation.model_copy(update={"batch_size": plan.evaluation.batch_size * replicas})
    return dataclasses.replace(plan, training=training, phases=phases, evaluation=evaluation)


_started: dict[tuple, Distribution] = {}


def start(config: DistributionConfig, env: Mapping[str, str] | None = None) -> Distribution:
    """The engine ``config`` names, created once per process; one line when it cannot run here.

    Call it before TensorFlow runs anything when the recipe may name ``multi_worker_mirrored``
    (``finetune run`` does); a later call with the same section returns the same engine.
    """
    env = os.environ if env is None else env
    key = (config.strategy, config.lr_scaling, env.get("TF_CONFIG", ""), keras.backend.backend())
    if key not in _started:
        _started[key] = _create(config, env)
    return _started[key]


def _create(config: DistributionConfig, env: Mapping[str, str]) -> Distribution:
    backend = keras.backend.backend()
    strategy = config.strategy
    if strategy == "auto":
        strategy = "mirrored" if accelerator_count() > 1 else "none"
    if strategy == "none":
        return Distribution("none", 1, config.lr_scaling)
    if backend == "jax":
        if strategy == "multi_worker_mirrored":
            raise DistributionError(
                "distribution.strategy: multi_worker_mirrored needs the TensorFlow backend; on JAX, mirrored uses "
                "keras.distribution.DataParallel over this machine's devices"
            )
        devices = keras.distribution.list_devices()
        engine = keras.distribution.DataParallel(devices=devices)
        return Distribution("data_parallel", len(devices), config.lr_scaling, engine=engine)
    if backend != "tensorflow":
        raise DistributionError(f"distribution.strategy: {strategy} needs the TensorFlow or JAX backend, not {backend}")
    import tensorflow as tf

    if strategy == "mirrored":
        devices = None
        if not tf.config.list_physical_devices("GPU"):
            # Without GPUs, every logical CPU device the process was split into (a test's two
            # virtual devices) is a replica; by default MirroredStrategy takes the first CPU alone.
            cpus = [device.name for device in tf.config.list_logical_devices("CPU")]
            devices = cpus if len(cpus) > 1 else None
        engine = tf.distribute.MirroredStrategy(devices)
        return Distribution("mirrored", engine.num_replicas_in_sync, config.lr_scaling, engine=engine)
    cluster = cluster_from(env)
    if cluster is None:
        raise DistributionError(
            "distribution.strategy: multi_worker_mirrored needs TF_CONFIG (the cluster's workers and this "
            "process's task); see docs/distributed.md"
        )
    try:
        engine = tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as error:  # "Collective ops must be configured at program startup"
        raise DistributionError(
            f"distribution.strategy: multi_worker_mirrored must start before TensorFlow runs anything "
            f"({first_line(error)}); use `finetune run`, or call finetune.run with the recipe's path first"
        ) from None
    return Distribution("multi_worker_mirrored", engine.num_replicas_in_sync, config.lr_scaling, cluster, engine)


def for_resume(config: DistributionConfig, recorded: dict | None, env: Mapping[str, str] | None = None) -> Distribution:
    """The engine a resumed run uses: its own, except that a multi-worker run continues on this process
    alone, with the global batch and learning rates it started with (``recorded``, from run.json)."""
    env = os.environ if env is None else env
    if config.strategy != "multi_worker_mirrored":
        return start(config, env)
    cluster = cluster_from(env)
    if cluster is not None and cluster.workers > 1:
        raise DistributionError(
            "finetune resume continues a multi-worker run on one process: unset TF_CONFIG and run it where the "
            "chief's run folder is"
        )
    replicas = int((recorded or {}).get("replicas", 1))
    return Distribution("none", 1, config.lr_scaling, started_with=replicas if replicas > 1 else None)


def one_process_note(config: DistributionConfig, command: str) -> str | None:
    """The line a command that never distributes says when its recipe asks for a strategy."""
    if config.strategy == "none":
        return None
    return (
        f"note: finetune {command} runs as one process; distribution.strategy: {config.strategy} "
        "applies to finetune run and resume"
    )


def accelerator_count() -> int:
    """GPUs (or TPU cores) this process sees; CPU devices never count."""
    if keras.backend.backend() == "jax":
        import jax

        return len([device for device in jax.devices() if device.platform != "cpu"])
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return len(tf.config.list_physical_devices("GPU"))
    return 0


@contextlib.contextmanager
def scope(distribution: Distribution) -> Iterator[None]:
    """Everything inside builds, compiles, fits, extracts and predicts on ``distribution``'s engine."""
    if distribution.engine is None:
        yield
        return
    if distribution.strategy == "data_parallel":
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(distribution.engine)
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)
        return
    fixes = _keras_compat.multi_worker_fit() if distribution.cluster is not None else contextlib.nullcontext()
    with distribution.engine.scope(), fixes:
        yield


@contextlib.contextmanager
def worker_folder(out: str | Path | None, distribution: Distribution) -> Iterator[str | Path | None]:
    """The ``--out`` a process claims: the chief's own; another worker's a temporary folder, removed at the end.

    Every worker trains, saves and exports as the chief does (their collective steps stay in step),
    but only the chief's files last.
    """
    if distribution.chief:
        yield out
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"finetune-worker{distribution.cluster.index}-"))  # type: ignore[union-attr]
    try:
        yield scratch / "run"
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
