"""No mode writes or mounts outside the rootfs, whatever links the image has.

A corpus of hostile root filesystems (/dev, /proc, /sys, /tmp, /etc, /etc/passwd, bind
destinations and the working directory as absolute links, ../ links, chains, links through a
parent, links to a file, dangling links, loops) is run in every mode available here (N1, R1
with crun and with runc, P1, P2, F1) as the unprivileged test user. Every link points at a
canary directory on the host that the test user owns and could write, so a runtime that
followed a link out of the rootfs would change it. Asserted per run:
  * the canary is exactly as before (names, types, modes, sizes, contents, link targets);
  * the run works (exit 0, its output), or fails cleanly: `error:` and `hint:` lines, a
    documented exit code, no traceback.
uctr-exec gets the same check with a hostile OCI image (its default binds: /etc/hosts,
/etc/resolv.conf, /tmp), and R1 under uctr-exec / `uctr run -v /tmp` with the node-local
directory under /tmp (issue 10, class 2: crun failed with "creating symlink for /dev/ptmx").
"""

import hashlib
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import PYTHON
from tests.harness import users
from tests.harness.images import BUSYBOX_APPLETS, BUSYBOX_BINARY, readable_layout
from tests.harness.oci import ImageConfig, LayerBuilder
from tests.integration.exec_helpers import Node
from tests.integration.test_mode_conformance import missing_binary

pytestmark = pytest.mark.timeout(900)

USER = users.TEST_USER
DOCUMENTED_EXIT = {1, 2, 3, 4, 5, 126, 127}  # README "Exit codes" (and the payload's 126/127)
POLICY = """\
version: 1
defaults:
  modes: [N1, R1, P1, P2, F1]
  user_modes: [N1, R1, P1, P2, F1]
"""
HOST_PROGRAMS = ("sh", "true", "echo", "cat", "ls", "id")
# (mode id, --mode, extra options, PATH for the host side): runc runs only as --root rootless
RUNTIMES = [("N1", "N1", (), None), ("R1-crun", "R1", (), None),
            ("R1-runc", "R1", ("--root",), "/usr/sbin:/sbin"), ("P1", "P1", (), None),
            ("P2", "P2", (), None), ("F1", "F1", (), None)]


def runtime_params():
    out = []
    for ident, mode, opts, path in RUNTIMES:
        why = missing_binary(mode)
        if ident == "R1-crun" and not shutil.which("crun"):
            why = "crun not installed"
        if ident == "R1-runc" and not (shutil.which("runc") or os.path.exists("/usr/sbin/runc")):
            why = "runc not installed"
        if ident == "R1-runc" and os.path.exists("/usr/sbin/crun"):
            why = "crun is in /usr/sbin: cannot hide it from the runc run"
        marks = [pytest.mark.skip(reason=f"{ident}: {why}")] if why else []
        out.append(pytest.param((mode, opts, path), id=ident, marks=marks))
    return out


# --- the corpus ------------------------------------------------------------------------------
# Each case: (name, links {container path: target}, options, must_work). "@" in a target or an
# option stands for the canary's absolute path, "@@" for a ../ path from the rootfs to it;
# a key "+PATH" makes PATH a directory inside the rootfs.
# F1 refuses (exit 3, the ladder's next mode) an image whose links lead /etc/passwd out:
# libfakechroot lets the kernel follow links in parents on the host (docs/modes.md).
REFUSED = {("etc-absolute", "F1"), ("etc-relative", "F1"), ("bind-parent-link", "F1")}

def chain(path: str, n: int, end: str):
    """path -> /c1 -> /c2 ... -> /cN -> end."""
    links = {path: "/c1"}
    for i in range(1, n):
        links[f"/c{i}"] = f"/c{i + 1}"
    links[f"/c{n}"] = end
    return links


CASES = [
    ("dev-absolute", {"/dev": "@"}, (), True),
    # the link's target also exists inside the rootfs: crun 1.8 mounts its /dev tmpfs there
    # (resolved in the root) but then creates its nodes through "dev" as the host sees it
    ("dev-absolute-shadowed", {"/dev": "@", "+@": ""}, (), True),
    ("dev-relative-shadowed", {"/dev": "@@", "+@": ""}, (), True),
    ("dev-relative", {"/dev": "@@"}, (), True),
    ("dev-chain", chain("/dev", 5, "@"), (), True),
    ("dev-dangling", {"/dev": "@/no-such-dir"}, (), True),
    ("dev-to-host-file", {"/dev": "@/a-file"}, (), True),
    ("dev-to-image-file", {"/dev": "/bin/sh"}, (), True),
    ("dev-loop", {"/dev": "/dev2", "/dev2": "/dev"}, (), True),
    ("proc-sys-absolute", {"/proc": "@", "/sys": "@@"}, (), True),
    ("etc-absolute", {"/etc": "@"}, (), True),
    ("etc-relative", {"/etc": "@@"}, (), True),
    ("passwd-group-links", {"/etc/passwd": "@/a-file", "/etc/group": "@@/a-file"}, (), True),
    ("tmp-bind-through-link", {"/tmp": "@"}, ("-v", "SRC:/tmp"), True),
    ("hosts-bind-onto-link", {"/etc/hosts": "@/a-file"}, ("-v", "/etc/hosts:/etc/hosts:ro"), True),
    ("bind-parent-link", {"/mnt": "@@"}, ("-v", "SRC:/mnt/data"), True),
    ("bind-dangling", {"/data": "@/data"}, ("-v", "SRC:/data"), True),
    ("bind-deep-chain", chain("/data", 30, "@/deep"), ("-v", "SRC:/data"), True),
    ("workdir-link", {"/work": "@"}, ("-w", "/work/sub"), True),
    ("workdir-relative", {"/work": "../../../../../../../../../../@"}, ("-w", "/work/sub"), True),
    ("bind-too-many-links", chain("/data", 45, "@/deep"), ("-v", "SRC:/data"), False),
    ("bind-link-loop", {"/data": "/data"}, ("-v", "SRC:/data"), False),
    ("bind-dir-onto-file-link", {"/data": "/bin/sh"}, ("-v", "SRC:/data"), False),
]


def snapshot(top: Path):
    """Everything about a tree that a write, create, chmod or mount inside it would change."""
    state = {}
    for root, dirs, files in os.walk(top):
        for name in dirs + files + [""]:
            path = os.path.join(root, name) if name else root
            st = os.lstat(path)
            entry = (st.st_mode, st.st_size, st.st_uid, st.st_mtime_ns)
            if os.path.islink(path):
                entry += (os.readlink(path),)
            elif os.path.isfile(path):
                entry += (hashlib.sha256(Path(path).read_bytes()).hexdigest(),)
            state[os.path.relpath(path, top)] = entry
    with open("/proc/self/mountinfo") as f:  # nothing mounted under it in our namespace either
        state["mounts"] = [line for line in f if str(top) in line]
    return state


class Escape:
    def __init__(self, root: Path, package: Path, canaries: Path):
        self.root, self.package, self.canaries = root, package, canaries
        self.base = root / "base-rootfs"
        self.policy = root / "policy.yaml"

    def setup(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)
        self.policy.write_text(POLICY)
        self.policy.chmod(0o644)
        if not self.base.exists():
            build_host_rootfs(self.base)

    def env(self, home: Path, path=None):
        return {"PATH": path or users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(home),
                "USER": USER, "LOGNAME": USER, "PYTHONPATH": str(self.package),
                "PYTHONDONTWRITEBYTECODE": "1", "UCTR_POLICY": str(self.policy),
                "UCTR_CACHE": str(home / "cache"), "UCTR_LOCAL_DIR": str(home / "local"),
                "UCTR_CONFIG_DIR": str(home / "config")}

    def case_dir(self, name: str) -> Path:
        d = self.root / f"{name}-{uuid.uuid4().hex[:8]}"
        d.mkdir()
        return d


def build_host_rootfs(rootfs: Path) -> None:
    """A small glibc rootfs from the host's own programs: dynamic, so F1 can run it too."""
    libs = set()
    for name in HOST_PROGRAMS:
        program = shutil.which(name)
        out = subprocess.run(["ldd", program], capture_output=True, text=True).stdout
        for line in out.splitlines():
            parts = line.split()
            for p in parts:
                if p.startswith("/"):
                    libs.add(os.path.realpath(p) + "|" + p)
        target = rootfs / "bin" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(program), target)
    for entry in libs:
        real, named = entry.split("|")
        for dest in {named, os.path.join(os.path.dirname(named), os.path.basename(real))}:
            target = rootfs / dest.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(real, target)
    for d in ("dev", "proc", "sys", "tmp", "etc", "work"):
        (rootfs / d).mkdir(exist_ok=True)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc" / "group").write_text("root:x:0:\n")


def link_target(target: str, rootfs: Path, canary: Path) -> str:
    if target.startswith("@@"):
        up = "/".join([".."] * (len(rootfs.parts) + 2))
        return up + str(canary) + target[2:]
    return target.replace("@", str(canary).lstrip("/") if target.startswith("../") else str(canary))


def make_case(escape: Escape, links, options):
    """A fresh rootfs with the case's links, a canary, a bind source; (dirs..., options)."""
    d = escape.case_dir("case")
    rootfs, src, home = d / "rootfs", d / "src", d / "home"
    canary = escape.canaries / d.name  # outside /tmp: an image /tmp -> /tmp/... would loop
    shutil.copytree(escape.base, rootfs, symlinks=True, copy_function=os.link)
    for p in (canary, src, home):
        p.mkdir()
    (canary / "a-file").write_text("canary\n")
    (canary / "sub").mkdir()
    (src / "in").write_text("bound\n")
    for path, target in links.items():
        if path.startswith("+"):
            (rootfs / link_target(path[1:], rootfs, canary).lstrip("/")).mkdir(parents=True)
            continue
        host = rootfs / path.lstrip("/")
        if host.is_dir() and not host.is_symlink():
            shutil.rmtree(host)
        elif host.exists() or host.is_symlink():
            host.unlink()
        host.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(link_target(target, rootfs, canary), host)
    users.chown_tree(d, USER)
    users.chown_tree(canary, USER)
    d.chmod(0o755)
    opts = [o.replace("SRC", str(src)) for o in options]
    return rootfs, canary, home, opts


def assert_clean_failure(cp):
    assert cp.returncode in DOCUMENTED_EXIT, (cp.returncode, cp.stderr)
    assert "Traceback" not in cp.stderr, cp.stderr
    assert "error:" in cp.stderr and "hint:" in cp.stderr, cp.stderr


@pytest.fixture(scope="module")
def canaries():
    """Host directories the hostile links point at, outside /tmp (which the images link)."""
    path = Path(tempfile.mkdtemp(prefix="uctr-escape-canary-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def escape(harness, package_for_test_user, canaries):
    if not users.can_switch_user():
        pytest.skip(f"needs root and the user {USER} (run scripts/install.sh)")
    e = Escape(harness.root / "escape", package_for_test_user, canaries)
    e.setup()
    return e


@pytest.mark.parametrize("runtime", runtime_params())
@pytest.mark.parametrize("name, links, options, must_work", CASES, ids=[c[0] for c in CASES])
def test_hostile_rootfs_never_touches_the_host(escape, runtime, name, links, options, must_work):
    mode, mode_opts, path = runtime
    rootfs, canary, home, opts = make_case(escape, links, options)
    before = snapshot(canary)
    env = escape.env(home, path)
    args = [PYTHON, "-m", "uctr_batch", "run", "--mode", mode, *mode_opts, *opts, str(rootfs),
            "--", "sh", "-c", "echo ok; ls /dev >/dev/null; cat /etc/passwd >/dev/null"]
    cp = subprocess.run(users.as_user_argv(USER, args, env), env=env, capture_output=True,
                        text=True, cwd=str(home), timeout=120)
    assert snapshot(canary) == before, (cp.returncode, cp.stderr)
    if (name, mode) in REFUSED:
        assert cp.returncode == 3 and "out of the rootfs" in cp.stderr, cp.stderr
        assert_clean_failure(cp)
    elif must_work:
        assert cp.returncode == 0 and cp.stdout.startswith("ok"), (cp.returncode, cp.stderr)
    elif cp.returncode != 0:
        assert_clean_failure(cp)


# --- uctr-exec: a hostile image with its default binds; R1 with /tmp ----------------------------

def hostile_image(layout: Path, canary: Path) -> str:
    layer = LayerBuilder()
    for directory in ("bin", "usr", "root", "var"):
        layer.dir(directory)
    layer.file("bin/busybox", BUSYBOX_BINARY.read_bytes(), 0o755)
    for applet in BUSYBOX_APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    c = str(canary)
    layer.symlink("dev", c).symlink("proc", "../../../../../../../.." + c)
    layer.symlink("tmp", c + "/sub").symlink("etc", "/etc2").dir("etc2")
    layer.symlink("etc2/hosts", c + "/a-file").symlink("etc2/resolv.conf", c + "/a-file")
    layer.symlink("etc2/passwd", c + "/a-file").symlink("etc2/group", c + "/a-file")
    return readable_layout(layout, ImageConfig(cmd=["/bin/sh"]), layer)


@pytest.fixture
def exec_node(harness):
    if not users.can_switch_user():
        pytest.skip(f"needs root and the user {USER} (run scripts/install.sh)")
    return Node(harness.root / "escape-exec", USER)


def exec_modes():
    return [pytest.param(m, marks=[pytest.mark.skip(reason=f"{m}: {missing_binary(m)}")]
                         if missing_binary(m) else [], id=m) for m in ("N1", "R1", "P1", "P2")]


@pytest.mark.parametrize("mode", exec_modes())
def test_uctr_exec_hostile_image_with_default_binds(exec_node, canaries, mode):
    canary = canaries / exec_node.base.name
    canary.mkdir()
    (canary / "a-file").write_text("canary\n")
    (canary / "sub").mkdir()
    users.chown_tree(canary, USER)
    ref = hostile_image(exec_node.base / "hostile", canary)
    before = snapshot(canary)
    cp = exec_node.run("--mode", mode, ref, "sh", "-c", "echo ok; ls /dev /tmp >/dev/null")
    assert snapshot(canary) == before, (cp.returncode, cp.stderr)
    assert cp.returncode == 0 and cp.stdout.startswith("ok"), cp.stderr


def test_r1_under_uctr_exec_with_the_node_local_dir_under_tmp(exec_node, test_images):
    """uctr-exec binds /tmp, which holds the node-local dir and so the staged rootfs."""
    if missing_binary("R1"):
        pytest.skip(missing_binary("R1"))
    assert str(exec_node.local).startswith("/tmp/")
    cp = exec_node.run("--mode", "R1", test_images["busybox"].oci_ref, "true")
    assert cp.returncode == 0, cp.stderr
    cp = exec_node.run("--mode", "R1", test_images["busybox"].oci_ref, "sh", "-c",
                       "test -e /dev/ptmx && test -d /dev/pts && ls /tmp >/dev/null && echo ok")
    assert cp.returncode == 0 and cp.stdout == "ok\n", cp.stderr


def test_r1_uctr_run_binding_tmp(escape):
    if missing_binary("R1"):
        pytest.skip(missing_binary("R1"))
    d = escape.case_dir("tmpbind")
    rootfs, home = d / "rootfs", d / "home"
    shutil.copytree(escape.base, rootfs, symlinks=True, copy_function=os.link)
    home.mkdir()
    users.chown_tree(d, USER)
    env = escape.env(home)
    assert str(rootfs).startswith("/tmp/")
    for volume in ("/tmp", "/tmp:/mnt/tmp", str(d)):
        args = [PYTHON, "-m", "uctr_batch", "run", "--mode", "R1", "-v", volume, str(rootfs),
                "--", "sh", "-c", "echo ok"]
        cp = subprocess.run(users.as_user_argv(USER, args, env), env=env, capture_output=True,
                            text=True, cwd=str(home), timeout=120)
        assert cp.returncode == 0 and cp.stdout == "ok\n", (volume, cp.stderr)
