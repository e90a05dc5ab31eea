"""Running the project as the unprivileged test user (root switches with runuser)."""

import os
import pwd
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional, Sequence

TEST_USER = "uctrtest"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def can_switch_user(user: str = TEST_USER) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return os.geteuid() == 0 and shutil.which("runuser") is not None


def chown_tree(path: Path, user: str) -> None:
    entry = pwd.getpwnam(user)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def as_user_argv(user: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> List[str]:
    """argv run as USER; with ENV, exactly that environment (runuser would rewrite HOME etc.)."""
    prefix = ["runuser", "-u", user, "--"]
    if env is None:
        return prefix + list(argv)
    return prefix + ["/usr/bin/env", "-i"] + [f"{k}={v}" for k, v in env.items()] + list(argv)


def run_as(user: str, argv: Sequence[str], env: Optional[Dict[str, str]] = None,
           **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    return subprocess.run(as_user_argv(user, argv, env), **kwargs)


def copy_package(src: Path, dest_parent: Path) -> Path:
    """A world-readable copy of the package SRC under DEST_PARENT (the repo may sit in /root)."""
    dest_parent.mkdir(parents=True, exist_ok=True)
    dest = dest_parent / src.name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for root, dirs, files in os.walk(dest_parent):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)
    return dest


def can_read(user: str, path: Path) -> bool:
    """Whether USER can reach and read PATH (asked as USER: permissions of every parent count)."""
    return subprocess.run(["runuser", "-u", user, "--", "test", "-r", str(path)],
                          stdin=subprocess.DEVNULL, capture_output=True).returncode == 0


def login_path() -> str:
    """The PATH of a new login: BASE_PATH, after the bin directory scripts/install.sh linked
    `uctr` and `uctr-exec` into when told another one (UCTR_BIN_DIR)."""
    return ":".join(filter(None, (os.environ.get("UCTR_BIN_DIR"), BASE_PATH)))
