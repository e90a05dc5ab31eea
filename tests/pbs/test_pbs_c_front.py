"""`uctr pbs install --c-front DIR`: the hook starts ranks through the C front of uctr-exec
(docs/launcher.md, "Two paths"), built into a node-local DIR for the Python uctr-exec that
the config would name otherwise."""

import json
import shutil
import subprocess

import pytest

from tests.pbs.test_pbs_hook_contract import FAKE_QMGR, _uctr


def config_of(stdout: str) -> dict:
    return json.loads("\n".join(line[4:] for line in stdout.splitlines()
                                  if line.startswith("#   ")))


def test_dry_run_points_the_hook_config_at_the_front(tmp_path):
    result = _uctr("pbs", "install", "--dry-run", "--uctr-exec", "/opt/uctr/bin/uctr-exec",
                   "--c-front", str(tmp_path / "front"))
    assert result.returncode == 0, result.stderr
    assert config_of(result.stdout)["uctr_exec"] == str(tmp_path / "front" / "uctr-exec")
    assert not (tmp_path / "front").exists()  # a dry run builds nothing


def test_relative_front_directory_is_a_usage_error():
    result = _uctr("pbs", "install", "--dry-run", "--c-front", "lib/uctr")
    assert result.returncode == 2 and "error: --c-front must be an absolute path" in result.stderr


@pytest.mark.contract
@pytest.mark.skipif(shutil.which("cc") is None or shutil.which("make") is None,
                    reason="no C compiler")
def test_install_builds_the_front_for_the_python_launcher(tmp_path):
    qmgr = tmp_path / "qmgr"
    qmgr.write_text(FAKE_QMGR.format(log=tmp_path / "log", state=tmp_path / "state"))
    qmgr.chmod(0o755)
    python = tmp_path / "py-uctr-exec"
    python.write_text("#!/bin/sh\necho \"python launcher: $*\"\n")
    python.chmod(0o755)
    result = _uctr("pbs", "install", "--qmgr", str(qmgr), "--uctr-exec", str(python),
                   "--c-front", str(tmp_path / "front"))
    assert result.returncode == 0, result.stderr
    front = tmp_path / "front" / "uctr-exec"
    assert front.read_bytes()[:4] == b"\x7fELF" and front.stat().st_mode & 0o7777 == 0o755
    # no step container to join: the rank goes to the Python launcher, same argv
    out = subprocess.run([str(front), "img", "cmd", "a b"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin"})
    assert out.stdout == "python launcher: img cmd a b\n", out.stderr
