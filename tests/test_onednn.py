"""finetune turns TensorFlow's oneDNN CPU kernels on (x86-64), unless the user chose; TensorFlow itself reports it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"), reason="finetune leaves oneDNN alone off x86-64"
)

PROBE = textwrap.dedent("""
    import finetune
    from tensorflow.python.util import _pywrap_util_port
    print(_pywrap_util_port.IsMklEnabled())
""")


def _onednn_in_fresh_process(setting: str | None) -> str:
    env = {key: value for key, value in os.environ.items() if key != "TF_ENABLE_ONEDNN_OPTS"}
    if setting is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = setting
    env.update(PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_finetune_turns_onednn_on_for_tensorflow():
    assert _onednn_in_fresh_process(None) == "True"


def test_a_user_who_turned_onednn_off_keeps_it_off():
    assert _onednn_in_fresh_process("0") == "False"
