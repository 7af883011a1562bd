"""Commands that only read files start without TensorFlow or Keras (a second or so, not ten)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import finetune

ROOT = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent("""
    import sys
    from finetune.cli import main
    try:
        main(sys.argv[1:], prog_name="finetune")
    except SystemExit as exit:
        code = exit.code
    heavy = sorted(name for name in ("tensorflow", "keras") if name in sys.modules)
    print("loaded:", ",".join(heavy) or "nothing", "exit:", code)
""")


def _loaded_by(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from conftest import TINY_RECIPE

    recipe = {**TINY_RECIPE, "phases": TINY_RECIPE["phases"][:1]}
    recipe["model"] = {**TINY_RECIPE["model"], "backbone": {"name": "mlp", "weights": None, "options": {}}}
    out = tmp_path_factory.mktemp("runs") / "run"
    finetune.run(finetune.load_recipe(recipe), out=out, log=None)
    return out


@pytest.mark.parametrize("args", [["--help"], ["schema"]], ids=["help", "schema"])
def test_commands_that_read_nothing_load_no_tensorflow(args):
    assert _loaded_by(*args) == "loaded: nothing exit: 0"


def test_compare_reads_run_folders_without_tensorflow(finished_run):
    assert _loaded_by("compare", str(finished_run), str(finished_run)) == "loaded: nothing exit: 0"
