"""uctr-exec end to end, run through launchers/uctr-exec as the unprivileged test user:
exit status, environment, binds, the SPANK argv[0] contract, PMI_FD, the manifest, and
staging on a cold node by 32 ranks at once (one download per blob, one unpack)."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.integration.exec_helpers import (
    NS_PROBE, PYTHON, REPO, SHIM, Node, ns_inodes, step_env, unprivileged_user,
)
from uctr_batch.launch import staged


@pytest.fixture
def node(harness):
    return Node(harness.root / "uctr-exec", unprivileged_user(),
                insecure_registries=",".join(harness.insecure_hosts()))


@pytest.fixture(scope="module")
def busybox(test_images):
    return test_images["busybox"].oci_ref


def test_exit_status_is_the_payloads(node, busybox):
    assert node.run(busybox, "sh", "-c", "exit 7").returncode == 7
    killed = node.run(busybox, "sh", "-c", "kill -TERM $$")
    assert killed.returncode in (-signal.SIGTERM, 128 + signal.SIGTERM)  # runuser reports 143


def test_missing_command_is_127_with_the_rank_in_the_message(node, busybox):
    cp = node.run(busybox, "no-such-program", env=step_env("60", "0", 4, rank=3))
    assert cp.returncode == 127
    assert "uctr[rank 3]: error: command not found in the container: no-such-program" in cp.stderr
    assert "uctr[rank 3]: hint:" in cp.stderr


def test_usage_error(node):
    cp = node.run("--bogus", "img")
    assert cp.returncode == 2 and "error: unknown option: --bogus" in cp.stderr


def test_environment(node, busybox):
    env = {"SLURM_PROCID": "0", "PMIX_RANK": "0", "SECRET": "host-only", "FROM_HOST": "h",
           "NAMED": "n", "UCTR_ENV_NAMES": "NAMED"}
    cp = node.run("-e", "SET=v", "-e", "FROM_HOST", busybox, "env", env=env)
    assert cp.returncode == 0, cp.stderr
    got = dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)
    assert got["SET"] == "v" and got["FROM_HOST"] == "h" and got["NAMED"] == "n"
    assert got["SLURM_PROCID"] == "0" and got["PMIX_RANK"] == "0"  # the launcher's wiring
    assert "SECRET" not in got and "UCTR_CACHE" not in got
    assert got["PATH"].startswith("/usr/local/sbin")  # busybox image: no Env, the default


def test_spank_argv0_contract(node, busybox):
    """SPANK replaced the task's argv[0]: our arguments are the app's, never parsed."""
    cp = node.run("--mode", "-v", "hello", env={"UCTR_ARGV0": "echo", "UCTR_IMAGE": busybox})
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout == "--mode -v hello\n"


def test_spank_argv0_is_not_handed_on_to_the_payload(node, busybox):
    """A nested `srun uctr-exec IMG CMD` in a batch script running in the container must not
    inherit UCTR_ARGV0 (it would run the batch script again with IMG CMD as arguments)."""
    site = node.base.parent / (node.base.name + "-site")  # beside the node: owned by root
    site.mkdir(mode=0o755)
    policy = site / "policy.yaml"  # a site that hands the whole environment on
    policy.write_text('version: 1\ndefaults:\n  env:\n    passthrough: ["*"]\n')
    policy.chmod(0o644)
    cp = node.run("-c", 'echo "argv0=[${UCTR_ARGV0-unset}] image=[$UCTR_IMAGE]"',
                  env={"UCTR_ARGV0": "sh", "UCTR_IMAGE": busybox, "UCTR_POLICY": policy})
    assert cp.returncode == 0, cp.stderr
    # The settings stay (a nested uctr-exec means the same); the hand-over does not.
    assert cp.stdout == f"argv0=[unset] image=[{busybox}]\n"


def test_binds_read_only_rootfs_and_working_directory(node, busybox):
    ro, rw = node.work / "ro", node.work / "rw"
    for d in (ro, rw):
        d.mkdir()
        os.chmod(d, 0o777)
    (ro / "in").write_text("data\n")
    script = ("cat /ro/in; touch /ro/x 2>/dev/null && echo ro-writable; touch /rw/y && echo rw-ok; "
              "touch /etc/probe 2>/dev/null && echo rootfs-writable; pwd")
    cp = node.run("-v", f"{ro}:/ro:ro", busybox, "sh", "-c", script,
                  env={"UCTR_MOUNTS": f"{rw}:/rw"})
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines() == ["data", "rw-ok", str(node.work)]  # cwd: through /tmp
    assert (rw / "y").exists() and not (ro / "x").exists()
    cp = node.run("--writable", "-w", "/etc", busybox, "sh", "-c",
                  "touch probe && echo rootfs-writable && rm probe; pwd")
    assert cp.stdout.splitlines() == ["rootfs-writable", "/etc"], cp.stderr


def test_pmi_fd_reaches_the_payload(node, busybox):
    r, w = os.pipe()
    cp = node.run(busybox, "sh", "-c", 'echo "rank $PMI_RANK via fd $PMI_FD" >&$PMI_FD',
                  env={"PMI_FD": str(w), "PMI_RANK": "2", "PMI_SIZE": "4"}, pass_fds=(w,))
    os.close(w)
    data = os.read(r, 100).decode()
    os.close(r)
    assert cp.returncode == 0, cp.stderr
    assert data == "rank 2 via fd %d\n" % w


def test_manifest_written_and_shown_with_verbose(node, busybox):
    cp = node.run("--verbose", busybox, "true")
    assert cp.returncode == 0, cp.stderr
    assert "uctr: injection manifest (" in cp.stderr
    path = cp.stderr.split("uctr: injection manifest (", 1)[1].split(")", 1)[0]
    assert path.endswith("/rootfs.injection.json") and path.startswith(str(node.local))
    plan = json.loads(open(path).read())
    assert "manifest" in plan and plan["mpi_level"] == "none"
    assert "mpi: level none" in cp.stderr
    quiet = node.run(busybox, "true")
    assert quiet.stderr == ""


def test_stage_timeout_is_bounded_and_explained(node, busybox):
    launch = node.local / "launch"
    launch.mkdir(parents=True)
    if node.user:
        subprocess.run(["chown", "-R", node.user, str(node.local)], check=True)
    from uctr_batch.launch.nodelock import NodeLock

    fd = os.open(str(launch), os.O_RDONLY | os.O_DIRECTORY)
    lock = NodeLock(fd, "img-%s.lock" % staged.image_key(busybox))
    assert lock.try_acquire()  # another "rank" is staging and never finishes
    if node.user:
        subprocess.run(["chown", "-R", node.user, str(node.local)], check=True)
    try:
        started = time.monotonic()
        cp = node.run(busybox, "true", env={"UCTR_STAGE_TIMEOUT": "1"})
        assert time.monotonic() - started < 30
    finally:
        lock.release()
        os.close(fd)
    assert cp.returncode == 1
    assert (f"error: timed out after 1 s waiting for {busybox} to be staged on this node"
            in cp.stderr)
    assert "UCTR_STAGE_TIMEOUT" in cp.stderr
    assert node.run(busybox, "true").returncode == 0  # and works once the lock is free


@pytest.mark.slow
def test_cold_node_32_ranks_one_download_and_one_unpack(node, pushed, registry_http, test_images):
    image = pushed["busybox"]
    layers = test_images["busybox"].layer_digests()
    before = {d: registry_http.blob_gets(d) for d in layers}
    procs = [node.popen(image, "sh", "-c", NS_PROBE,
                        env=dict(step_env("61", "0", 32, rank), UCTR_VERBOSE="1"))
             for rank in range(32)]
    results = [(p.wait(timeout=300), p.stdout.read(), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [rc for rc, _, _ in results] == [0] * 32, [e for _, _, e in results if e][:3]
    stderr = "".join(err for _, _, err in results)
    assert stderr.count("unpacking ") == 1, stderr
    assert {d: registry_http.blob_gets(d) - before[d] for d in layers} == {d: 1 for d in layers}
    assert len(node.bundles()) == 1
    namespaces = {ns_inodes(out)[0] for _, out, _ in results}
    assert len(namespaces) == 1  # all 32 in the step's one container
    # warm: nothing is pulled or unpacked again, by another step
    again = node.run(image, "true", env=dict(step_env("61", "1", 1), UCTR_VERBOSE="1"))
    assert again.returncode == 0 and "unpacking" not in again.stderr
    assert {d: registry_http.blob_gets(d) - before[d] for d in layers} == {d: 1 for d in layers}


def test_failed_staging_is_reported_by_every_rank(node, registry_http):
    missing = f"{registry_http.host}/no/such-image:1"
    procs = [node.popen(missing, "true", env=step_env("62", "0", 4, rank)) for rank in range(4)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    for rank, (rc, err) in enumerate(results):
        assert rc == 4, err  # the registry's exit code, from every rank
        assert f"uctr[rank {rank}]: error:" in err and "no/such-image" in err


def test_other_modes_run_one_container_per_rank(node, busybox):
    cp = node.run("--mode", "P1", busybox, "sh", "-c", "echo in-p1; cat /etc/passwd | tail -1")
    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.splitlines()[0] == "in-p1"
    assert cp.stdout.splitlines()[1].startswith((node.user or "root") + ":")


def test_policy_is_cached_per_node(node, busybox):
    assert node.run(busybox, "true").returncode == 0
    cached = list((node.local / "policy").iterdir())
    assert {p.suffix for p in cached} == {".json", ".marshal"}
    assert json.loads(next(p for p in cached if p.suffix == ".json").read_text())["builtin"]


def test_pip_console_script_entry_point(node, busybox):
    """The console script `uctr-exec = uctr_batch.launch.main:main`, as pip generates it."""
    script = node.base / "uctr-exec"
    script.write_text(f"#!{PYTHON}\nimport re\nimport sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "from uctr_batch.launch.main import main\n"
                      "if __name__ == '__main__':\n    sys.exit(main())\n")
    os.chmod(script, 0o755)
    full = node.env({})
    cp = subprocess.run(node.argv([busybox, "echo", "ok"], full, shim=script), env=full,
                        capture_output=True, text=True, cwd=str(node.work), timeout=120)
    assert cp.returncode == 0 and cp.stdout == "ok\n", cp.stderr
    assert SHIM.exists()
