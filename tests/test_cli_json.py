"""``--json`` is for programs: an error too is one JSON line (on stderr, exit code kept), and output options that
exclude each other are refused in one line."""

import json

import pytest
from conftest import cli_in_process


def _arguments(template, tmp_path) -> list[str]:
    return [argument.format(tmp=tmp_path) for argument in template]


@pytest.mark.parametrize(
    "command",
    [
        ["compare", "{tmp}", "--json"],  # not a run folder
        ["predict", "{tmp}/no_such_run", "{tmp}/image.png", "--json"],
        ["weights", "--json", "--option", "alpha"],  # not KEY=VALUE
    ],
    ids=["compare", "predict", "weights"],
)
def test_with_json_a_users_error_is_one_json_line_on_stderr_and_exit_2(tmp_path, command):
    result = cli_in_process(*_arguments(command, tmp_path))
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    error = json.loads(line)
    assert list(error) == ["error"]
    # The message is the one the plain command prints after "error: ".
    plain = cli_in_process(*[argument for argument in _arguments(command, tmp_path) if argument != "--json"])
    assert plain.returncode == 2 and plain.stderr.splitlines() == [f"error: {error['error']}"]


def test_with_json_an_unexpected_error_is_one_json_line_and_exit_1(tmp_path, monkeypatch):
    from finetune.runner import compare

    def failing_row(run_dir):
        raise RuntimeError("the folder went sideways\nand a second line")

    monkeypatch.setattr(compare, "compare_row", failing_row)
    result = cli_in_process("compare", str(tmp_path), "--json")
    assert result.returncode == 1 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert json.loads(line) == {
        "error": "unexpected RuntimeError: the folder went sideways (run again with --debug for the traceback)"
    }


@pytest.mark.parametrize("order", [["--json", "--csv"], ["--csv", "--json"]])
def test_compare_refuses_json_and_csv_together_in_one_line(tmp_path, order):
    (tmp_path / "run").mkdir()
    result = cli_in_process("compare", str(tmp_path / "run"), *order)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    message = json.loads(line)["error"]  # --json was given: the error is JSON too
    assert "--json" in message and "--csv" in message and "exclude each other" in message
