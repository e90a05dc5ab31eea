"""`uctr slurm install` byte-compiles the package: the hooks' staging and release children
and uctr-exec run as the job user, who cannot write __pycache__ in root's tree, and would
compile every module root never imported on every job and every rank."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

from uctr_batch.batch import slurm

REPO = Path(__file__).resolve().parents[2]


def _tree(tmp_path):
    tree = tmp_path / "src"
    shutil.copytree(REPO / "uctr_batch", tree / "uctr_batch",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tree


def test_every_module_gets_its_bytecode(tmp_path):
    tree = _tree(tmp_path)
    assert slurm.byte_compile(tree) is True
    modules = sorted((tree / "uctr_batch").rglob("*.py"))
    assert len(modules) > 50
    missing = [str(m) for m in modules if not Path(importlib.util.cache_from_source(str(m))).is_file()]
    assert missing == []
    assert "byte-compile" in " ".join(slurm.install_plan(tmp_path / "prefix").steps())


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_tree_costs_only_a_warning(tmp_path):
    tree = _tree(tmp_path)
    for directory, _dirs, _files in os.walk(tree):
        os.chmod(directory, 0o555)
    try:
        assert slurm.byte_compile(tree) is False
    finally:
        for directory, _dirs, _files in os.walk(tree):
            os.chmod(directory, 0o755)
