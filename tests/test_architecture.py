"""The layout rules: layers enforced by import-linter, small modules, and a map that matches the tree."""

import ast
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "finetune"
MODULES = sorted(path.relative_to(ROOT).as_posix() for path in PACKAGE.rglob("*.py"))


def lint_imports(package_root):
    """import-linter with the project's contracts, run over the ``finetune`` package found in ``package_root``."""
    pytest.importorskip("importlinter")
    code = (
        "import sys; from importlinter.cli import lint_imports_command; "
        "sys.argv = ['lint-imports'] + sys.argv[1:]; lint_imports_command()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        cwd=package_root,
        env={**os.environ, "PYTHONPATH": str(package_root)},
        timeout=120,
    )


@pytest.fixture
def package_copy(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "finetune", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_the_layer_contracts_hold(package_copy):
    result = lint_imports(package_copy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_an_import_from_a_higher_layer_breaks_the_contract(package_copy):
    schema = package_copy / "finetune" / "recipe" / "schema.py"
    schema.write_text(schema.read_text() + "\n\ndef _cycle():\n    from finetune import runner  # noqa\n")
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "finetune.recipe.schema -> finetune.runner" in result.stdout


def test_a_cycle_between_sibling_modules_breaks_the_contract(package_copy):
    # Two modules of the same layer (data) importing each other: allowed by the layers, not by the acyclic rule.
    sampling = package_copy / "finetune" / "data" / "sampling.py"
    sampling.write_text(sampling.read_text() + "\n\ndef _cycle():\n    from finetune.data import images  # noqa\n")
    images = package_copy / "finetune" / "data" / "images.py"
    images.write_text(images.read_text() + "\n\ndef _cycle():\n    from finetune.data import sampling  # noqa\n")
    result = lint_imports(package_copy)
    assert result.returncode != 0
    assert "No import cycle between sibling modules" in result.stdout and "BROKEN" in result.stdout


def test_no_module_is_over_500_lines_and_few_sit_at_the_top():
    lengths = {module: len((ROOT / module).read_text().splitlines()) for module in MODULES}
    assert max(lengths.values()) <= 500, max(lengths.items(), key=lambda item: item[1])
    top_level = [module for module in MODULES if module.count("/") == 1]
    assert len(top_level) <= 10, top_level


def test_the_architecture_page_lists_every_module_and_no_other():
    page = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"finetune/[\w/]+\.py", page))
    assert listed == set(MODULES), (sorted(set(MODULES) - listed), sorted(listed - set(MODULES)))


def _functions(package: str):
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield path, node


def test_no_function_of_runner_or_training_takes_more_than_six_parameters():
    """A run's state travels in its session and context objects, not in long argument lists."""
    crowded = []
    for package in ("runner", "training"):
        for path, node in _functions(package):
            arguments = node.args
            every = (*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs)
            names = [argument.arg for argument in every if argument.arg not in ("self", "cls")]
            if len(names) > 6:
                crowded.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} takes {len(names)}")
    assert not crowded, crowded


def test_the_line_prefix_is_written_by_the_formatter_alone():
    """Modules log through `logging`; only the handler's formatter (and the command line) writes `[finetune] `."""
    written = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("cli/") or relative == "progress.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and "[finetune] " in node.value:
                written.append(f"{relative}:{node.lineno}")
    assert not written, written
