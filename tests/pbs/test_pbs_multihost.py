"""Multi-host MPI through TM under a real OpenPBS (issue 15, item 1): two MoMs, two hosts.

The local OpenPBS (server, scheduler, comm and this host's MoM, as test_pbs_real.py needs
them) gets a second pbs_mom, started in a network namespace of its own (address MOM2_ADDR
on the test bridge, as the Slurm harness's nodes) and in private mount and UTS namespaces:
its own host name, PBS_HOME, uctr run dir and node-local storage (tmpfs), the rest of the
file system shared like a cluster's shared file system. It is added as a vnode; 2-chunk
jobs with `place=scatter` then run one chunk on each host:

  * Open MPI (`plm_rsh_agent pbs_tmrsh`) and MPICH hydra (`-launcher rsh -launcher-exec
    pbs_tmrsh`): every rank prints its host name and a file only the image has;
  * `pbsdsh`: every task does the same (the hook wraps TM tasks in the image);
  * each host staged the image for itself (the second MoM's own run dir had a readiness
    record while the job ran).

Runs as root where OpenPBS is installed (see test_pbs_real.py for the other prerequisites)
and `ip`, `nsenter` and `unshare` exist; skipped with the reason otherwise. Everything it
adds (the namespace, the MoM, its vnode, its /etc/hosts line, its jobs, the hook) is removed
at the end, also after a failure.

It passed against OpenPBS built from sources (docs/pbs.md, "Tested").
"""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.pbs.test_pbs_real import (HOOK, IMAGE_MARKER, Pbs, _why_not, delete_test_jobs,
                                     marked_layout, restore_vnodes, vnode_states)

pytestmark = pytest.mark.pbs

MOM2 = "uctr-pbsmom2"  # host name, vnode name and network namespace of the second MoM
MOM2_ADDR = "10.200.0.250"  # on the Slurm harness's bridge, outside its node addresses
HOSTS_MARK = "# uctr-batch test_pbs_multihost"
PBS_CONF = Path("/etc/pbs.conf")
LOCAL_BASE = Path("/var/tmp/uctr-pbs-multihost")  # node-local storage (tmpfs on MoM 2)


def _pbs_conf() -> dict:
    conf = {}
    for line in PBS_CONF.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            conf[key.strip()] = value.strip()
    return conf


def _why_not_two_hosts() -> str:
    why = _why_not()
    if why:
        return why
    for tool in ("ip", "nsenter", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not on PATH (the second MoM runs in namespaces)"
    if not PBS_CONF.is_file():
        return f"no {PBS_CONF}: cannot tell where OpenPBS is installed"
    conf = _pbs_conf()
    mom = Path(conf.get("PBS_EXEC", "/opt/pbs")) / "sbin" / "pbs_mom"
    if not os.access(mom, os.X_OK):
        return f"no pbs_mom at {mom}"
    if MOM2 in vnode_states():
        return f"a vnode {MOM2} exists already (left by a killed run? qmgr -c 'delete node {MOM2}')"
    return ""


class SecondMom:
    """pbs_mom in its own network, mount and UTS namespaces, registered as vnode MOM2."""

    def __init__(self, base: Path, run_dir: Path):
        self.base, self.run_dir = base, run_dir
        self.conf = _pbs_conf()
        # not under the harness's /tmp: pbs_mom refuses a PBS_HOME whose path passes a
        # directory others may write ("Security violation ... resolves to /tmp")
        self.home = Path(self.conf.get("PBS_HOME", "/var/spool/pbs")).parent / f"{MOM2}-home"
        self.conf_file = self.home / "pbs.conf"
        self.netns = MOM2
        self.veth = "uctrve-pbsm2"

    # -- setup -------------------------------------------------------------------------------
    def start(self) -> "SecondMom":
        from tests.harness.slurm import BRIDGE_ADDR, SlurmCluster

        SlurmCluster.ensure_bridge()
        self._hosts_line(add=True)
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        for argv in (["ip", "link", "add", self.veth, "type", "veth", "peer", "name", "eth0",
                      "netns", self.netns],
                     ["ip", "link", "set", self.veth, "master", "uctrbr0", "up"],
                     ["ip", "-n", self.netns, "addr", "add", f"{MOM2_ADDR}/24", "dev", "eth0"],
                     ["ip", "-n", self.netns, "link", "set", "eth0", "up"],
                     ["ip", "-n", self.netns, "link", "set", "lo", "up"],
                     ["ip", "-n", self.netns, "route", "add", "default", "via", BRIDGE_ADDR]):
            subprocess.run(argv, check=True)
        self._pbs_home()
        # tmpfs over the run dir and the node-local storage: this host's own, as on a cluster
        script = "; ".join([
            f"hostname {MOM2}",
            "mount --make-rprivate /",
            f"mkdir -p {self.run_dir} {LOCAL_BASE}",
            f"mount -t tmpfs -o mode=0755 uctr-run {self.run_dir}",
            f"mount -t tmpfs -o mode=1777 uctr-local {LOCAL_BASE}",
            f"exec env PBS_CONF_FILE={self.conf_file} {self.conf['PBS_EXEC']}/sbin/pbs_mom"])
        subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount",
                        "--uts", "sh", "-c", script], check=True, timeout=60)
        subprocess.run(["qmgr", "-c", f"create node {MOM2}"], check=True, timeout=60)
        deadline = time.monotonic() + 120
        while vnode_states().get(MOM2, {}).get("state") != "free":
            if time.monotonic() > deadline:
                raise AssertionError(f"vnode {MOM2} is not free: {vnode_states().get(MOM2)}; "
                                     f"MoM log: {self.log_tail()}")
            time.sleep(1)
        return self

    def _hosts_line(self, add: bool) -> None:
        hosts = Path("/etc/hosts")
        lines = [line for line in hosts.read_text().splitlines() if HOSTS_MARK not in line]
        if add:
            lines.append(f"{MOM2_ADDR} {MOM2} {HOSTS_MARK}")
        hosts.write_text("\n".join(lines) + "\n")

    def _pbs_home(self) -> None:
        main_home = Path(self.conf.get("PBS_HOME", "/var/spool/pbs"))
        for sub, mode in (("aux", 0o755), ("checkpoint", 0o700), ("mom_logs", 0o755),
                          ("mom_priv", 0o751), ("mom_priv/jobs", 0o751),
                          ("mom_priv/hooks", 0o700), ("mom_priv/hooks/tmp", 0o700),
                          ("spool", 0o1777), ("undelivered", 0o1777)):
            (self.home / sub).mkdir(parents=True, exist_ok=True)
            os.chmod(self.home / sub, mode)
        if (main_home / "pbs_environment").exists():
            shutil.copy(main_home / "pbs_environment", self.home / "pbs_environment")
        server = self.conf.get("PBS_SERVER", os.uname().nodename)
        (self.home / "mom_priv" / "config").write_text(
            f"$clienthost {server}\n$usecp *:/ /\n$logevent 0x1ff\n")
        conf = dict(self.conf, PBS_HOME=str(self.home), PBS_START_MOM="1",
                    PBS_START_SERVER="0", PBS_START_SCHED="0", PBS_START_COMM="0",
                    PBS_LEAF_NAME=MOM2, PBS_MOM_NODE_NAME=MOM2,
                    PBS_LEAF_ROUTERS=self.conf.get("PBS_LEAF_ROUTERS", server))
        self.conf_file.write_text("".join(f"{k}={v}\n" for k, v in conf.items()))

    # -- what tests read ---------------------------------------------------------------------
    def log_tail(self, lines: int = 40) -> str:
        logs = sorted((self.home / "mom_logs").glob("*"))
        if not logs:
            return "(no MoM log)"
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    def readiness_records(self) -> list:
        """The readiness records in the second MoM's own (private) run dir."""
        cp = subprocess.run(["nsenter", f"--target={self._pid()}", "--mount", "ls",
                             str(self.run_dir / "readiness")], capture_output=True, text=True)
        return cp.stdout.split()

    def read_record(self, job_id: str) -> dict:
        cp = subprocess.run(["nsenter", f"--target={self._pid()}", "--mount", "cat",
                             str(self.run_dir / "readiness" / job_id)],
                            capture_output=True, text=True)
        return dict(line.split("=", 1) for line in cp.stdout.splitlines() if "=" in line)

    def _pid(self) -> int:
        return int((self.home / "mom_priv" / "mom.lock").read_text().split()[0])

    # -- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        subprocess.run(["qmgr", "-c", f"delete node {MOM2}"], capture_output=True, timeout=60)
        try:
            os.kill(self._pid(), signal.SIGTERM)
        except (OSError, ValueError, IndexError):
            pass
        out = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True,
                             text=True).stdout
        for pid in out.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        self._hosts_line(add=False)
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture(scope="module")
def two_hosts(test_user, harness, push, tmp_path_factory):
    why = _why_not_two_hosts()
    if why:
        pytest.skip(why)
    from tests.harness.slurm import BridgeRegistry, SlurmCluster

    SlurmCluster.ensure_bridge()  # the registry must be reachable from both hosts
    registry = BridgeRegistry(harness.root / "pbs-mh-registry").start()
    base = harness.root / "pbs-multihost"
    base.mkdir(mode=0o755)
    shutil.chown(base, test_user)
    etc, run = harness.root / "pbs-mh-etc", harness.root / "pbs-mh-run"
    etc.mkdir(mode=0o755)
    LOCAL_BASE.mkdir(mode=0o1777, exist_ok=True)
    os.chmod(LOCAL_BASE, 0o1777)
    policy = etc / "policy.yaml"
    policy.write_text("\n".join([
        "version: 1", "defaults:",
        "  registries:", f'    insecure: ["{registry.host}"]',
        "  storage:", f"    cache_dir: {base}/cache-${{UID}}",  # shared by both hosts
        f"    local_dir: {LOCAL_BASE}/local-${{UID}}", "    stage_timeout: 300", ""]))
    policy.chmod(0o644)
    site = Pbs(base, test_user, policy, run)
    mom = SecondMom(harness.root / "pbs-mom2", run)
    delete_test_jobs(test_user)
    before = vnode_states()
    try:
        site.install()
        mom.start()
        # on the bridge: the second host reaches it too (127.0.0.1 is its own there)
        image = push(marked_layout(tmp_path_factory.mktemp("marked")), registry, repo="marked")
        yield site, mom, image
    finally:
        delete_test_jobs(test_user, only=set(site.jobs))
        mom.stop()
        site.uninstall()
        subprocess.run(["qmgr", "-c", f"delete hook {HOOK}_guard"], capture_output=True)
        restore_vnodes(before)
        registry.stop()


def _submit_two_chunks(site, image: str, lines: str):
    script = "#!/bin/sh\n" + lines + "\n"
    sub = site.qsub(script, "-l", f"container_image={image}",
                    "-l", "select=2:ncpus=1:mpiprocs=1", "-l", "place=scatter",
                    "-v", "UCTR_JOB_SHELL=host")
    assert sub.returncode == 0, sub.stderr
    return sub


def _run_two_chunks(site, image: str, lines: str) -> str:
    sub = _submit_two_chunks(site, image, lines)
    job = site.wait(sub.stdout.strip(), timeout=180)
    output = sub.output_file.read_text() if sub.output_file.exists() else ""
    assert job.get("Exit_status") == 0, (job, output)
    hosts = {part.split("+")[0].split("/")[0].split(":")[0]
             for part in str(job.get("exec_host", "")).split("+")}
    assert len(hosts) == 2 and MOM2 in hosts, f"not placed on two hosts: {job.get('exec_host')}"
    return output


def _rank_lines(output: str, prefix: str) -> dict:
    """{host: marker} from lines 'PREFIX HOST MARKER'."""
    found = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) == 3 and words[0].startswith(prefix):
            found[words[1]] = words[2]
    return found


ECHO = f"echo {{prefix}} $(hostname) $(cat {IMAGE_MARKER})"


def test_pbsdsh_tasks_run_in_the_image_on_both_hosts(two_hosts):
    site, mom, image = two_hosts
    output = _run_two_chunks(site, image, "pbsdsh -- sh -c '%s'" % ECHO.format(prefix="task"))
    tasks = _rank_lines(output, "task")
    assert len(tasks) == 2 and MOM2 in tasks, output
    assert set(tasks.values()) == {"inside-the-image"}, output


def test_open_mpi_ranks_run_in_the_image_on_both_hosts(two_hosts):
    if shutil.which("mpiexec.openmpi") is None:
        pytest.skip("Open MPI (mpiexec.openmpi) is not installed")
    site, mom, image = two_hosts
    from uctr_batch.batch.pbs_install import find_uctr_exec

    # pbs_tmrsh by its full path: the orted on the second host checks the agent on its own
    # PATH, which lacks PBS's bin (seen on a real OpenPBS: "plm_rsh_agent ... could not be
    # found", then a crash)
    tmrsh = shutil.which("pbs_tmrsh")
    line = (f"mpiexec.openmpi --mca plm_rsh_agent {tmrsh} --hostfile \"$PBS_NODEFILE\" "
            "--map-by node -n 2 --mca oob_tcp_if_include 10.200.0.0/24 --mca btl self,tcp "
            "--mca btl_tcp_if_include 10.200.0.0/24 "
            f"{find_uctr_exec()} \"$UCTR_IMAGE\" sh -c '{ECHO.format(prefix='rank')}'")
    output = _run_two_chunks(site, image, line)
    ranks = _rank_lines(output, "rank")
    assert len(ranks) == 2 and MOM2 in ranks, (output, mom.log_tail())
    assert set(ranks.values()) == {"inside-the-image"}, output


def test_mpich_hydra_ranks_run_in_the_image_on_both_hosts(two_hosts):
    if shutil.which("mpiexec.mpich") is None:
        pytest.skip("MPICH (mpiexec.mpich) is not installed")
    site, mom, image = two_hosts
    from uctr_batch.batch.pbs_install import find_uctr_exec

    # -localhost: the proxies connect back to mpiexec by this host's name, which resolves
    # to a loopback address on the test host (on a cluster it names a real interface)
    from tests.harness.slurm import BRIDGE_ADDR

    line = ("timeout 120 mpiexec.mpich -launcher rsh -launcher-exec pbs_tmrsh -f \"$PBS_NODEFILE\" "
            f"-localhost {BRIDGE_ADDR} -ppn 1 -n 2 {find_uctr_exec()} \"$UCTR_IMAGE\" "
            f"sh -c '{ECHO.format(prefix='rank')}'")
    output = _run_two_chunks(site, image, line)
    ranks = _rank_lines(output, "rank")
    assert len(ranks) == 2 and MOM2 in ranks, (output, mom.log_tail())
    assert set(ranks.values()) == {"inside-the-image"}, output


def test_the_second_host_stages_for_itself(two_hosts):
    """While the job runs, the second MoM's private run dir has the job's readiness record,
    naming a root filesystem on that host's own node-local storage; its execjob_end
    removes it."""
    site, mom, image = two_hosts
    sub = _submit_two_chunks(site, image, "pbsdsh -- true\nsleep 30")
    job_id = sub.stdout.strip()
    deadline = time.monotonic() + 120
    while job_id not in mom.readiness_records():
        assert time.monotonic() < deadline, (mom.readiness_records(), mom.log_tail())
        time.sleep(1)
    record = mom.read_record(job_id)
    assert record.get("status") == "ok", record
    assert record.get("bundle", "").startswith(str(LOCAL_BASE)), record
    job = site.wait(job_id)
    assert job.get("Exit_status") == 0, job
    deadline = time.monotonic() + 30
    while job_id in mom.readiness_records():
        assert time.monotonic() < deadline, ("the second MoM's execjob_end kept the record",
                                             mom.log_tail(80))
        time.sleep(1)
