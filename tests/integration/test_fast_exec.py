"""The C front of uctr-exec (launchers/c) against the Python launcher, on real containers.

A step's first rank sets its N1 container up through the Python launcher. Then one rank
joins through the C front (ASan+UBSan build) and one through the Python launcher, with the
same request. What their payloads see must be the same: environment (PMI/launcher variables,
image Env, policy and -e rules), working directory, ids, mounts, namespaces, signal
dispositions and mask, exit status (128+N on signal N, 127/126 with the same messages).
And the C front hands every case it must not take to the Python launcher: no record (first
rank), other options, a record it cannot trust."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import cfront
from tests.integration.exec_helpers import PYTHON, SHIM, Node, step_env, unprivileged_user

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(cfront.compiler() is None, reason="no C compiler")]

PROBE = r"""
echo "cwd $(pwd)"
echo "ids $(id -u) $(id -g) $(id -G)"
while read -r k v; do case $k in SigIgn:|SigBlk:|SigCgt:|NoNewPrivs:|Cap*) echo "$k $v";; esac
done < /proc/$$/status
env | sort | grep -v -E '^(SLURM_PROCID|SLURM_LOCALID|PMIX_RANK)='
cut -d' ' -f5 /proc/self/mountinfo | sort | sed 's/^/mount /'
echo "ns $(stat -L -c %i /proc/self/ns/user) $(stat -L -c %i /proc/self/ns/mnt)"
cd /proc/$$/fd && echo fds *  # builtins: a pipeline would show its own pipes
"""
EXTRA = {"PMIX_NAMESPACE": "slurm.pmix.61.0", "PMI_SIZE": "8", "OMPI_MCA_btl": "self,vader",
         "TERM": "xterm", "NOT_PASSED": "dropped", "MY_VAR": "host-value"}
OPTIONS = ["-e", "FROM_E=1", "-e", "MY_VAR"]


@pytest.fixture(scope="module")
def front(harness):
    """The front as `uctr slurm install` builds it: it hands ranks over to the Python the
    shim would run (UCTR_PYTHON in Node.env) directly."""
    return cfront.build(harness.root / "cfront-direct", ("uctr-exec-asan",),
                        python=PYTHON)["uctr-exec-asan"]


@pytest.fixture(scope="module")
def front_proc_ns(harness):
    """The front as it joins on kernels before 6.11: through /proc/PID/ns/, no pidfd; it
    hands ranks over to the shim (launchers/uctr-exec), as a plain make builds it."""
    return cfront.build(harness.root / "cfront",
                        ("uctr-exec-asan-procns",))["uctr-exec-asan-procns"]


@pytest.fixture
def node(harness):
    return Node(harness.root / "fast-exec", unprivileged_user())


@pytest.fixture(scope="module")
def busybox(test_images):
    return test_images["busybox"].oci_ref


def ignore_usr1_block_usr2():
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})


def rank(node, shim, args, env, popen=False, **kw):
    full = node.env(dict(env, **cfront.SAN_ENV, UCTR_FAST_DEBUG="1"))
    kw = dict(dict(text=True, cwd=str(node.work), preexec_fn=ignore_usr1_block_usr2), **kw)
    argv = node.argv(list(args), full, shim=shim)
    if popen:
        return subprocess.Popen(argv, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                **kw)
    return subprocess.run(argv, env=full, timeout=180, capture_output=True, **kw)


def start_creator(node, busybox, job, local_size=8):
    """Rank 0 through the Python launcher, kept alive; returns it once the record exists."""
    env = dict(step_env(job, "0", local_size, 0), **EXTRA)
    creator = rank(node, SHIM, [*OPTIONS, busybox, "sleep", "60"], env, popen=True)
    record = record_path(node, f"{job}.0")
    deadline = time.monotonic() + 120
    while not record.exists():
        assert creator.poll() is None, creator.communicate()
        assert time.monotonic() < deadline, "no fast-join record"
        time.sleep(0.1)
    return creator, record


def record_path(node, step_key):
    """The step's fast-join record: in the rendezvous directory, <local>/launch."""
    from uctr_batch.launch import fastrec

    return node.local / "launch" / fastrec.record_name(step_key)


def stop(proc):
    proc.kill()
    proc.communicate()


def joined(node, shim, busybox, job, r, *command, options=OPTIONS, extra=None):
    env = dict(step_env(job, "0", 8, r), **EXTRA, **(extra or {}))
    return rank(node, shim, [*options, busybox, *command], env)


def took_python(result) -> bool:
    return "uctr-exec: python path:" in result.stderr


def test_fast_path_payload_sees_what_the_python_path_gives(node, busybox, front):
    assert node.run(busybox, "true").returncode == 0  # staged: the ranks start warm
    creator, _record = start_creator(node, busybox, "61")
    try:
        fast = joined(node, front, busybox, "61", 1, "sh", "-c", PROBE)
        slow = joined(node, SHIM, busybox, "61", 2, "sh", "-c", PROBE)
    finally:
        stop(creator)
    assert fast.returncode == 0 and slow.returncode == 0, (fast.stderr, slow.stderr)
    assert not took_python(fast), fast.stderr
    assert fast.stdout == slow.stdout
    out = fast.stdout
    # the probe saw something worth comparing
    assert "FROM_E=1" in out and "MY_VAR=host-value" in out and "NOT_PASSED" not in out
    assert "PMIX_NAMESPACE=slurm.pmix.61.0" in out and "SLURM_JOB_ID=61" in out
    assert "UCTR_ARGV0" not in out and "UCTR_SIGSTATE" not in out
    sig = dict(line.split() for line in out.splitlines() if line.startswith("Sig"))
    assert int(sig["SigIgn:"], 16) & (1 << (signal.SIGUSR1 - 1))
    assert int(sig["SigBlk:"], 16) & (1 << (signal.SIGUSR2 - 1))
    assert f"cwd {node.work}" in out
    host_ns = str(os.stat("/proc/self/ns/mnt").st_ino)
    assert host_ns not in [ln for ln in out.splitlines() if ln.startswith("ns ")][0]


def test_exit_status_and_errors_are_the_python_paths(node, busybox, front):
    assert node.run(busybox, "true").returncode == 0
    creator, _record = start_creator(node, busybox, "62")
    cases = [("sh", "-c", "exit 7"), ("sh", "-c", "kill -TERM $$"), ("sh", "-c", "kill -SEGV $$"),
             ("nosuchcmd",), ("/etc/passwd",)]
    try:
        for i, command in enumerate(cases):
            fast = joined(node, front, busybox, "62", 1 + i, *command)
            slow = joined(node, SHIM, busybox, "62", 1 + i, *command)
            assert not took_python(fast), fast.stderr
            assert fast.returncode == slow.returncode, (command, fast.stderr, slow.stderr)
            errors = [ln for ln in fast.stderr.splitlines() if ln.startswith("uctr")]
            assert errors == [ln for ln in slow.stderr.splitlines() if ln.startswith("uctr")]
    finally:
        stop(creator)
    # sh reports a signal N as 128+N; exec kept it: the launcher's status is the payload's
    assert joined(node, front, busybox, "62", 9, "sh", "-c", "kill -TERM $$").returncode == 143


def test_what_the_c_front_must_not_take_goes_to_python(node, busybox, front):
    assert node.run(busybox, "true").returncode == 0
    # no record yet: the first rank through the C front is the Python launcher's
    first = joined(node, front, busybox, "63", 0, "sh", "-c", "echo first")
    assert first.returncode == 0 and "first" in first.stdout and took_python(first)
    creator, record = start_creator(node, busybox, "64")
    try:
        os.chmod(record, 0o620)  # group-writable: not trusted
        loose = joined(node, front, busybox, "64", 3, "true")
        assert loose.returncode == 0 and took_python(loose)
        os.chmod(record, 0o600)
        fine = joined(node, front, busybox, "64", 4, "true")
        assert fine.returncode == 0 and not took_python(fine), fine.stderr
        # another request: Python, which gives it a container of its own (and the record
        # then describes that one: the step's latest)
        other = joined(node, front, busybox, "64", 1, "true", options=["--writable"])
        assert other.returncode == 0 and took_python(other)
        elsewhere = joined(node, front, busybox, "64", 2, "true",
                           extra={"UCTR_MOUNTS": str(node.home)})
        assert elsewhere.returncode == 0 and took_python(elsewhere)
    finally:
        stop(creator)


@pytest.mark.parametrize("kernel", ["pidfd", "proc"])
def test_all_ranks_through_the_c_front_share_one_container(node, busybox, front, front_proc_ns,
                                                           kernel):
    """The install case: every rank starts the C front. The early ones find no record and
    run the Python launcher (one of them sets up the container); the later ones join from C,
    taking the namespaces through a pidfd (Linux >= 6.11) or /proc/PID/ns/ (older kernels)."""
    front = front if kernel == "pidfd" else front_proc_ns
    job = "65" if kernel == "pidfd" else "67"  # a step of its own
    assert node.run(busybox, "true").returncode == 0
    probe = 'echo "ns $(stat -L -c %i /proc/self/ns/mnt)"; sleep 2'

    def start(r):
        return rank(node, front, [busybox, "sh", "-c", probe], step_env(job, "0", 6, r),
                    popen=True)

    early = [start(r) for r in range(3)]
    deadline = time.monotonic() + 120
    while not record_path(node, f"{job}.0").exists():
        assert time.monotonic() < deadline, "no fast-join record"
        time.sleep(0.05)
    late = [start(r) for r in range(3, 6)]
    outs = [p.communicate(timeout=180) for p in early + late]
    assert all(p.returncode == 0 for p in early + late), outs
    assert len({out for out, _err in outs}) == 1, outs
    assert ["python path" in err for _out, err in outs[3:]] == [False] * 3, outs


def test_spank_hand_over_joins_from_c_too(node, busybox, front):
    """The SPANK plugin execs uctr_exec= with the task's argv[0] in UCTR_ARGV0 and the image
    in UCTR_IMAGE; the rest of argv is the task's, unparsed."""
    assert node.run(busybox, "true").returncode == 0
    handover = {"UCTR_IMAGE": busybox, "UCTR_ARGV0": "sh"}
    env = dict(step_env("66", "0", 8, 0), **handover)
    creator = rank(node, SHIM, ["-c", "sleep 60"], env, popen=True)
    deadline = time.monotonic() + 120
    while not record_path(node, "66.0").exists():
        assert creator.poll() is None and time.monotonic() < deadline, "no record"
        time.sleep(0.1)
    try:
        results = [rank(node, shim, ["-c", 'echo "$0 $1|$(pwd)"; env | sort | grep -v -E '
                                     '"^(SLURM_PROCID|SLURM_LOCALID)="', "x y"],
                        dict(step_env("66", "0", 8, r), **handover))
                   for r, shim in ((1, front), (2, SHIM))]
    finally:
        stop(creator)
    fast, slow = results
    assert fast.returncode == 0 and not took_python(fast), fast.stderr
    assert fast.stdout == slow.stdout and fast.stdout.startswith("x y |")  # sh -c SCRIPT ARG0
    assert "UCTR_ARGV0" not in fast.stdout


@pytest.mark.skipif(shutil.which("strace") is None, reason="no strace")
def test_a_joining_rank_opens_the_launch_directory_once(node, busybox, front, tmp_path):
    """The record sits in the step's rendezvous directory: the C front opens and checks that
    one directory for the record, the lock and the members file (docs/launcher.md, the
    call table)."""
    assert node.run(busybox, "true").returncode == 0
    creator, record = start_creator(node, busybox, "68")
    trace = tmp_path / "trace"
    try:
        env = node.env(dict(step_env("68", "0", 8, 1), **EXTRA, **cfront.SAN_ENV,
                            UCTR_FAST_DEBUG="1"))
        argv = node.argv([*OPTIONS, busybox, "true"], env, shim=front)
        fast = subprocess.run(["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=open,openat",
                               *argv], env=env, cwd=str(node.work), capture_output=True,
                              text=True, timeout=180)
    finally:
        stop(creator)
    assert fast.returncode == 0 and not took_python(fast), fast.stderr
    assert record.parent == node.local / "launch"
    lines = trace.read_text().splitlines()
    ours = [ln for ln in lines if str(node.local) in ln and "O_DIRECTORY" in ln]
    assert len(ours) == 1 and '"%s/launch"' % node.local in ours[0], ours
    assert not [ln for ln in lines if '"%s/fast' % node.local in ln], ours  # the old place


def test_ranks_fail_from_c_as_the_first_rank_failed(node, busybox, front):
    """The first rank (Python) fails before it makes a container: it leaves an outcome
    record (launchers/c/record.md), and the later ranks of the same run of the step that
    ask the same fail from C at once, with its message and exit code; a rank running
    another command goes to Python, which makes the container."""
    assert node.run(busybox, "true").returncode == 0
    env = node.env(dict(step_env("64", "0", 8), **EXTRA, **cfront.SAN_ENV, UCTR_FAST_DEBUG="1"))
    launch = [*OPTIONS, busybox]
    script = " ; ".join([
        "SLURM_PROCID=%d SLURM_LOCALID=%d %s %s %s 2>err%d; echo rc$?" % (
            r, r, prog, " ".join(launch), command, r)
        for r, prog, command in ((0, SHIM, "nosuchcmd"), (1, front, "nosuchcmd"),
                                 (2, front, "true"))])
    # one parent process for the three ranks, as slurmstepd or orted is for a step's ranks
    proc = subprocess.run(node.argv(["-c", script], env, shim="/bin/sh"), env=env, text=True,
                          capture_output=True, cwd=str(node.work), timeout=180)
    assert proc.stdout.split() == ["rc127", "rc127", "rc0"], (proc.stdout, proc.stderr)
    err = [(node.work / f"err{r}").read_text() for r in range(3)]
    assert "uctr[rank 0]: error: command not found in the container: nosuchcmd" in err[0]
    assert not took_python(subprocess.CompletedProcess([], 0, "", err[1])), err[1]
    assert err[1].replace("rank 1", "rank 0") == err[0].replace(
        "uctr-exec: python path: no record for this step\n", ""), err
    assert "python path: the step's first rank failed for another command" in err[2], err[2]


def replay_env(job, step, rank=0):
    return dict(step_env(job, step, 8, rank), SLURM_JOBID=job, **cfront.SAN_ENV)


def test_the_c_creator_names_the_next_steps_container_as_python_does(node, busybox, front,
                                                                    harness):
    """The replay template the Python creator leaves (launch/replay.py) holds for the next
    step of the same request: the C creator's check (launchers/c/replay.c, run here through
    fastrec-tool) accepts it and names the step's container as the Python launcher does
    (the namespace key from the template's repr, with the new ids); and refuses it when
    something it depends on changed."""
    tool = cfront.build(harness.root / "cfront-tool", ("fastrec-tool",))["fastrec-tool"]
    assert node.run(busybox, "true").returncode == 0
    request = ["uctr-exec", busybox, "true"]  # the plugin's request, from 23.11: IMAGE --
    python_first = rank(node, SHIM, [busybox, "true"], replay_env("71", "0"))
    assert python_first.returncode == 0, python_first.stderr
    templates = list((node.local / "launch").glob("fast-replay-*.rec"))
    assert len(templates) == 1, python_first.stderr

    def check(step, *args, env=None):
        full = node.env(dict(replay_env("71", step), **(env or {})))
        argv = node.argv([str(tool), "replay", "1", *args], full, shim="/usr/bin/env")
        out = subprocess.run(argv, env=full, text=True, capture_output=True,
                             cwd=str(node.work), timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    ok = check("1", *request[:2], "true")
    assert ok.startswith("ok step-71.1-"), ok
    # the Python launcher, run for that step, makes the rendezvous files of that stem
    python_next = rank(node, SHIM, [busybox, "true"], replay_env("71", "1"))
    assert python_next.returncode == 0, python_next.stderr
    assert (node.local / "launch" / (ok.split()[1] + ".lock")).exists(), ok
    assert check("2", *request[:2], "sh") == \
        "no: another program (the container was planned for the template's)"
    assert check("2", *request[:2], "true", env={"UCTR_NAME": "x"}).startswith("no: ")
    from uctr_batch.launch import fastrec

    stats = [args for name, args in fastrec.parse(templates[0].read_bytes())
             if name == "replay_stat" and len(args) == 5]
    tag = [args[0] for args in stats if "/refs/" in args[0]]
    assert tag, stats
    pmi_dir = Path("/tmp/spmix_appdir_71.2")  # what Slurm's PMIx plugin makes for 71.2
    pmi_dir.mkdir()
    try:
        assert check("2", *request[:2], "true") == \
            "no: the step has directories of its own (PMI)"
    finally:
        pmi_dir.rmdir()
    assert check("2", *request[:2], "true").startswith("ok step-71.2-")
    os.utime(tag[0])  # the shared cache's file for the tag: as if the tag was pulled again
    assert check("2", *request[:2], "true") == "no: a file the container depends on changed"
