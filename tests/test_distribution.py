"""The recipe's ``distribution``: the engine it resolves to, the numbers it changes, and who writes the run folder.

The two-worker test runs ``finetune run`` twice with TF_CONFIG on 127.0.0.1 (MultiWorkerMirroredStrategy on
the CPU) and compares the result with one process; the JAX test runs DataParallel over two forced host devices.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import finetune
from finetune.cli import main
from finetune.errors import DistributionError
from finetune.recipe import DistributionConfig
from finetune.runner import distribution as distribute

ROOT = Path(__file__).resolve().parents[1]

# A recipe small enough to run four times in one test: the mlp backbone on 400 Fashion-MNIST images.
TINY_MLP = {
    "name": "tiny_mlp",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.2,
        "train_limit": 400,
        "test_limit": 200,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [64]}}, "head": {"dense": []}},
    "training": {"batch_size": 16, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
    "phases": [{"name": "train", "epochs": 2, "trainable": "all", "optimizer": {"name": "sgd", "learning_rate": 0.05}}],
    "export": {"formats": ["keras"]},
}
TINY_MLP["data"]["test_limit"] = 200


def tiny_plan(**distribution):
    recipe = {
        **TINY_MLP,
        "phases": [
            {"name": "head", "epochs": 1, "optimizer": {"name": "adam", "learning_rate": 1e-3}},
            {"name": "all", "epochs": 1, "trainable": "all", "batch_size": 8, "optimizer": {"learning_rate": 4e-4}},
        ],
        "distribution": distribution,
    }
    return finetune.plan.prepare(finetune.load_recipe(recipe))[1]


@pytest.mark.parametrize("scaling, factor", [("none", 1.0), ("linear", 4.0), ("sqrt", 2.0)])
def test_global_batch_and_learning_rates_follow_the_replicas(scaling, factor):
    plan = tiny_plan(lr_scaling=scaling)
    adjusted = distribute.Distribution("mirrored", replicas=4, lr_scaling=scaling).adjust(plan)
    assert adjusted.training.batch_size == 16 * 4
    assert [phase.batch_size for phase in adjusted.phases] == [None, 8 * 4]
    assert adjusted.evaluation.batch_size == plan.evaluation.batch_size * 4
    rates = [phase.optimizer.learning_rate for phase in adjusted.phases]
    assert rates == pytest.approx([1e-3 * factor, 4e-4 * factor])
    assert [phase.optimizer.name for phase in adjusted.phases] == ["adam", "adam"]  # the rest of the phase stays
    assert plan.training.batch_size == 16 and plan.phases[0].optimizer.learning_rate == 1e-3  # a copy, not an edit


def test_sqrt_scaling_is_the_square_root_of_the_replicas():
    assert distribute.lr_factor("sqrt", 2) == pytest.approx(math.sqrt(2))
    assert distribute.lr_factor("linear", 3) == 3.0


def test_one_replica_changes_nothing_and_auto_is_none_on_this_cpu():
    plan = tiny_plan(strategy="auto", lr_scaling="linear")
    resolved = distribute.start(DistributionConfig(strategy="auto", lr_scaling="linear"), env={})
    assert (resolved.strategy, resolved.replicas, resolved.engine) == ("none", 1, None)
    assert resolved.adjust(plan) is plan
    assert distribute.start(DistributionConfig(), env={}).strategy == "none"  # the default


def test_multi_worker_runs_several_workers_but_resumes_on_one_process_with_the_same_numbers():
    plan = tiny_plan(strategy="multi_worker_mirrored", lr_scaling="linear")
    cluster = distribute.Cluster(workers=2, task_type="worker", index=1)
    adjusted = distribute.Distribution("multi_worker_mirrored", 2, "linear", cluster).adjust(plan)
    assert adjusted.training.checkpoint_seconds == 0  # every worker saves at the same epochs
    resumed = distribute.for_resume(plan.distribution, {"replicas": 2}, env={})
    assert (resumed.strategy, resumed.replicas, resumed.started_with) == ("none", 1, 2)
    again = resumed.adjust(plan)
    assert again.training.batch_size == adjusted.training.batch_size == 32
    assert again.phases[0].optimizer.learning_rate == adjusted.phases[0].optimizer.learning_rate == 2e-3
    with pytest.raises(DistributionError, match="unset TF_CONFIG"):
        distribute.for_resume(plan.distribution, {"replicas": 2}, env={"TF_CONFIG": tf_config(["a:1", "b:2"], 0)})


def tf_config(workers, index, task_type="worker", chief=None):
    cluster = {"worker": workers, **({"chief": [chief]} if chief else {})}
    return json.dumps({"cluster": cluster, "task": {"type": task_type, "index": index}})


@pytest.mark.parametrize(
    "config, chief, workers",
    [
        (tf_config(["a:1", "b:2"], 0), True, 2),
        (tf_config(["a:1", "b:2"], 1), False, 2),
        (tf_config(["a:1"], 0, chief="c:3"), False, 2),  # with a chief task, worker 0 is not it
        (tf_config(["a:1"], 0, task_type="chief", chief="c:3"), True, 2),
    ],
)
def test_the_chief_is_the_chief_task_or_else_worker_0(config, chief, workers):
    cluster = distribute.cluster_from({"TF_CONFIG": config})
    assert (cluster.chief, cluster.workers) == (chief, workers)


def test_a_non_chief_worker_works_in_a_temporary_folder_it_removes(tmp_path):
    out = tmp_path / "run"
    worker = distribute.Distribution("multi_worker_mirrored", 2, cluster=distribute.Cluster(2, "worker", 1))
    with distribute.worker_folder(out, worker) as folder:
        Path(folder).mkdir()
        (Path(folder) / "history.csv").write_text("x")
        assert tmp_path not in Path(folder).parents
    assert not Path(folder).parent.exists() and not out.exists()
    chief = distribute.Distribution("multi_worker_mirrored", 2, cluster=distribute.Cluster(2, "worker", 0))
    with distribute.worker_folder(out, chief) as folder:
        assert folder == out


def write_recipe(tmp_path, **changes) -> Path:
    recipe = {**TINY_MLP, **changes}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize(
    "distribution, env, expected",
    [
        ({"strategy": "parameter_server"}, {}, "distribution.strategy"),
        ({"strategy": "multi_worker_mirrored"}, {}, "multi_worker_mirrored needs TF_CONFIG"),
        ({"strategy": "multi_worker_mirrored"}, {"TF_CONFIG": "{not json"}, "TF_CONFIG is not a cluster"),
        ({"lr_scaling": "cubic"}, {}, "distribution.lr_scaling"),
    ],
)
def test_a_strategy_that_cannot_run_is_one_line_with_exit_code_2(tmp_path, monkeypatch, distribution, env, expected):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    recipe = write_recipe(tmp_path, distribution=distribution)
    result = CliRunner().invoke(main, ["run", str(recipe), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "run").exists()


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_localhost_train_what_one_process_trains(tmp_path):
    """MultiWorkerMirroredStrategy, two CPU workers at 8 images per replica, against one process at 16.

    Same seed, same global batch (16), same rows per step: the weights differ only by the order in which the
    all-reduce sums the two halves of each batch, so the tolerance is float32 rounding over 40 steps (1e-4).
    """
    recipe = write_recipe(tmp_path, training={**TINY_MLP["training"], "batch_size": 8})
    ports = free_ports(2)
    workers = [f"127.0.0.1:{port}" for port in ports]
    outs = [tmp_path / "chief", tmp_path / "worker1"]  # the non-chief's --out must stay untouched
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    command = [
        sys.executable,
        "-m",
        "finetune",
        "run",
        str(recipe),
        "--set",
        "distribution.strategy=multi_worker_mirrored",
    ]
    logs = [tmp_path / f"worker{index}.log" for index in range(2)]  # files: a full pipe would stall a worker
    processes = []
    for index, out in enumerate(outs):
        with logs[index].open("w") as log:
            processes.append(
                subprocess.Popen(
                    [*command, "--out", str(out)],
                    env={**env, "TF_CONFIG": tf_config(workers, index)},
                    cwd=tmp_path,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 240
    try:
        for process in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in processes:  # a worker waiting for a dead peer must not outlive the test
            if process.poll() is None:
                process.kill()
                process.wait()
    results = [(process.returncode, log.read_text()) for process, log in zip(processes, logs, strict=True)]
    for code, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "worker 0 of 2 workers): 2 replica(s), global batch 16 = 8 per replica x 2" in results[0][1]
    assert not outs[1].exists()

    keras.backend.clear_session()
    single = finetune.run(finetune.load_recipe(TINY_MLP), out=tmp_path / "one", log=lambda _: None)
    chief = json.loads((outs[0] / "metrics.json").read_text())
    assert chief["distribution"] == {
        "strategy": "multi_worker_mirrored",
        "engine": "tf.distribute.MultiWorkerMirroredStrategy",
        "replicas": 2,
        "workers": 2,
        "per_replica_batch": 8,
        "global_batch": 16,
        "lr_scaling": "none",
        "lr_factor": 1.0,
    }
    assert single.metrics["distribution"]["global_batch"] == 16
    assert chief["test"]["loss"] == pytest.approx(single.metrics["test"]["loss"], abs=1e-4)
    trained = finetune.load_model(outs[0] / "model.keras")
    for mine, theirs in zip(trained.get_weights(), single.model.get_weights(), strict=True):
        np.testing.assert_allclose(mine, theirs, atol=1e-4)
    losses = [float(row["loss"]) for row in finetune.training.history.read_history(outs[0] / "history.csv")]
    assert losses == pytest.approx([float(row["loss"]) for row in single.history], abs=1e-4)


@pytest.mark.slow
def test_data_parallel_on_two_jax_devices(tmp_path):
    """On JAX, `mirrored` is keras.distribution.DataParallel over every local device (two forced CPU devices)."""
    pytest.importorskip("jax")
    recipe = write_recipe(tmp_path, distribution={"strategy": "mirrored", "lr_scaling": "linear"})
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "run", str(recipe), "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={
            **os.environ,
            "KERAS_BACKEND": "jax",
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "PYTHONPATH": str(ROOT),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "jax"
    assert metrics["distribution"]["engine"] == "keras.distribution.DataParallel"
    assert (metrics["distribution"]["replicas"], metrics["distribution"]["global_batch"]) == (2, 32)
    history = finetune.training.history.read_history(out / "history.csv")
    assert float(history[0]["learning_rate"]) == pytest.approx(0.1)  # 0.05 x 2 replicas (linear)
    assert float(history[-1]["loss"]) < float(history[0]["loss"])


def test_the_commands_that_never_distribute_say_so_only_when_the_recipe_asks_for_a_strategy():
    from finetune.recipe import DistributionConfig
    from finetune.runner.distribution import one_process_note

    assert one_process_note(DistributionConfig(strategy="none"), "evaluate") is None
    note = one_process_note(DistributionConfig(strategy="multi_worker_mirrored"), "export")
    assert note is not None and "\n" not in note
    assert note.startswith("note: finetune export runs as one process; distribution.strategy: multi_worker_mirrored")
