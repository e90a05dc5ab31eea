"""scripts/demo: the main job on an embedded default, end to end on this machine.

Starts a local registry, builds the busybox demo image offline, pushes it with skopeo, then
runs `uctr pull` and `uctr create` (as the unprivileged test user when started as root) and
lists the root filesystem it made. Everything lives under one temporary directory, removed
at the end, and the registry is stopped however the demo ends.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from . import users
from .images import ImageSet, push
from .registry import Registry

REPO = Path(__file__).resolve().parents[2]


def say(message: str) -> None:
    sys.stderr.write(f"==> {message}\n")
    sys.stderr.flush()


class DemoUser:
    """Runs uctr as USER (None: the current user) with demo-local cache and rootfs dirs."""

    def __init__(self, workdir: Path, user: Optional[str], insecure: str):
        self.user = user
        home = workdir / "home"
        home.mkdir()
        pythonpath = REPO
        if user:  # the checkout may sit where USER cannot read it (/root/...)
            pythonpath = users.copy_package(REPO / "uctr_batch", workdir / "src").parent
        self.env: Dict[str, str] = {
            "PATH": users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(home),
            "PYTHONPATH": str(pythonpath), "PYTHONDONTWRITEBYTECODE": "1",
            # under HOME, which USER owns: the demo user creates them as a user would
            "UCTR_CACHE": str(home / "cache"), "UCTR_LOCAL_DIR": str(home / "local"),
            "UCTR_INSECURE_REGISTRIES": insecure,
        }
        if user:
            self.env.update(USER=user, LOGNAME=user)
            users.chown_tree(home, user)
        self.cwd = home

    def uctr(self, *args: str) -> subprocess.CompletedProcess:
        argv: List[str] = [sys.executable, "-m", "uctr_batch", *args]
        if self.user:
            argv = users.as_user_argv(self.user, argv, self.env)
        say("uctr " + " ".join(args))
        result = subprocess.run(argv, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE, text=True)
        if result.returncode != 0:
            raise SystemExit(f"demo failed: uctr {' '.join(args)} exited {result.returncode}")
        return result


def run_demo(workdir: Path) -> None:
    workdir.chmod(0o755)  # the unprivileged user reaches its own subdirectories
    say("starting a local registry (docker-registry)")
    with Registry(workdir / "registry") as registry:
        say(f"registry at {registry.url}; building the busybox image offline")
        image = ImageSet(workdir / "images")["busybox"]
        ref = push(image, registry, repo="demo/busybox", tag="latest")
        say(f"pushed {ref} with skopeo")
        user = users.TEST_USER if users.can_switch_user() else None
        if user:
            say(f"running uctr as the unprivileged user {user}")
        demo = DemoUser(workdir, user, registry.host)
        demo.uctr("pull", ref)
        rootfs = demo.uctr("create", ref).stdout.strip().splitlines()[-1]
        say(f"root filesystem: {rootfs}")
        sys.stdout.write(f"{rootfs}\n")
        sys.stdout.flush()
        subprocess.run(["ls", "-l", rootfs], check=True)
    say("registry stopped; demo done")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="uctr-demo-"))
    try:
        run_demo(workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
