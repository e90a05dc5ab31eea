"""Running uctr-exec like a launcher would: the launchers/uctr-exec shim from the checkout,
as the unprivileged test user when the suite can switch to it, on a "node" of its own (a
private cache, node-local dir and home per test)."""

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from tests.harness import users

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "launchers" / "uctr-exec"
PYTHON = sys.executable  # the venv: third-party packages for the cold paths


class Node:
    """One fake node for uctr-exec: directories owned by `user` (None: this process's)."""

    def __init__(self, root: Path, user: Optional[str] = None,
                 insecure_registries: str = ""):
        self.user = user
        self.base = Path(root) / f"node-{uuid.uuid4().hex[:8]}"
        self.base.mkdir(parents=True)
        os.chmod(self.base, 0o755)
        for sub in ("home", "work"):
            (self.base / sub).mkdir()
        if user:
            users.chown_tree(self.base, user)
        self.home, self.work = self.base / "home", self.base / "work"
        self.cache, self.local = self.base / "cache", self.base / "local"
        self.insecure = insecure_registries

    def env(self, extra: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, str]:
        env = {
            "PATH": users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(self.home),
            "USER": self.user or "root", "UCTR_PYTHON": PYTHON,
            "UCTR_CACHE": str(self.cache), "UCTR_LOCAL_DIR": str(self.local),
            "UCTR_INSECURE_REGISTRIES": self.insecure, "UCTR_POLICY": str(self.base / "no-policy"),
        }
        if not self.user:  # our own checkout: keep its bytecode out of the way of others
            env["PYTHONDONTWRITEBYTECODE"] = "1"
        for key, value in (extra or {}).items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        if env["UCTR_POLICY"] == str(self.base / "no-policy"):
            env.pop("UCTR_POLICY")  # the default path: /etc/uctr/policy.yaml (absent: built-in)
        return env

    def argv(self, args, env: Dict[str, str], shim: Path = SHIM) -> List[str]:
        command = [str(shim), *map(str, args)]
        if self.user:
            return users.as_user_argv(self.user, command, env)
        return command

    def run(self, *args, env=None, timeout: float = 180, **kwargs) -> subprocess.CompletedProcess:
        full = self.env(env)
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", str(self.work))
        return subprocess.run(self.argv(args, full), env=full, timeout=timeout, **kwargs)

    def popen(self, *args, env=None, **kwargs) -> subprocess.Popen:
        full = self.env(env)
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        kwargs.setdefault("cwd", str(self.work))
        return subprocess.Popen(self.argv(args, full), env=full, **kwargs)

    def bundles(self) -> List[str]:
        try:
            return sorted(n for n in os.listdir(self.local / "bundles") if not n.startswith("."))
        except FileNotFoundError:
            return []


def unprivileged_user() -> Optional[str]:
    return users.TEST_USER if users.can_switch_user() else None


def step_env(job: str, step: str, local_size: int, rank: int = 0) -> Dict[str, str]:
    """The variables of one rank of a Slurm job step on one node (srun sets more)."""
    return {"SLURM_JOB_ID": job, "SLURM_STEP_ID": step, "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
            "SLURM_STEP_NUM_TASKS": str(local_size), "SLURM_STEP_TASKS_PER_NODE": str(local_size)}


def ns_inodes(text: str) -> List[str]:
    """Lines 'user mnt' printed by NS_PROBE, in order."""
    return [line.strip() for line in text.splitlines() if line.strip().startswith("ns ")]


# A payload printing the container's user and mount namespace inodes on one line.
NS_PROBE = 'echo "ns $(stat -L -c %i /proc/self/ns/user) $(stat -L -c %i /proc/self/ns/mnt)"'


def processes_in_mount_ns(inode: str) -> List[int]:
    """Pids of processes whose mount namespace has this inode."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if str(os.stat(f"/proc/{name}/ns/mnt").st_ino) == inode:
                found.append(int(name))
        except OSError:
            continue
    return found
