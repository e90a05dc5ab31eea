"""`uctr slurm install`: builds the SPANK plugin and writes the hooks and snippets.

(The cluster tests use the same command to set up the cluster; these check its output.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not Path("/usr/include/slurm/spank.h").exists(),
                                 reason="needs Slurm's headers (libslurm-dev)")]


def uctr(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "uctr_batch", *args], capture_output=True,
                          text=True, env=env, cwd="/")


def test_install_builds_the_plugin_and_prints_the_snippets(tmp_path):
    prefix = tmp_path / "prefix"
    result = uctr("slurm", "install", "--prefix", str(prefix), "--policy", "/etc/uctr/p.yaml",
                  "--log-dir", "/var/log/uctr")
    assert result.returncode == 0, result.stderr
    plugin = prefix / "lib" / "uctr" / "uctr_spank.so"
    assert result.stdout.splitlines() == [
        "# plugstack.conf (or a file in plugstack.conf.d/):",
        f"required {plugin} uctr_exec={prefix}/bin/uctr-exec policy=/etc/uctr/p.yaml "
        f"resolver={prefix}/bin/uctr",
        "# slurm.conf (then: scontrol reconfigure; restart slurmd):",
        f"Prolog={prefix}/libexec/uctr/slurm-prolog",
        f"Epilog={prefix}/libexec/uctr/slurm-epilog",
        "PrologFlags=Alloc",
    ]
    assert (prefix / "share" / "uctr" / "slurm" / "plugstack.conf").read_text() == \
        result.stdout.splitlines()[1] + "\n"
    prolog = (prefix / "libexec" / "uctr" / "slurm-prolog").read_text()
    assert "export UCTR_POLICY=/etc/uctr/p.yaml" in prolog
    assert f"{sys.executable} {prefix}/libexec/uctr/prolog.py" in prolog
    assert os.access(prefix / "libexec" / "uctr" / "slurm-epilog", os.X_OK)


def test_plugin_exports_only_what_slurm_looks_up(tmp_path):
    prefix = tmp_path / "prefix"
    assert uctr("slurm", "install", "--prefix", str(prefix)).returncode == 0
    out = subprocess.run(["nm", "-D", "--defined-only", str(prefix / "lib/uctr/uctr_spank.so")],
                         capture_output=True, text=True, check=True).stdout
    names = sorted(line.split()[-1] for line in out.splitlines() if line.strip())
    expected = ["plugin_name", "plugin_type", "plugin_version", "slurm_spank_init",
                "slurm_spank_init_post_opt", "slurm_spank_task_init",
                "slurm_spank_task_init_privileged", "spank_plugin_version"]
    if slurm_version() >= (25, 5):  # init failures fail the job, not the node
        expected.insert(4, "slurm_spank_init_failure_mode")
    assert names == expected


def slurm_version():
    from uctr_batch.batch import slurm

    words = slurm.slurm_release().split()
    assert words[0] == "Slurm", words
    return tuple(int(n) for n in words[1].split(".")[:2])


def test_install_says_which_slurm_release_it_built_for(tmp_path):
    """A SPANK plugin loads only into the Slurm major.minor it was built for."""
    result = uctr("slurm", "install", "--prefix", str(tmp_path / "prefix"))
    assert result.returncode == 0, result.stderr
    release = subprocess.run(["slurmd", "-V"], capture_output=True, text=True).stdout.split()
    assert release[0] in ("slurm", "slurm-wlm"), release
    assert f"built the SPANK plugin for Slurm {release[1]} " in result.stderr


def test_hook_runs_without_its_log_dir(tmp_path):
    """A missing log dir must not fail the prolog: Slurm would drain the node."""
    prefix, logs = tmp_path / "prefix", tmp_path / "not" / "yet"
    assert uctr("slurm", "install", "--prefix", str(prefix), "--log-dir", str(logs)).returncode == 0
    # a job without a container: the job record (a stand-in scontrol) has no Container=
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_ID": "1",
           "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_GID": str(os.getgid()),
           "SLURMD_NODENAME": "n1"}
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'JobId=1 JobName=x'\n")
    (tmp_path / "scontrol").chmod(0o755)
    result = subprocess.run([str(prefix / "libexec" / "uctr" / "slurm-prolog")], env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, (logs / "uctr-prolog.n1.log").read_text()
    assert (logs / "uctr-prolog.n1.log").exists()


def test_dry_run_writes_nothing(tmp_path):
    prefix = tmp_path / "prefix"
    result = uctr("slurm", "install", "--prefix", str(prefix), "--dry-run")
    assert result.returncode == 0
    assert "Prolog=" in result.stdout and "would build" in result.stderr
    assert not prefix.exists()


def test_relative_prefix_is_a_usage_error():
    result = uctr("slurm", "install", "--prefix", "relative/dir", "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: --prefix must be an absolute path")


NOBODY = 65534


@pytest.mark.skipif(os.geteuid() != 0, reason="plants another user's files: needs root")
@pytest.mark.parametrize("plant", ["symlink-in-users-dir", "users-dir-symlink", "fifo"])
def test_a_log_dir_a_user_planted_is_never_written_through(tmp_path, plant):
    """A careless site's --log-dir in a world-writable place (/tmp/uctr-logs): a user who
    creates it first must not make root append to a file of the user's choosing (or block
    on a FIFO). The hook logs to slurmd's stderr instead and still exits 0."""
    prefix, shared = tmp_path / "prefix", tmp_path / "tmp"
    tmp_path.chmod(0o755)
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    logs = shared / "uctr-logs"
    target = tmp_path / "root-only-file"
    target.write_text("root's\n")
    if plant == "users-dir-symlink":
        (shared / "elsewhere").mkdir()
        os.lchown(shared / "elsewhere", NOBODY, NOBODY)
        logs.symlink_to(shared / "elsewhere")
        os.lchown(logs, NOBODY, NOBODY)
        victim = shared / "elsewhere" / "uctr-prolog.n1.log"
    else:
        logs.mkdir(mode=0o777)
        logs.chmod(0o777)
        os.lchown(logs, NOBODY, NOBODY)
        victim = logs / "uctr-prolog.n1.log"
        if plant == "fifo":
            os.mkfifo(victim)
        else:
            victim.symlink_to(target)
        os.lchown(victim, NOBODY, NOBODY)
    assert uctr("slurm", "install", "--prefix", str(prefix), "--log-dir", str(logs)).returncode == 0
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_JOB_ID": "1",
           "SLURM_JOB_UID": str(os.getuid()), "SLURM_JOB_GID": str(os.getgid()),
           "SLURMD_NODENAME": "n1"}
    (tmp_path / "scontrol").write_text("#!/bin/sh\necho 'JobId=1 JobName=x'\n")
    (tmp_path / "scontrol").chmod(0o755)
    result = subprocess.run([str(prefix / "libexec" / "uctr" / "slurm-prolog")], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "not logging to" in result.stderr
    assert target.read_text() == "root's\n"
    assert not os.path.lexists(shared / "elsewhere" / "uctr-prolog.n1.log") \
        or plant != "users-dir-symlink"
    assert os.lstat(logs).st_uid == NOBODY  # the plant is left alone


def test_the_hook_log_is_root_only_and_appended(tmp_path):
    from uctr_batch.batch import slurm

    tmp_path.chmod(0o755)
    path = tmp_path / "a" / "b" / "uctr-prolog.n1.log"
    for _ in range(2):
        fd = slurm.open_root_log(str(path))
        os.write(fd, b"line\n")
        os.close(fd)
    assert path.read_text() == "line\nline\n"
    assert oct(path.parent.stat().st_mode & 0o777) == "0o755"


@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="no C compiler")
def test_install_puts_the_c_front_before_the_python_launcher(tmp_path):
    """bin/uctr-exec is the C front (docs/launcher.md, "Two paths"): an ELF executable,
    not set-uid, that hands a rank it cannot join (here: no step at all) to the Python
    launcher installed beside it, with the policy the wrapper exports."""
    prefix = tmp_path / "prefix"
    assert uctr("slurm", "install", "--prefix", str(prefix), "--policy", "/etc/uctr/p.yaml"
                ).returncode == 0
    front = prefix / "bin" / "uctr-exec"
    python = prefix / "libexec" / "uctr" / "uctr-exec-python"
    assert front.read_bytes()[:4] == b"\x7fELF"
    assert front.stat().st_mode & 0o7777 == 0o755
    assert "export UCTR_POLICY=/etc/uctr/p.yaml" in python.read_text()
    out = subprocess.run([str(front), "--help"], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "UCTR_FAST_DEBUG": "1"})
    assert out.returncode == 0 and out.stdout.startswith("usage: uctr-exec"), out.stderr
    assert "uctr-exec: python path: " in out.stderr
    # The front execs the Python the wrapper would end in itself (no sh between): it works
    # with the wrapper unusable, and the wrapper still works alone (mpirun, PBS, by hand).
    python.chmod(0o644)
    direct = subprocess.run([str(front), "--help"], capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin"})
    assert direct.returncode == 0 and direct.stdout == out.stdout, direct.stderr
    python.chmod(0o755)
    alone = subprocess.run([str(python), "--help"], capture_output=True, text=True,
                           env={"PATH": "/usr/bin:/bin"})
    assert alone.returncode == 0 and alone.stdout == out.stdout, alone.stderr
