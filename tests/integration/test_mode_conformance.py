"""The conformance suite: every mode behaves the same, run for real as the unprivileged test
user on the busybox and Debian minbase test images.

Checked per mode: exit codes, death by signal, SIGTERM to the launcher, environment
precedence (image Env < policy < host passthrough < -e), working directory, rw/ro binds and a
read-only rootfs, identity (id, whoami, $HOME), stdin, 10 MiB of stdout, an inherited fd
(PMI_FD) and that nothing (process or mount) is left behind.

A mode is skipped only when its binary is absent (S1 here: apptainer is not a Debian
package). What a mode cannot do is asserted as a clear refusal (F1 on a static busybox, ro
binds in proot/fakechroot) or, for proot's signal handling, as a strict xfail that documents
the deviation (docs/modes.md, "Known deviations").
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import PYTHON
from tests.harness import hostabi, users
from tests.harness.oci import TAG, ImageConfig, Layer, LayoutWriter
from uctr_batch.modes.base import MODE_NAMES
from uctr_batch.modes.f1 import find_libfakechroot

pytestmark = pytest.mark.timeout(900)

USER = users.TEST_USER
IMAGES = ("busybox", "debian")
PROOT_MODES = ("P1", "P2")
NAMESPACE_MODES = ("N1", "R1")  # the modes that can enforce read-only mounts

IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "IMG_ONLY=img", "BY_E=img", "SLURM_FOO=img", "SITE_SET=img", "HOME=/img-home",
             "PREPENDED=/img", "IMG_UNSET=img"]
IMAGE_WORKDIR = "/work"
POLICY = """\
version: 1
defaults:
  modes: [N1, R1, P1, P2, F1, S1]
  user_modes: [N1, R1, P1, P2, F1, S1]
  env:
    set: {SITE_SET: site, SITE_ONLY: site}
    prepend: {PREPENDED: /site}
    append: {APPENDED: /site-app}
    unset: [IMG_UNSET]
    passthrough: ["CONF_*"]
"""
POLICY_RESTRICTED = """\
version: 1
defaults:
  modes: [S1, N1]
  user_modes: [P1]
"""
SEQ_N = 1_500_000  # `seq 1 N` prints 10.9 MB
PROOT_SIGNALS = ("proot 5.1 exits 255 when the payload dies of a signal and ignores SIGTERM "
                 "sent to its own pid (docs/modes.md, known deviations)")


def missing_binary(mode: str):
    """Why MODE cannot run on this machine at all (its program is not installed), or None."""
    if mode == "F1":
        return None if find_libfakechroot() else "fakechroot (libfakechroot.so) is not installed"
    programs = {"R1": ("crun", "runc"), "P1": ("proot",), "P2": ("proot",),
                "S1": ("apptainer", "singularity")}.get(mode, ())
    if programs and not any(shutil.which(p) for p in programs):
        return f"{' / '.join(programs)} not installed"
    return None


def mode_param(mode: str, *marks):
    why = missing_binary(mode)
    skip = [pytest.mark.skip(reason=f"mode {mode} skipped: {why}")] if why else []
    return pytest.param(mode, marks=list(marks) + skip, id=mode)


MODES = [mode_param(m) for m in MODE_NAMES]
# (mode, image) pairs; F1 cannot run the static busybox image (test_f1_refuses_static_busybox)
PAIRS = [pytest.param(p.values[0], image, marks=p.marks, id=f"{p.id}-{image}")
         for p in MODES for image in IMAGES if not (p.values[0] == "F1" and image == "busybox")]
# F1 preloads the host's libfakechroot into the image: on a host newer than the Debian image
# it may need a newer glibc than the image's, and F1 then refuses that image (hostabi)
F1_DEBIAN = hostabi.fakechroot_newer_than_images(find_libfakechroot())
if F1_DEBIAN:
    PAIRS = [pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.skip(
        reason=F1_DEBIAN)]) if p.id == "F1-debian" else p for p in PAIRS]


def signal_pair_params():
    out = []
    for p in PAIRS:
        marks = list(p.marks)
        if p.values[0] in PROOT_MODES:
            marks.append(pytest.mark.xfail(strict=True, reason=PROOT_SIGNALS))
        out.append(pytest.param(*p.values, marks=marks, id=p.id))
    return out


# --- the session: images, bundles, policy, directories ------------------------------------

def derived_image(base, layout: Path) -> None:
    """BASE's layers with the conformance image config (Env, WorkingDir) on top."""
    config = base.config()
    layers = [Layer(base.blob(d["digest"]), d["mediaType"], diff_id)
              for d, diff_id in zip(base.manifest()["layers"], config["rootfs"]["diff_ids"])]
    writer = LayoutWriter(layout)
    image_config = ImageConfig(env=IMAGE_ENV, working_dir=IMAGE_WORKDIR, cmd=["/bin/sh"])
    writer.tag(writer.add_image(image_config, layers), TAG)


class Conformance:
    """Directories, environment and bundles of the conformance runs (as the test user)."""

    def __init__(self, root: Path, package: Path):
        self.root = root
        self.package = package
        self.user_dir = root / "user"
        self.home = self.user_dir / "home"
        self.policy = root / "policy" / "policy.yaml"
        self.restricted_policy = root / "policy" / "restricted.yaml"
        self.bundles = {}

    def setup(self) -> None:
        for d in (self.root, self.policy.parent):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)
        self.policy.write_text(POLICY)
        self.restricted_policy.write_text(POLICY_RESTRICTED)
        for p in (self.policy, self.restricted_policy):
            p.chmod(0o644)
        self.home.mkdir(parents=True, exist_ok=True)
        users.chown_tree(self.user_dir, USER)

    def env(self, extra=None, policy=None):
        env = {
            "PATH": users.BASE_PATH, "LANG": "C.UTF-8", "HOME": str(self.home), "USER": USER,
            "LOGNAME": USER, "PYTHONPATH": str(self.package), "PYTHONDONTWRITEBYTECODE": "1",
            "UCTR_CACHE": str(self.user_dir / "cache"), "UCTR_LOCAL_DIR": str(self.user_dir / "local"),
            "UCTR_CONFIG_DIR": str(self.user_dir / "config"),
            "UCTR_POLICY": str(policy or self.policy),
        }
        env.update(extra or {})
        return env

    def argv(self, args, env, pidfile=None):
        command = [PYTHON, "-m", "uctr_batch", *map(str, args)]
        if pidfile:  # the shell records its pid, then becomes the launcher (exec keeps the pid),
            # leading a process group of its own (setsid does not fork in a non-leader)
            command = ["/bin/sh", "-c", 'echo $$ > "$0"; exec setsid "$@"', str(pidfile)] + command
        return users.as_user_argv(USER, command, env)

    def uctr(self, *args, env=None, policy=None, timeout=300, **kwargs):
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("cwd", str(self.user_dir))
        full = self.env(env, policy)
        return subprocess.run(self.argv(args, full), env=full, timeout=timeout, **kwargs)

    def run(self, mode, image, *command, opts=(), env=None, text=True, **kwargs):
        """`uctr run --mode MODE [OPTS] BUNDLE -- COMMAND` as the test user."""
        args = ["run", "--mode", mode, *opts, self.bundles[image], "--", *command]
        return self.uctr(*args, env=env, text=text, **kwargs)

    def popen(self, mode, image, *command, opts=(), env=None, pidfile=None, **kwargs):
        full = self.env(env)
        args = ["run", "--mode", mode, *opts, self.bundles[image], "--", *command]
        return subprocess.Popen(self.argv(args, full, pidfile), env=full, cwd=str(self.user_dir),
                                **kwargs)

    def user_path(self, name: str, content=None, is_dir=True) -> Path:
        """A fresh directory (or file) owned by the test user."""
        path = self.user_dir / "data" / f"{name}-{uuid.uuid4().hex[:8]}"
        path.mkdir(parents=True)
        if content is not None:
            (path / "in").write_text(content)
        users.chown_tree(self.user_dir / "data", USER)
        return path


@pytest.fixture(scope="session")
def conformance(harness, test_images, package_for_test_user):
    if not users.can_switch_user():
        pytest.skip(f"needs root and the user {USER} (run scripts/install.sh)")
    c = Conformance(harness.root / "conformance", package_for_test_user)
    c.setup()
    for name in IMAGES:
        layout = c.root / "images" / name
        if not (layout / "index.json").exists():
            derived_image(test_images[name], layout)
        for root, dirs, files in os.walk(c.root / "images"):
            os.chmod(root, 0o755)
            for f in files:
                os.chmod(os.path.join(root, f), 0o644)
        cp = c.uctr("create", f"oci:{layout}:{TAG}", text=True)
        assert cp.returncode == 0, cp.stderr
        c.bundles[name] = str(Path(cp.stdout.strip()).parent)
    return c


# --- exit codes and signals ---------------------------------------------------------------

@pytest.mark.parametrize("mode, image", PAIRS)
def test_exit_codes(conformance, mode, image):
    for code in (0, 3, 42):
        cp = conformance.run(mode, image, "sh", "-c", f"exit {code}")
        assert cp.returncode == code, cp.stderr


@pytest.mark.parametrize("mode, image", PAIRS)
def test_missing_command_exits_127(conformance, mode, image):
    cp = conformance.run(mode, image, "no-such-command-here")
    assert cp.returncode == 127 and "command not found" in cp.stderr, cp.stderr


@pytest.mark.parametrize("mode, image", signal_pair_params())
def test_payload_killed_by_signal_exits_128_plus_n(conformance, mode, image):
    cp = conformance.run(mode, image, "sh", "-c", "kill -TERM $$; sleep 5")
    assert cp.returncode == 128 + signal.SIGTERM, cp.stderr


TRAP_SCRIPT = 'trap "echo got-term; exit 7" TERM; echo ready; while :; do sleep 1; done'


def signal_the_payload(conformance, mode, image, send):
    """Start TRAP_SCRIPT, wait until it runs, call send(launcher_pid); (rc, out, err).

    The launcher leads its own process group (the payload is in it), so everything it
    started is killed at the end whatever happens: proot's tracees outlive a killed proot
    and would hold the output pipe open."""
    pidfile = conformance.user_path("pid") / "pid"
    p = conformance.popen(mode, image, "sh", "-c", TRAP_SCRIPT, pidfile=pidfile,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    launcher = None
    try:
        assert p.stdout.readline().strip() == "ready"
        launcher = int(pidfile.read_text())
        send(launcher)
        out, err = p.communicate(timeout=15)
    except BaseException:
        # Hung or failed: end what this run started (the launcher's group: payload and any
        # proot tracees), then runuser, so no orphan keeps the output pipe open.
        if launcher:
            try:
                os.killpg(launcher, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)
        raise
    return p.returncode, out, err


@pytest.mark.parametrize("mode, image", signal_pair_params())
def test_sigterm_to_the_launcher_reaches_the_payload(conformance, mode, image):
    rc, out, err = signal_the_payload(conformance, mode, image,
                                      lambda pid: os.kill(pid, signal.SIGTERM))
    assert "got-term" in out and rc == 7, (out, err)


@pytest.mark.parametrize("mode, image", PAIRS)
def test_sigterm_to_the_process_group_reaches_the_payload(conformance, mode, image):
    """What Slurm (the whole step), mpirun and a terminal's ^C do: every mode, proot too."""
    rc, out, err = signal_the_payload(conformance, mode, image,
                                      lambda pid: os.killpg(pid, signal.SIGTERM))
    assert "got-term" in out and rc == 7, (out, err)


# --- environment, working directory, identity ---------------------------------------------

def env_of(stdout: str) -> dict:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


@pytest.mark.parametrize("mode, image", PAIRS)
def test_environment_precedence(conformance, mode, image):
    host = {"SLURM_FOO": "host", "SLURM_BAR": "host", "CONF_X": "host", "NOT_PASSED": "host",
            "PMI_RANK": "3"}
    cp = conformance.run(mode, image, "env", opts=["-e", "BY_E=user", "-e", "SLURM_BAR=user"],
                         env=host)
    assert cp.returncode == 0, cp.stderr
    env = env_of(cp.stdout)
    expected = {
        "IMG_ONLY": "img",                 # image Env
        "SITE_SET": "site", "SITE_ONLY": "site",  # policy set beats the image
        "PREPENDED": "/site:/img", "APPENDED": "/site-app",
        "SLURM_FOO": "host", "CONF_X": "host", "PMI_RANK": "3",  # passthrough beats the image
        "HOME": str(conformance.home),     # HOME passes through
        "BY_E": "user", "SLURM_BAR": "user",  # -e beats everything
    }
    assert {k: env.get(k) for k in expected} == expected
    assert "IMG_UNSET" not in env and "NOT_PASSED" not in env
    assert env["PATH"] == IMAGE_ENV[0].split("=", 1)[1]  # the host's PATH never passes


@pytest.mark.parametrize("mode, image", PAIRS)
def test_working_directory(conformance, mode, image):
    assert conformance.run(mode, image, "pwd").stdout.strip() == IMAGE_WORKDIR
    assert conformance.run(mode, image, "pwd", opts=["-w", "/tmp"]).stdout.strip() == "/tmp"
    here = conformance.user_path("cwd")
    (here / "sub").mkdir()
    users.chown_tree(here, USER)
    cp = conformance.run(mode, image, "pwd", opts=["-v", str(here)], cwd=str(here / "sub"))
    assert cp.stdout.strip() == f"{here}/sub", cp.stderr  # the caller's cwd, bound in


F1_MOVED_BIND = ("fakechroot has no directory mapping: a bind to another path is a symlink, "
                 "so getcwd() inside it shows the host path (docs/modes.md, known deviations)")


@pytest.mark.parametrize("mode, image", [
    pytest.param(*p.values, marks=list(p.marks) + (
        [pytest.mark.xfail(strict=True, reason=F1_MOVED_BIND)] if p.values[0] == "F1" else []),
        id=p.id) for p in PAIRS])
def test_working_directory_through_a_moved_bind(conformance, mode, image):
    here = conformance.user_path("cwd")
    (here / "sub").mkdir()
    users.chown_tree(here, USER)
    cp = conformance.run(mode, image, "pwd", opts=["-v", f"{here}:/mnt/here"], cwd=str(here / "sub"))
    assert cp.stdout.strip() == "/mnt/here/sub", cp.stderr


@pytest.mark.parametrize("mode, image", PAIRS)
def test_identity(conformance, mode, image):
    import pwd

    me = pwd.getpwnam(USER)
    cp = conformance.run(mode, image, "sh", "-c",
                         'id -u; id -g; whoami; echo "$HOME"; grep "^$(whoami):" /etc/passwd')
    assert cp.returncode == 0, cp.stderr
    uid, gid, name, home, entry = cp.stdout.splitlines()
    assert (int(uid), int(gid), name, home) == (me.pw_uid, me.pw_gid, USER, str(conformance.home))
    assert entry.split(":")[5] == str(conformance.home)


@pytest.mark.parametrize("mode, image", PAIRS)
def test_root_option(conformance, mode, image):
    cp = conformance.run(mode, image, "id", "-u", opts=["--root"])
    if mode == "F1":
        assert cp.returncode == 3 and "root" in cp.stderr, cp.stderr
    else:
        assert cp.returncode == 0 and cp.stdout.strip() == "0", cp.stderr


# --- binds ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, image", PAIRS)
def test_rw_bind_is_visible_on_the_host(conformance, mode, image):
    data = conformance.user_path("rw", content="from-host\n")
    cp = conformance.run(mode, image, "sh", "-c", "cat /mnt/rw/in && echo written > /mnt/rw/out",
                         opts=["-v", f"{data}:/mnt/rw"])
    assert cp.returncode == 0 and cp.stdout == "from-host\n", cp.stderr
    assert (data / "out").read_text() == "written\n"


@pytest.mark.parametrize("mode, image", PAIRS)
def test_ro_bind(conformance, mode, image):
    data = conformance.user_path("ro", content="from-host\n")
    cp = conformance.run(mode, image, "sh", "-c", "cat /mnt/ro/in; echo x > /mnt/ro/new",
                         opts=["-v", f"{data}:/mnt/ro:ro"])
    if mode in NAMESPACE_MODES or mode == "S1":
        assert cp.stdout == "from-host\n" and cp.returncode != 0
        assert "Read-only file system" in cp.stderr, cp.stderr
    else:  # proot and fakechroot cannot enforce it on a source the user may write: refused
        assert cp.returncode == 3 and "read-only" in cp.stderr, cp.stderr
    assert not (data / "new").exists()


@pytest.mark.parametrize("mode, image", PAIRS)
def test_ro_bind_of_a_source_you_cannot_write_works_everywhere(conformance, mode, image):
    data = conformance.root / "root-owned"
    data.mkdir(exist_ok=True)
    data.chmod(0o755)
    (data / "in").write_text("root's\n")
    cp = conformance.run(mode, image, "sh", "-c", "cat /mnt/ro/in; echo x > /mnt/ro/new",
                         opts=["-v", f"{data}:/mnt/ro:ro"])
    assert cp.stdout == "root's\n" and cp.returncode != 0, cp.stderr
    assert not (data / "new").exists()


@pytest.mark.parametrize("mode, image", PAIRS)
def test_read_only_rootfs(conformance, mode, image):
    cp = conformance.run(mode, image, "sh", "-c", "touch /ro-probe", opts=["--read-only"])
    if mode in NAMESPACE_MODES or mode == "S1":
        assert cp.returncode != 0 and "Read-only file system" in cp.stderr, cp.stderr
    else:
        assert cp.returncode == 3 and "read-only" in cp.stderr, cp.stderr
    assert not os.path.exists(os.path.join(conformance.bundles[image], "rootfs", "ro-probe"))


# --- I/O -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, image", PAIRS)
def test_stdin_is_piped_through(conformance, mode, image):
    cp = conformance.run(mode, image, "cat", input="hi\nthere\n")
    assert cp.returncode == 0 and cp.stdout == "hi\nthere\n", cp.stderr


@pytest.mark.parametrize("mode, image", PAIRS)
def test_large_output_arrives_intact(conformance, mode, image):
    cp = conformance.run(mode, image, "seq", "1", str(SEQ_N), text=False)
    expected = "".join(f"{i}\n" for i in range(1, SEQ_N + 1)).encode()
    assert cp.returncode == 0, cp.stderr
    assert len(cp.stdout) == len(expected) > 10 * 1024 * 1024
    assert hashlib.sha256(cp.stdout).digest() == hashlib.sha256(expected).digest()


@pytest.mark.parametrize("mode, image", PAIRS)
def test_inherited_fd_survives(conformance, mode, image):
    r, w = os.pipe()

    def on_fd_7():
        os.dup2(w, 7)

    try:
        cp = conformance.run(mode, image, "sh", "-c", 'echo "via-fd:$PMI_FD" >&7', env={"PMI_FD": "7"},
                             pass_fds=(w, 7), preexec_fn=on_fd_7)
        os.close(w)
        w = None
        received = os.read(r, 4096).decode()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)
    assert cp.returncode == 0, cp.stderr
    assert received == "via-fd:7\n"


# --- cleanup -------------------------------------------------------------------------------

def processes_with(marker: bytes):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker in f.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("mode, image", PAIRS)
def test_nothing_is_left_behind(conformance, mode, image):
    marker = f"UCTR_CONFORMANCE_MARK={uuid.uuid4().hex}"
    bundle = conformance.bundles[image]
    before = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if bundle in line]
    cp = conformance.run(mode, image, "sh", "-c", "echo done", opts=["-e", marker],
                         env={marker.split("=")[0]: marker.split("=")[1]})
    assert cp.returncode == 0 and cp.stdout == "done\n", cp.stderr
    deadline = time.monotonic() + 5
    while processes_with(marker.encode()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(marker.encode()) == []
    after = [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if bundle in line]
    assert before == after == []
    state = Path(conformance.env()["UCTR_LOCAL_DIR"]) / "run"
    runtime_state = [p for p in state.glob("*-root/*")] if state.exists() else []
    assert runtime_state == []  # crun/runc deleted their container state


# --- refusals and the ladder ----------------------------------------------------------------

@pytest.mark.skipif(missing_binary("F1") is not None, reason="fakechroot not installed")
def test_f1_refuses_static_busybox(conformance):
    cp = conformance.run("F1", "busybox", "true")
    assert cp.returncode == 3
    assert "statically linked" in cp.stderr and "--mode P1" in cp.stderr, cp.stderr


def test_ladder_skips_modes_that_do_not_work(conformance):
    cp = conformance.uctr("run", "--dry-run", conformance.bundles["busybox"], "true",
                          policy=conformance.restricted_policy, text=True)
    plan = json.loads(cp.stdout)
    if missing_binary("S1"):
        assert plan["mode"] == "N1"
        assert plan["skipped"] == [{"mode": "S1", "reason": "apptainer/singularity not found on PATH"}]
    else:
        assert plan["mode"] == "S1"


def test_mode_not_allowed_is_exit_3_with_the_allowed_list(conformance):
    cp = conformance.uctr("run", "--mode", "N1", conformance.bundles["busybox"], "true",
                          policy=conformance.restricted_policy, text=True)
    assert cp.returncode == 3 and "P1" in cp.stderr, cp.stderr


@pytest.mark.skipif(missing_binary("S1") is None, reason="apptainer is installed here")
def test_unavailable_mode_is_exit_3_with_the_reason(conformance):
    cp = conformance.run("S1", "busybox", "true")
    assert cp.returncode == 3 and "apptainer/singularity not found on PATH" in cp.stderr


def test_run_pulls_and_unpacks_an_image_reference(uctr, pushed):
    """`uctr run IMAGE` goes through pull.ensure_image and rootfs.create first."""
    cp = uctr("run", "--mode", "N1", pushed["busybox"], "--", "sh", "-c", "echo hi; id -u",
              user=USER)
    import pwd

    assert cp.returncode == 0, cp.stderr
    assert cp.stdout.split() == ["hi", str(pwd.getpwnam(USER).pw_uid)]
    again = uctr("run", "--mode", "N1", "--no-pull", pushed["busybox"], "true", user=USER)
    assert again.returncode == 0, again.stderr


JOIN_SCRIPT = r"""
import os, sys
from uctr_batch.modes import RunSpec, n1
spec = RunSpec(rootfs=sys.argv[1], argv=["sh"], env={"PATH": "/bin"})
holder = n1.spawn_holder(spec, die_with_parent=True)
rank = spec.replace(argv=["sh", "-c", "readlink /proc/self/ns/user; readlink /proc/self/ns/mnt; ls /"],
                    cwd="/etc")
outputs = []
for _ in range(2):  # two "ranks" join the holder's namespaces
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.dup2(w, 1)
        n1.join(holder, rank)
    os.close(w)
    with os.fdopen(r) as f:
        outputs.append(f.read())
    os.waitpid(pid, 0)
holder_ns = [os.readlink("/proc/%d/ns/%s" % (holder, ns)) for ns in ("user", "mnt")]
mine = os.readlink("/proc/self/ns/user")
os.kill(holder, 15)
os.waitpid(holder, 0)
print(repr((holder_ns, mine, outputs)))
"""


@pytest.mark.skipif(missing_binary("N1") is not None, reason="n/a")
def test_n1_ranks_join_one_shared_namespace(conformance):
    """The primitives the per-node launcher builds on: one holder, ranks setns() into it."""
    rootfs = os.path.join(conformance.bundles["busybox"], "rootfs")
    full = conformance.env()
    cp = subprocess.run(users.as_user_argv(USER, [PYTHON, "-c", JOIN_SCRIPT, rootfs], full),
                        env=full, capture_output=True, text=True, timeout=120)
    assert cp.returncode == 0, cp.stderr
    import ast

    holder_ns, mine, outputs = ast.literal_eval(cp.stdout.strip())
    assert mine != holder_ns[0]  # the holder's user namespace is a new one...
    for out in outputs:          # ...and both ranks are in it, seeing the container's root
        lines = out.split()
        assert lines[:2] == holder_ns
        assert sorted(lines[2:]) == sorted(os.listdir(rootfs))


def test_doctor_reports_every_mode(conformance):
    cp = conformance.uctr("doctor", "--json", text=True)
    assert cp.returncode == 0, cp.stderr
    report = json.loads(cp.stdout)
    modes = {m["mode"]: m for m in report["modes"]}
    assert list(modes) == list(MODE_NAMES)
    assert modes["N1"]["ok"] and report["userns"]["works"]
    for name in MODE_NAMES:
        assert modes[name]["ok"] == (missing_binary(name) is None), modes[name]
        assert modes[name]["reason"]
    assert {s["what"] for s in report["storage"]} == {"cache", "local"}
