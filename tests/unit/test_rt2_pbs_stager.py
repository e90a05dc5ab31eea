"""Red-team regression (issue 10, second pass): execjob_end stops a job's stager by the
session id in its lock file. A stale pid there (the window before a new stager writes its
own, or any stale content) may by now be another user's session leader: root must never
SIGKILL that session."""

import fcntl
import os
import subprocess
import time

import pytest

from uctr_batch.batch import pbs

NOBODY = 65534
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts another user's process")


def test_stop_stager_never_kills_another_users_session(tmp_path):
    env = {"UCTR_RUN_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(mode=0o755)
    pbs._ensure_state_dir(env)
    victim = subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY, extra_groups=[],
                              start_new_session=True)  # a co-user's session leader
    try:
        lock = pbs.state_path("7.server", "lock", env)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)  # "a stager runs" for this job
        os.pwrite(fd, f"{victim.pid}\n".encode(), 0)  # ...and the file names the stranger
        try:
            assert pbs.stop_stager("7.server", env, timeout=0.5) is False
        finally:
            os.close(fd)
        time.sleep(0.1)
        assert victim.poll() is None, "root killed another user's session"
    finally:
        victim.kill()
        victim.wait()


def test_stop_stager_still_stops_a_real_stager_session(tmp_path):
    env = {"UCTR_RUN_DIR": str(tmp_path / "run")}
    (tmp_path / "run").mkdir(mode=0o755)
    pbs._ensure_state_dir(env)
    lock = pbs.state_path("8.server", "lock", env)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    # a stand-in stager: root, `... pbs stage ...` in its argv, holding the job's lock
    stager = subprocess.Popen(["python3", "-c", "import time; time.sleep(60)", "pbs", "stage"],
                              pass_fds=(fd,), start_new_session=True)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, f"{stager.pid}\n".encode(), 0)
    os.close(fd)  # the stand-in keeps the lock through its inherited descriptor
    try:
        assert pbs.stop_stager("8.server", env, timeout=5) is True
        assert stager.wait(timeout=5) == -9
    finally:
        if stager.poll() is None:
            stager.kill()
            stager.wait()


@pytest.mark.parametrize("image", ["\ud800", "busybox\udcff:1"])
def test_the_hooks_answer_is_always_utf8_encodable(tmp_path, image):
    """pbs.logmsg() and event.reject() need text they can encode: an image name that is
    not UTF-8 must come back escaped, never as lone surrogates (the hook would raise and
    the job be requeued instead of failed with the message)."""
    import json
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\n")
    req = {"event": "execjob_begin", "node": "n1", "alarm": 30,
           "config": {"policy": str(policy), "run_dir": str(tmp_path / "run"),
                      "python": sys.executable},
           "job": {"id": "9.srv", "euser": "root", "resources": {"container_image": image}}}
    done = subprocess.run([sys.executable, "-m", "uctr_batch", "pbs", "hook"],
                          input=json.dumps(req).encode(), capture_output=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo)}, timeout=60)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    # a user error found at execjob_begin is reported at the launch (issue 15): the job is
    # accepted with the message as its comment
    assert answer["action"] == "accept" and not answer.get("job_action"), answer
    for text in [answer["job_comment"]] + [line for _, line in answer["log"]]:
        text.encode("utf-8")  # raised UnicodeEncodeError
    assert "\\ud800" in answer["job_comment"] or "\\udcff" in answer["job_comment"]
