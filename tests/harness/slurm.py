"""A real two-node Slurm 22.05 cluster on this machine, for the end-to-end tests.

munged and slurmctld run in the root namespaces. Each slurmd "node" runs in its own network
namespace (veth on bridge uctrbr0, 10.200.0.0/24) plus private mount and UTS namespaces with
its own hostname, /tmp, /dev/shm, /run/uctr, boot id and sysfs (whose /sys/class/net lists the
node's own eth0, whatever the host's NICs are called), so node-local storage really is
separate and MPI libraries do not take the two nodes for one machine.
The recipe and its pitfalls: /work/shared/research/slurm-lab-notes.md (nsenter, never
`ip netns exec`, which hides the cgroup mounts slurmd needs).

Everything lives under STATE (not /tmp: the nodes have private /tmp). Bring-up is
idempotent: daemons started by an earlier session with the same configuration are reused,
anything else is stopped and started again. Runs as root; nothing here imports uctr_batch.
"""

import contextlib
import fcntl
import hashlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .registry import Registry
from .users import BASE_PATH, TEST_USER

STATE = Path(os.environ.get("UCTR_SLURM_STATE", "/var/lib/uctr-slurm-test"))
SLURM_CONF = Path("/etc/slurm/slurm.conf")
BRIDGE, BRIDGE_ADDR = "uctrbr0", "10.200.0.1"
MAX_NODES = 32  # 10.200.0.11 .. 10.200.0.42; one slurmd (a few MiB) per node


def make_nodes(count: int) -> Dict[str, str]:
    """node1..nodeCOUNT with their bridge addresses (the scale lab: COUNT up to MAX_NODES)."""
    if not 1 <= count <= MAX_NODES:
        raise ValueError(f"between 1 and {MAX_NODES} nodes, not {count}")
    return {f"node{i}": f"10.200.0.{10 + i}" for i in range(1, count + 1)}


# UCTR_SLURM_NODES=N widens the test cluster (tests written for two nodes ask for node1/node2)
NODES = make_nodes(int(os.environ.get("UCTR_SLURM_NODES", "2")))
NODE_CPUS = 4  # more than the machine has: SlurmdParameters=config_overrides
RUN_DIR = "/run/uctr"  # node-local runtime dir of uctr (readiness records)
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}


class ClusterError(RuntimeError):
    pass


def _run(argv: Sequence[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    result = subprocess.run(list(argv), **kwargs)
    if check and result.returncode != 0:
        raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                           f"{result.stdout}{result.stderr}")
    return result


def _alive(pid: Optional[int]) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not a daemon
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class BridgeRegistry(Registry):
    """The harness registry, bound to the bridge address the nodes can reach."""

    def __init__(self, workdir: Path, bind_host: str = BRIDGE_ADDR):
        super().__init__(workdir)
        self.bind_host = bind_host

    @property
    def host(self) -> str:
        return f"{self.bind_host}:{self.port}"


@dataclass
class JobResult:
    job_id: str
    state: str  # e.g. COMPLETED, FAILED; "HELD" for a requeued-held launch failure
    exit_code: str  # "rc:signal" as scontrol prints it
    reason: str
    output: str  # the job's StdOut file (stdout and stderr, sbatch's default)
    record: Dict[str, str]


class SlurmCluster:
    """Bring-up, tear-down and the calls tests use (submit, srun, wait, node_state)."""

    def __init__(self, repo: Path, python: str, state: Path = STATE,
                 nodes: Optional[Dict[str, str]] = None):
        self.repo = Path(repo)
        self.python = python
        self.state = Path(state)
        self.nodes = dict(nodes or NODES)
        self.registry: Optional[BridgeRegistry] = None
        self.bringup_seconds: Optional[float] = None
        self.reused = False

    # -- paths ---------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.state.joinpath(*parts)

    @property
    def prefix(self) -> Path:
        """Where `uctr slurm install` puts the plugin, hooks and uctr-exec."""
        return self.path("install")

    @property
    def policy_file(self) -> Path:
        return self.path("etc", "policy.yaml")

    @property
    def registry_host(self) -> str:
        return self.registry.host if self.registry else ""

    def node_log(self, node: str, kind: str = "prolog") -> Path:
        """The prolog/epilog stderr log of NODE (one file per node, appended)."""
        return self.path("log", f"uctr-{kind}.{node}.log")

    def work_dir(self, name: str, user: str = TEST_USER) -> Path:
        """A fresh directory on the shared (non-/tmp) path, owned by USER."""
        directory = self.path("work", name)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
        return directory

    # -- bring-up ------------------------------------------------------------------------
    def up(self, policy_text: str) -> "SlurmCluster":
        start = time.monotonic()
        for sub in ("etc", "lib", "log", "run", "spool", "tmpfs", "ctld"):
            self.path(sub).mkdir(parents=True, exist_ok=True)
        work = self.path("work")
        work.mkdir(exist_ok=True)
        work.chmod(0o1777)
        self.state.chmod(0o755)
        self._write_policy(policy_text)
        self._install_code()
        config = self._config_files()
        # a changed config or harness restarts everything; a changed plugin needs no restart
        # (slurmstepd and the clients load it afresh), nor does the policy (read per prolog)
        harness = Path(__file__).read_bytes()
        signature = hashlib.sha256(repr(sorted(config.items())).encode() + harness).hexdigest()
        self.reused = self._running_with(signature)
        if not self.reused:
            self.down(keep_munge=True, keep_bridge=True)
            # slurmctld -c starts job ids afresh: old hook logs would name the same jobs
            for old in self.path("log").glob("uctr-*.log"):
                old.unlink()
            for path, text in config.items():
                self._write(Path(path), text, 0o755 if text.startswith("#!") else 0o644)
            self._start_munge()
            self._setup_network()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self.path("run", "signature").write_text(signature)
        self._wait_nodes_idle()
        self.bringup_seconds = time.monotonic() - start
        return self

    def _running_with(self, signature: str) -> bool:
        try:
            if self.path("run", "signature").read_text() != signature:
                return False
        except OSError:
            return False
        pids = [_read_pid(self.path("run", "slurmctld.pid"))]
        pids += [_read_pid(self.path("run", f"slurmd.{n}.pid")) for n in self.nodes]
        if not all(_alive(p) for p in pids) or not self._munge_ok():
            return False
        return _run(["scontrol", "ping"], check=False, timeout=10).returncode == 0

    def _install_code(self) -> None:
        """A world-readable copy of the source tree (the repo may not be readable by the job
        user, as whom the prolog's child runs), installed with `uctr slurm install` as an
        admin would: plugin, hooks, uctr-exec and the plugstack.conf line."""
        self._copy_tree()
        install = [self.python, "-m", "uctr_batch", "slurm", "install", "--prefix",
                   str(self.prefix), "--policy", str(self.policy_file), "--log-dir",
                   str(self.path("log"))]
        env = {"PATH": BASE_PATH, "PYTHONPATH": str(self.path("lib", "python")),
               "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
        _run(install, env=env, cwd="/")

    def _copy_tree(self) -> None:
        lib = self.path("lib", "python")
        staging = self.path("lib", ".python.new")
        shutil.rmtree(staging, ignore_errors=True)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        shutil.copytree(self.repo / "uctr_batch", staging / "uctr_batch", ignore=ignore)
        for tree in ("hooks", "spank", "launchers", "site-config"):
            if (self.repo / tree).is_dir():
                shutil.copytree(self.repo / tree, staging / tree,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.o", "*.so"))
        for root, dirs, files in os.walk(staging):
            os.chmod(root, 0o755)
            for name in files:
                path = os.path.join(root, name)
                os.chmod(path, 0o755 if os.access(path, os.X_OK) else 0o644)
        old = self.path("lib", ".python.old")
        shutil.rmtree(old, ignore_errors=True)
        if lib.exists():
            os.rename(lib, old)
        os.rename(staging, lib)
        shutil.rmtree(old, ignore_errors=True)

    def _write_policy(self, text: str) -> None:
        self._write(self.policy_file, text)

    @staticmethod
    def _write(path: Path, text: str, mode: int = 0o644) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.new")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)

    def _config_files(self) -> Dict[str, str]:
        # the line `uctr slurm install` wrote, as the admin guide says to use it
        plugstack = (self.prefix / "share" / "uctr" / "slurm" / "plugstack.conf").read_text()
        hosts = "127.0.0.1 localhost\n" + f"{BRIDGE_ADDR} {os.uname().nodename} ctld\n" + \
            "".join(f"{addr} {name}\n" for name, addr in self.nodes.items())
        return {
            str(SLURM_CONF): self._slurm_conf(),
            str(self.path("etc", "plugstack.conf")): plugstack,
            str(self.path("etc", "hosts")): hosts,
        }

    def _slurm_conf(self) -> str:
        s = self.state
        node_names = sorted(self.nodes)
        lines = [
            "# written by tests/harness/slurm.py; rewritten on every bring-up",
            "ClusterName=uctrtest",
            f"SlurmctldHost=localhost({BRIDGE_ADDR})",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerParameters=batch_sched_delay=0",
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=2",
            "InactiveLimit=0",
            "PrologFlags=Alloc",
            "PrologEpilogTimeout=600",
            f"Prolog={self.prefix}/libexec/uctr/slurm-prolog",
            f"Epilog={self.prefix}/libexec/uctr/slurm-epilog",
            f"PlugStackConfig={s}/etc/plugstack.conf",
            f"StateSaveLocation={s}/ctld",
            f"SlurmdSpoolDir={s}/spool/%n",
            f"TmpFS={s}/tmpfs/%n",
            f"SlurmctldPidFile={s}/run/slurmctld.pid",
            f"SlurmdPidFile={s}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={s}/log/slurmctld.log",
            f"SlurmdLogFile={s}/log/slurmd.%n.log",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
        ]
        for name in node_names:
            lines.append(f"NodeName={name} NodeHostname={name} NodeAddr={self.nodes[name]} "
                         f"CPUs={NODE_CPUS} RealMemory=2000 State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(node_names)} Default=YES "
                     "MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    # -- daemons -------------------------------------------------------------------------
    @staticmethod
    def _munge_ok() -> bool:
        try:
            cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=5)
            if cred.returncode != 0:
                return False
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True,
                                  timeout=5).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            return False

    def _start_munge(self) -> None:
        if self._munge_ok():
            return
        run = Path("/run/munge")
        run.mkdir(exist_ok=True)
        shutil.chown(run, "munge", "munge")
        _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"])
        _wait_for(self._munge_ok, 10, "munged")

    def _netns(self, node: str) -> str:
        return f"uctr-{node}"

    def _veth(self, node: str) -> str:
        return f"uctrve-{node}"[:15]

    @staticmethod
    def ensure_bridge() -> None:
        """The bridge and its address (the controller's and the registry's) exist."""
        if _run(["ip", "link", "show", BRIDGE], check=False).returncode != 0:
            _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        if f" {BRIDGE_ADDR}/24 " not in _run(["ip", "-o", "addr", "show", "dev", BRIDGE]).stdout:
            _run(["ip", "addr", "add", f"{BRIDGE_ADDR}/24", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])

    def _setup_network(self) -> None:
        self.ensure_bridge()
        for node, addr in self.nodes.items():
            ns, veth = self._netns(node), self._veth(node)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            _run(["ip", "link", "set", veth, "master", BRIDGE, "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0"])
            _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "route", "add", "default", "via", BRIDGE_ADDR])

    def _start_slurmctld(self) -> None:
        _run(["slurmctld", "-c", "-f", str(SLURM_CONF)])
        _wait_for(lambda: _run(["scontrol", "ping"], check=False, timeout=10).returncode == 0,
                  20, "slurmctld")

    def _start_slurmd(self, node: str) -> None:
        """slurmd in the node's netns plus fresh mount+UTS namespaces with private tmpfs and
        its own boot id."""
        Path(RUN_DIR).mkdir(parents=True, exist_ok=True)  # mount point for the node's own
        self.path("spool", node).mkdir(parents=True, exist_ok=True)
        self.path("tmpfs", node).mkdir(parents=True, exist_ok=True)
        sysfs = self.path("sysfs", node)  # mount point, moved onto /sys once filled
        sysfs.mkdir(parents=True, exist_ok=True)
        boot_id = self.path("run", f"boot_id.{node}")
        self._write(boot_id, f"{uuid.uuid4()}\n")
        script = " && ".join([
            f"hostname {node}",
            # Both nodes share one kernel, so one boot id: UCX (MPICH's ch4:ucx) takes that
            # for "same machine" and tries shared memory between ranks of different nodes,
            # which fails between their containers' user namespaces. Real nodes differ.
            f"mount --bind {boot_id} /proc/sys/kernel/random/boot_id",
            "mount -t tmpfs -o mode=1777,size=4g tmpfs /tmp",
            "mount -t tmpfs -o mode=1777 tmpfs /dev/shm",
            f"mount -t tmpfs -o mode=0755,size=64m tmpfs {RUN_DIR}",
            f"mount --bind {self.path('etc', 'hosts')} /etc/hosts",
            # A sysfs mounted in the node's netns shows that netns's devices: MPICH/UCX pick
            # their device from /sys/class/net, and the outer one names the host's NICs.
            # The cgroup mounts under /sys go along (slurmd and crun need them); the outer
            # /sys is detached, not just covered.
            f"mount -t sysfs sysfs {sysfs}",
            f"mount --rbind /sys/fs/cgroup {sysfs}/fs/cgroup",
            "umount -l /sys",
            f"mount --move {sysfs} /sys",
            f"exec slurmd -N {node} -f {SLURM_CONF}",
        ])
        _run(["nsenter", f"--net=/run/netns/{self._netns(node)}", "unshare", "--mount", "--uts",
              "--propagation", "private", "sh", "-c", script])

    def _wait_nodes_idle(self, timeout: float = 30) -> None:
        names = ",".join(sorted(self.nodes))

        def ready() -> bool:
            states = {n: self.node_state(n) for n in self.nodes}
            if any("DRAIN" in s or s.startswith("DOWN") for s in states.values()):
                _run(["scontrol", "update", f"nodename={names}", "state=resume"], check=False)
                return False
            return all(s.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED") and "NOT_RESPONDING" not in s
                       for s in states.values())
        _wait_for(ready, timeout, f"nodes {names} to become idle", interval=0.1)

    # -- tear-down -----------------------------------------------------------------------
    def down(self, keep_munge: bool = True, keep_bridge: bool = False) -> None:
        """Stop what this harness started (pid files and the nodes' namespaces), remove the
        namespaces, veths and (unless keep_bridge) the bridge. munged is kept unless
        keep_munge is False."""
        pids: List[int] = []
        nodes = self._known_nodes()
        for node in nodes:
            pid = _read_pid(self.path("run", f"slurmd.{node}.pid"))
            if pid:
                pids.append(pid)
            ns = self._netns(node)
            if Path(f"/run/netns/{ns}").exists():
                out = _run(["ip", "netns", "pids", ns], check=False).stdout
                pids += [int(p) for p in out.split()]
        ctld = _read_pid(self.path("run", "slurmctld.pid"))
        if ctld and self._is_slurm_daemon(ctld):
            pids.append(ctld)
        self._terminate(pids)
        for node in nodes:
            _run(["ip", "link", "del", self._veth(node)], check=False)
            _run(["ip", "netns", "del", self._netns(node)], check=False)
        if not keep_bridge:
            _run(["ip", "link", "del", BRIDGE], check=False)
        for pidfile in self.path("run").glob("*.pid") if self.path("run").is_dir() else []:
            pidfile.unlink()
        sig = self.path("run", "signature")
        if sig.exists():
            sig.unlink()
        if not keep_munge:
            munged = _read_pid(Path("/run/munge/munged.pid"))
            if munged:
                self._terminate([munged])

    def _known_nodes(self) -> List[str]:
        """This cluster's nodes plus those an earlier bring-up of another size left (their
        pid files): a 2-node session after a 32-node benchmark stops all 32."""
        names = set(self.nodes)
        run = self.path("run")
        if run.is_dir():
            names.update(p.name[len("slurmd."):-len(".pid")] for p in run.glob("slurmd.*.pid"))
        return sorted(names)

    @staticmethod
    def _is_slurm_daemon(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip().startswith("slurm")
        except OSError:
            return False

    @staticmethod
    def _terminate(pids: List[int], timeout: float = 10) -> None:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    # -- registry ------------------------------------------------------------------------
    def start_registry(self) -> BridgeRegistry:
        """docker-registry on the bridge address; its storage persists between sessions,
        its access log grows (count GETs as differences)."""
        self.ensure_bridge()
        self.registry = BridgeRegistry(self.path("registry")).start()
        return self.registry

    def stop_registry(self) -> None:
        if self.registry is not None:
            self.registry.stop()

    # -- what tests call -----------------------------------------------------------------
    def user_env(self, user: str = TEST_USER, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
        entry = pwd.getpwnam(user)
        env = {"PATH": BASE_PATH, "HOME": entry.pw_dir, "USER": user, "LOGNAME": user,
               "LANG": "C.UTF-8", "SLURM_CONF": str(SLURM_CONF)}
        env.update(extra or {})
        return env

    def _as_user(self, user: str, argv: Sequence[str], env: Optional[Dict[str, str]]) -> List[str]:
        full = self.user_env(user, env)
        return ["runuser", "-u", user, "--", "/usr/bin/env", "-i",
                *[f"{k}={v}" for k, v in full.items()], *argv]

    def submit(self, script: str, user: str = TEST_USER, args: Sequence[str] = (),
               name: str = "job", env: Optional[Dict[str, str]] = None) -> str:
        """sbatch SCRIPT as USER from a fresh shared work dir; returns the job id."""
        work = self.work_dir(name, user)
        path = work / "job.sh"
        path.write_text(script)
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        argv = ["sbatch", "--parsable", "-D", str(work), "-o", str(work / "slurm-%j.out"),
                *args, str(path)]
        result = _run(self._as_user(user, argv, env), check=False, cwd=str(work), timeout=60)
        if result.returncode != 0:
            raise ClusterError(f"sbatch failed ({result.returncode}):\n{result.stderr}")
        return result.stdout.strip().split(";")[0]

    def srun(self, args: Sequence[str], user: str = TEST_USER, timeout: float = 300,
             env: Optional[Dict[str, str]] = None, name: str = "srun") -> subprocess.CompletedProcess:
        work = self.work_dir(name, user)
        return _run(self._as_user(user, ["srun", *args], env), check=False, cwd=str(work),
                    timeout=timeout)

    def salloc(self, args: Sequence[str], command: Sequence[str], user: str = TEST_USER,
               timeout: float = 300, name: str = "salloc") -> subprocess.CompletedProcess:
        """salloc ARGS COMMAND as USER from a fresh shared work dir (COMMAND runs there,
        inside the allocation, on the submit host: it starts the job's steps with srun)."""
        work = self.work_dir(name, user)
        return _run(self._as_user(user, ["salloc", *args, *command], None), check=False,
                    cwd=str(work), timeout=timeout)

    def srun_background(self, args: Sequence[str], output: Path, user: str = TEST_USER,
                        name: str = "srun") -> subprocess.Popen:
        """Start srun as USER without waiting; its stdout and stderr go to OUTPUT (a file
        the test can read while the step runs). The job is named NAME (for scancel -n)."""
        work = self.work_dir(name, user)
        with open(output, "w") as sink:
            return subprocess.Popen(self._as_user(user, ["srun", "-J", name, *args], None),
                                    cwd=str(work), stdout=sink, stderr=subprocess.STDOUT,
                                    text=True)

    def cancel(self, name: str, user: str = TEST_USER) -> None:
        _run(["scancel", "-u", user, "-n", name], check=False, timeout=30)

    def job_record(self, job_id: str) -> Dict[str, str]:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> JobResult:
        """Wait until the job has finished (epilogs included) or is held after a failed launch."""
        def finished():
            record = self.job_record(job_id)
            state = record.get("JobState", "")
            if state in TERMINAL_STATES:
                return record
            if state == "PENDING" and "held" in record.get("Reason", "").lower():
                return dict(record, JobState="HELD")
            return None
        record = _wait_for(finished, timeout, f"job {job_id}", interval=0.1)
        out_path = record.get("StdOut", "")
        try:
            output = Path(out_path).read_text(errors="replace") if out_path else ""
        except OSError:
            output = ""
        return JobResult(job_id, record["JobState"], record.get("ExitCode", ""),
                         record.get("Reason", ""), output, record)

    def node_state(self, name: str) -> str:
        out = _run(["scontrol", "show", "node", "-o", name], check=False).stdout
        match = re.search(r"\bState=(\S+)", out)
        return match.group(1) if match else "UNKNOWN"

    def unavailable_nodes(self, nodes: Optional[Sequence[str]] = None) -> Dict[str, str]:
        """{node: state} of the NODES (default: all) that Slurm has drained or downed: no
        user's job may ever cause one."""
        states = {n: self.node_state(n) for n in (nodes or self.nodes)}
        return {n: s for n, s in states.items() if "DRAIN" in s or "DOWN" in s}

    def node_exec(self, node: str, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run ARGV as root inside NODE's namespaces (to look at its /tmp, /run/uctr, mounts)."""
        pid = _read_pid(self.path("run", f"slurmd.{node}.pid"))
        if not _alive(pid):
            raise ClusterError(f"slurmd of {node} is not running")
        return _run(["nsenter", "-t", str(pid), "--net", "--mount", "--uts", *argv],
                    check=False, **kwargs)

    def wait_running(self, job_id: str, timeout: float = 120) -> Dict[str, str]:
        def running():
            record = self.job_record(job_id)
            state = record.get("JobState", "")
            if state in TERMINAL_STATES:
                raise ClusterError(f"job {job_id} ended ({state}) before it was seen running")
            return record if state == "RUNNING" else None
        return _wait_for(running, timeout, f"job {job_id} to run", interval=0.1)

    def hook_lines(self, kind: str, node: str, job_id: str) -> List[str]:
        """Lines the prolog/epilog logged on NODE about JOB_ID."""
        try:
            text = self.node_log(node, kind).read_text(errors="replace")
        except OSError:
            return []
        marker = f"job {job_id} on {node}:"
        return [line for line in text.splitlines() if marker in line]

    def read_node_file(self, node: str, path: str) -> Optional[str]:
        """PATH as seen inside NODE's mount namespace, or None if it does not exist."""
        result = self.node_exec(node, ["cat", path])
        return result.stdout if result.returncode == 0 else None

    def list_node_dir(self, node: str, path: str) -> List[str]:
        result = self.node_exec(node, ["ls", "-A", path])
        return result.stdout.split() if result.returncode == 0 else []

    def reset_user_storage(self, user: str = TEST_USER) -> None:
        """Forget USER's shared cache and every node's node-local dir (cold start)."""
        entry = pwd.getpwnam(user)
        shutil.rmtree(Path(entry.pw_dir, ".cache", "uctr"), ignore_errors=True)
        for node in self.nodes:
            self.node_exec(node, ["rm", "-rf", f"/tmp/uctr-{entry.pw_uid}"])

    def mpi_plugins(self) -> List[str]:
        """The MPI plugin types this Slurm has (`srun --mpi=list`): Debian's 26.05 has no
        pmix, so tests and the demo pick what the release offers."""
        result = _run(["srun", "--mpi=list"], check=False, timeout=30)
        text = result.stdout + result.stderr
        if "MPI plugin types are" not in text:
            raise ClusterError(f"srun --mpi=list gave no plugin list ({result.returncode}):\n{text}")
        listing = text.split("MPI plugin types are", 1)[1]
        return sorted(set(re.findall(r"^\s+(?:srun:\s+)?([\w-]+)\s*$", listing, re.M)))

    def resume_nodes(self) -> None:
        _run(["scontrol", "update", f"nodename={','.join(sorted(self.nodes))}", "state=resume"],
             check=False)


# -- the pytest session's cluster -------------------------------------------------------------
# F1 is deliberately not selectable by users: the `--container-mode` refusal test needs a mode
# that exists but is not allowed.
USER_MODES = ("N1", "R1", "P1", "P2", "S1")
DEFAULT_QUOTA = "3G"


def cluster_policy(registry_host: str, local_quota: str = DEFAULT_QUOTA,
                   user_modes: Sequence[str] = USER_MODES, local_dir: Optional[str] = None) -> str:
    """The site policy the cluster's prolog reads (YAML; rewritten by set_policy)."""
    storage = [f"    local_dir: {local_dir}"] if local_dir else []
    return "\n".join([
        "version: 1",
        "defaults:",
        f"  user_modes: [{', '.join(user_modes)}]",
        "  registries:",
        f'    insecure: ["{registry_host}"]',
        "  storage:",
        f"    local_quota: {local_quota}",
        "    stage_timeout: 300",
        *storage,
        "",
    ])


def missing_prerequisites() -> Optional[str]:
    if os.geteuid() != 0:
        return "the Slurm cluster needs root (namespaces, munge, slurmd)"
    for tool in ("slurmctld", "slurmd", "munged", "nsenter", "unshare", "ip", "docker-registry",
                 "skopeo", "make", "cc"):
        if shutil.which(tool) is None and not Path("/usr/sbin", tool).exists():
            return f"{tool} is not installed (run scripts/install.sh)"
    if not Path("/usr/include/slurm/spank.h").exists():
        return "spank.h is missing (apt-get install libslurm-dev)"
    return None


SESSION_WAIT = 1800.0  # seconds a second test session waits for the cluster


class SessionCluster(SlurmCluster):
    """The cluster plus the registry on the bridge and the test images pushed to it.

    One test session at a time: the cluster, its policy and the test user's storage are
    global, so start() waits for an exclusive lock that stop() releases (a concurrent
    session would otherwise restart or stop the cluster under the first one's jobs)."""

    def __init__(self, repo: Path, python: str, images, **kwargs):
        super().__init__(repo, python, **kwargs)
        self.images = images
        self._pushed: Dict[str, str] = {}
        self._session_lock = None

    def start(self, wait: float = SESSION_WAIT) -> "SessionCluster":
        self._lock_session(wait)
        try:
            registry = self.start_registry()
            self.up(cluster_policy(registry.host))
        except BaseException:
            self.stop(keep_running=True)
            raise
        return self

    def stop(self, keep_running: bool = False) -> None:
        try:
            self.stop_registry()
            if not keep_running:
                self.down()
        finally:
            if self._session_lock is not None:
                self._session_lock.close()  # releases the flock
                self._session_lock = None

    def _lock_session(self, wait: float) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        lock = open(self.path("session.lock"), "a")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    lock.close()
                    raise ClusterError(f"another test session has held the Slurm cluster for "
                                       f"{wait:.0f} s ({self.path('session.lock')})")
                time.sleep(0.5)
        self._session_lock = lock

    @contextlib.contextmanager
    def plugstack_args(self, *args: str):
        """Extra plugstack.conf arguments (e.g. batch_in_container=1) for the steps started
        inside the block: slurmstepd and the clients read plugstack.conf afresh each time."""
        path = self.path("etc", "plugstack.conf")
        original = path.read_text()
        self._write(path, original.rstrip("\n") + " " + " ".join(args) + "\n")
        try:
            yield
        finally:
            self._write(path, original)

    def set_policy(self, **kwargs) -> None:
        """Rewrite the policy (the next prolog reads it; no restart needed)."""
        self._write_policy(cluster_policy(self.registry_host, **kwargs))

    def image_ref(self, name: str, tag: Optional[str] = None) -> str:
        """NAME pushed to the bridge registry (once per session and tag)."""
        from .images import push

        key = f"{name}:{tag or ''}"
        if key not in self._pushed:
            self._pushed[key] = push(self.images[name], self.registry, tag=tag)
        return self._pushed[key]
