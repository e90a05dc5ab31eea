"""uctr-oci, the runtime uctr's oci.conf profile makes Slurm call (batch/oci_runtime.py).

Run through the real shim (launchers/uctr-oci) as slurmstepd runs it, `/bin/sh -c "exec ..."`,
for exit codes, error:/hint: lines, the environment and signals; plan_run (pure) for which
way a task goes. The way into uctr-exec itself runs on real clusters: tests/slurm/test_slurm_oci.py.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from uctr_batch.batch import oci_runtime
from uctr_batch.batch.oci_runtime import BATCH_STEP, INTERACTIVE_STEP, RunArgs, plan_run
from uctr_batch.errors import ConfigError, UsageError

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "launchers" / "uctr-oci"
IMAGE = "registry.example:5000/busybox:1"
HOST_ENV = {"PATH": "/usr/bin:/bin", "UCTR_PYTHON": sys.executable}


def write_env(path: Path, entries, separator=b"\0") -> Path:
    path.write_bytes(b"".join(e.encode() + separator for e in entries))
    return path


def oci(*args, env=None, cwd=None):
    """`/bin/sh -c "exec uctr-oci ARGS"`, slurmstepd's way, with a small host environment."""
    import shlex

    command = "exec " + " ".join(shlex.quote(str(a)) for a in [SHIM, *args])
    return subprocess.run(["/bin/sh", "-c", command], capture_output=True, text=True,
                          env={**HOST_ENV, **(env or {})}, cwd=cwd, timeout=60)


def assert_error(result, code, *words):
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "error: " in result.stderr and "hint: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in result.stderr, result.stderr


@pytest.fixture
def env_file(tmp_path):
    return write_env(tmp_path / "environment",
                     ["PATH=/usr/bin:/bin", "FOO=bar baz", "MULTI=line1\nline2", "SLURM_PROCID=3"])


# -- the command line: usage errors are exit 2 with a hint -----------------------------------
@pytest.mark.parametrize("args, words", [
    ([], ["no action"]),
    (["frobnicate"], ["unknown action"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--step", "0"], ["end with -- %@"]),
    (["run", "--bundle", IMAGE, "--step", "0", "--", "true"], ["--env-file is missing",
                                                               "CreateEnvFile=null"]),
    (["run", "--env-file", "/x", "--step", "0", "--", "true"], ["--bundle is missing"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--", "true"], ["--step is missing"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--step", "x1", "--", "true"], ["step id"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--step", "-1", "--", "true"], ["step id"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--step", "0", "--"], ["no command"]),
    (["run", "--bundle", IMAGE, "--env-file", "/x", "--step", "0", "--mode", "N1", "--", "true"],
     ["unknown argument"]),
    (["run", "--bundle", "", "--env-file", "/x", "--step", "0", "--", "true"], ["empty"]),
    (["run", "--bundle", "a b", "--env-file", "/x", "--step", "0", "--", "true"],
     ["not an image reference"]),
    (["run", "--bundle", "-rf", "--env-file", "/x", "--step", "0", "--", "true"],
     ["not an image reference"]),
    (["run", "--bundle", "x" * 5000, "--env-file", "/x", "--step", "0", "--", "true"],
     ["longer than"]),
    (["kill"], ["PID [SIGNAL]"]),
    (["kill", "4294967295"], ["not a process id", "4294967295 means no task"]),
    (["kill", "-1"], ["not a process id"]),
    (["kill", "1"], ["not a process id"]),
    (["kill", "0"], ["not a process id"]),
    (["kill", "12x"], ["not a process id"]),
    (["kill", "4194305"], ["not a process id"]),
    (["kill", "1234", "BOGUS"], ["unknown signal"]),
    (["delete"], ["expected PID"]),
    (["delete", "4294967295"], ["not a process id"]),
])
def test_bad_arguments_are_usage_errors(args, words):
    assert_error(oci(*args), 2, *words)


def test_help_is_not_an_error():
    result = oci("--help")
    assert result.returncode == 0 and "uctr-oci run --bundle" in result.stdout


# -- the environment file ------------------------------------------------------------------------
def run_args(env_file, step=0, *argv):
    return ["run", "--bundle", IMAGE, "--env-file", str(env_file), "--step", str(step), "--",
            *(argv or ["true"])]


def test_missing_env_file_is_a_config_error(tmp_path):
    assert_error(oci(*run_args(tmp_path / "nope")), 1, "cannot open", "CreateEnvFile=null")


def test_env_file_through_a_symlink_is_refused(tmp_path, env_file):
    link = tmp_path / "link"
    link.symlink_to(env_file)
    assert_error(oci(*run_args(link)), 1, "cannot open")


def test_env_file_of_another_user_is_refused(tmp_path, env_file):
    if os.geteuid() != 0:
        pytest.skip("needs root to give the file away")
    os.chown(env_file, 65534, 65534)
    assert_error(oci(*run_args(env_file)), 1, "not a plain file of uid 0")


def test_env_file_that_is_not_a_file_is_refused(tmp_path):
    assert_error(oci(*run_args(tmp_path)), 1, "not a plain file")


def test_huge_env_file_is_refused(tmp_path):
    big = tmp_path / "environment"
    with open(big, "wb") as f:
        f.truncate(oci_runtime.ENV_FILE_MAX + 1)
    assert_error(oci(*run_args(big)), 1, "larger than")


@pytest.mark.parametrize("data, words", [(b"", "is empty"), (b"PATH=/bin\0garbage\0", "NAME=VALUE"),
                                         (b"=x\0", "NAME=VALUE")])
def test_malformed_env_file_is_refused(tmp_path, data, words):
    (tmp_path / "environment").write_bytes(data)
    assert_error(oci(*run_args(tmp_path / "environment")), 1, words)


def test_both_env_file_formats_parse():
    assert oci_runtime.parse_env(b"A=1\0B=x\ny\0C=\0") == {"A": "1", "B": "x\ny", "C": ""}
    assert oci_runtime.parse_env(b"A=1\nB=2=3\n") == {"A": "1", "B": "2=3"}


# -- batch steps run on the host, with exactly the task's environment --------------------------
def test_batch_step_runs_on_the_host_with_the_tasks_environment(tmp_path, env_file):
    script = 'printf "%s|%s|%s|%s|%s" "$FOO" "$MULTI" "$SRUN_CONTAINER" "${UCTR_LEAK-unset}" "$PWD"'
    result = oci(*run_args(env_file, BATCH_STEP, "/bin/sh", "-c", script + "; exit 7"),
                 env={"UCTR_LEAK": "slurmstepd's own"}, cwd=tmp_path)
    assert result.returncode == 7, result.stderr
    assert result.stdout == f"bar baz|line1\nline2|{IMAGE}|unset|{tmp_path}"


def test_interactive_step_runs_on_the_host_too(env_file):
    result = oci(*run_args(env_file, INTERACTIVE_STEP, "/bin/sh", "-c", 'echo "$SLURM_PROCID"'))
    assert result.returncode == 0 and result.stdout == "3\n", result.stderr


def test_a_payload_killed_by_a_signal_is_reported_as_such(env_file):
    result = oci(*run_args(env_file, BATCH_STEP, "/bin/sh", "-c", "kill -TERM $$; sleep 5"))
    assert result.returncode == -signal.SIGTERM  # the process itself died: nothing in between


def test_the_payload_gets_the_signal_state_of_a_plain_task(env_file):
    plain = subprocess.run(["grep", "^SigIgn", "/proc/self/status"], capture_output=True,
                           text=True).stdout
    result = oci(*run_args(env_file, BATCH_STEP, "grep", "^SigIgn", "/proc/self/status"))
    assert result.returncode == 0 and result.stdout == plain, result.stderr


def test_a_missing_batch_command_is_an_error(env_file):
    assert_error(oci(*run_args(env_file, BATCH_STEP, "/no/such/script")), 1, "cannot run")


def test_a_normal_step_goes_to_uctr_exec_in_the_same_process(env_file, tmp_path):
    """uctr-exec's own checks answer: an unparseable image is its error, not ours."""
    args = ["run", "--bundle", "Not/A:Valid::Ref", "--env-file", str(env_file), "--step", "0",
            "--", "true"]
    result = oci(*args)
    assert result.returncode in (1, 2), result.stderr
    assert "uctr: error: " in result.stderr and "Traceback" not in result.stderr
    assert "Not/A:Valid::Ref" in result.stderr


# -- which way a task goes (pure) -------------------------------------------------------------
def test_plan_normal_step_is_uctr_exec_of_the_container_value():
    kind, argv, env = plan_run(RunArgs(IMAGE, "-", 0, False, ["app", "-x"]),
                               {"PATH": "/bin", "UCTR_ARGV0": "stale"})
    assert (kind, argv) == ("uctr-exec", [IMAGE, "--", "app", "-x"])
    assert "UCTR_ARGV0" not in env and "SRUN_CONTAINER" not in env


def test_plan_batch_step_keeps_a_users_srun_container():
    kind, argv, env = plan_run(RunArgs(IMAGE, "-", BATCH_STEP, False, ["/spool/job1/slurm_script"]),
                               {"SRUN_CONTAINER": "other:1"})
    assert kind == "exec" and env["SRUN_CONTAINER"] == "other:1"


def test_plan_batch_in_container_binds_the_script():
    script = "/var/spool/slurmd/job00042/slurm_script"
    kind, argv, env = plan_run(RunArgs(IMAGE, "-", BATCH_STEP, True, [script]),
                               {"UCTR_MOUNTS": "/data:/data"})
    assert (kind, argv) == ("uctr-exec", [IMAGE, "--", script])
    assert env["UCTR_MOUNTS"] == f"/data:/data,{script}:{script}:ro"


def test_plan_a_task_the_spank_plugin_wrapped_runs_unchanged():
    wrapped = ["/opt/uctr/bin/uctr-exec", "other:2", "--", "app"]
    kind, argv, _env = plan_run(RunArgs(IMAGE, "-", 0, False, wrapped), {"UCTR_IMAGE": "other:2"})
    assert (kind, argv) == ("exec", wrapped)
    # not the plugin's doing (no UCTR_IMAGE, or another one): the task is the user's command
    for env in ({}, {"UCTR_IMAGE": "third:3"}):
        assert plan_run(RunArgs(IMAGE, "-", 0, False, wrapped), env)[0] == "uctr-exec"


def test_a_spank_wrapped_task_is_exec_d_as_it_is(tmp_path):
    """slurmstepd resolved the plugin's uctr-exec to a path: that program runs, with the
    task's environment (here a stand-in that prints what it got)."""
    stand_in = tmp_path / "uctr-exec"
    stand_in.write_text('#!/bin/sh\necho "$UCTR_IMAGE $*"\n')
    stand_in.chmod(0o755)
    env_file = write_env(tmp_path / "environment", ["PATH=/usr/bin:/bin", "UCTR_IMAGE=other:2"])
    result = oci(*run_args(env_file, 0, str(stand_in), "other:2", "--", "app"))
    assert result.returncode == 0 and result.stdout == "other:2 other:2 -- app\n", result.stderr


# -- kill / delete ------------------------------------------------------------------------------
def test_kill_and_delete_signal_one_real_process():
    for action, args, expected in (("kill", [], signal.SIGTERM), ("kill", ["SIGUSR1"], signal.SIGUSR1),
                                   ("delete", [], signal.SIGKILL)):
        child = subprocess.Popen(["sleep", "60"])
        try:
            result = oci(action, str(child.pid), *args)
            assert result.returncode == 0, result.stderr
            assert child.wait(timeout=30) == -expected
        finally:
            child.kill()
            child.wait()


def test_kill_of_a_process_that_is_gone_succeeds():
    child = subprocess.Popen(["true"])
    child.wait()
    assert oci("kill", str(child.pid)).returncode == 0


def test_usage_errors_raise_before_anything_happens():
    with pytest.raises(UsageError):
        oci_runtime.parse_pid("4294967295")
    with pytest.raises(ConfigError):
        oci_runtime.parse_env(b"novalue\0")


# -- slurmstepd's PATH lookup on the host is undone for the image ------------------------------
HOST_FILES = {"/usr/bin/sh", "/usr/local/bin/app", "/usr/bin/app", "/opt/tool"}


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/sh", "-c", "x"], ["sh", "-c", "x"]),        # `sh`, resolved by slurmstepd
    (["/usr/local/bin/app"], ["app"]),                       # first PATH hit
    (["/usr/bin/app"], ["/usr/bin/app"]),                    # not the first hit: typed so
    (["/opt/tool"], ["/opt/tool"]),                          # not on PATH: typed so
    (["sh"], ["sh"]),                                        # not found on the host: bare
    (["./run.sh"], ["./run.sh"]),
])
def test_a_command_slurmstepd_found_on_the_host_path_is_looked_up_in_the_image(argv, expected):
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    kind, planned, _env = plan_run(RunArgs(IMAGE, "-", 0, False, argv), env,
                                   is_file=HOST_FILES.__contains__)
    assert (kind, planned) == ("uctr-exec", [IMAGE, "--", *expected])


def test_the_batch_script_keeps_its_path():
    script = "/usr/bin/sh"  # even where it looks like a PATH hit
    _kind, argv, _env = plan_run(RunArgs(IMAGE, "-", BATCH_STEP, True, [script]),
                                 {"PATH": "/usr/bin"}, is_file=HOST_FILES.__contains__)
    assert argv == [IMAGE, "--", script]


def test_the_site_policy_of_the_installed_wrapper_wins_over_the_jobs(tmp_path):
    env_file = write_env(tmp_path / "environment", ["PATH=/usr/bin:/bin", "UCTR_POLICY=/mine"])
    args = run_args(env_file, BATCH_STEP, "/bin/sh", "-c", 'echo "$UCTR_POLICY"')
    assert oci(*args, env={"UCTR_POLICY": "/etc/site.yaml"}).stdout == "/etc/site.yaml\n"
    assert oci(*args).stdout == "/mine\n"  # no site setting: the job's environment as it is


def test_step_ids_are_slurms():
    """%s of the batch and interactive steps, as this node's slurm.h defines them."""
    header = Path("/usr/include/slurm/slurm.h")
    if not header.exists():
        pytest.skip("no Slurm headers (libslurm-dev) on this node")
    import re

    defined = dict(re.findall(r"#define (SLURM_BATCH_SCRIPT|SLURM_INTERACTIVE_STEP)\s+\((0x[0-9a-f]+)\)",
                              header.read_text()))
    assert int(defined["SLURM_BATCH_SCRIPT"], 16) == BATCH_STEP
    assert int(defined["SLURM_INTERACTIVE_STEP"], 16) == INTERACTIVE_STEP
