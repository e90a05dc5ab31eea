"""Golden command lines and configs per mode, from one fixed RunSpec.

What each mode hands to its runtime is plain data, so it is compared whole: a changed flag
or mount shows up here before it shows up as a misbehaving container. The F1 cases build a
tiny glibc rootfs from the host's own /usr/bin/true, loader and libc.so.6.
"""

import os
import shutil
import subprocess

import pytest

from uctr_batch.errors import ModeError, UctrError
from uctr_batch.modes import RunSpec, get_mode
from uctr_batch.modes.base import MODE_NAMES, available_modes
from uctr_batch.modes.f1 import Plan
from uctr_batch.modes.proot import proot_argv, proot_env
from uctr_batch.modes.r1 import cgroup_mode, oci_config
from uctr_batch.modes.s1 import apptainer_argv, apptainer_env

SPEC = RunSpec(
    rootfs="/srv/uctr/rootfs", argv=["app", "-x", "a b"], env={"PATH": "/usr/bin:/bin", "A": "1"},
    cwd="/work", binds=[("/data", "/data", False), ("/ref", "/mnt/ref", True)],
    devices=["/dev/fuse"], uid=1000, gid=100, readonly=False,
    passwd="/state/identity/passwd-1", group="/state/identity/group-1", state_dir="/state",
)
DEV = [("/dev/null", False), ("/dev/shm", True), ("/dev/fuse", False)]


def test_every_mode_registers_under_its_name():
    assert available_modes() == MODE_NAMES
    for name in MODE_NAMES:
        assert get_mode(name).name == name


def test_unknown_mode_is_a_mode_error():
    with pytest.raises(ModeError) as e:
        get_mode("X9")
    assert e.value.exit_code == 3 and "N1" in e.value.hint


def test_runspec_is_immutable_and_round_trips_through_json():
    import json

    with pytest.raises(AttributeError):
        SPEC.cwd = "/"
    again = RunSpec.from_dict(json.loads(json.dumps(SPEC.to_dict())))
    assert again == SPEC
    assert SPEC.replace(uid=0, gid=0).root and not SPEC.root
    with pytest.raises(ValueError):
        RunSpec.from_dict(dict(SPEC.to_dict(), hostname="x"))


def test_proot_argv():
    assert proot_argv(SPEC, "/usr/bin/proot", host_uid=1000, dev=DEV) == [
        "/usr/bin/proot", "-r", "/srv/uctr/rootfs", "-w", "/work", "-b", "/proc", "-b", "/sys",
        "-b", "/dev/null", "-b", "/dev/shm", "-b", "/dev/fuse",
        "-b", "/state/identity/passwd-1:/etc/passwd", "-b", "/state/identity/group-1:/etc/group",
        "-b", "/data:/data", "-b", "/ref:/mnt/ref",
        "app", "-x", "a b",
    ]
    assert "-k" not in proot_argv(SPEC, dev=DEV)  # -k breaks dynamic binaries (peer-facts)


def test_proot_root_uses_minus_zero_only_for_a_non_root_caller():
    root = SPEC.replace(uid=0, gid=0)
    assert proot_argv(root, host_uid=1000, dev=DEV)[-4:] == ["-0", "app", "-x", "a b"]
    assert "-0" not in proot_argv(root, host_uid=0, dev=DEV)
    assert "-0" not in proot_argv(SPEC, host_uid=1000, dev=DEV)


def test_p2_disables_seccomp_and_p1_does_not():
    assert proot_env(SPEC, no_seccomp=True) == {"PATH": "/usr/bin:/bin", "A": "1", "PROOT_NO_SECCOMP": "1"}
    assert proot_env(SPEC, no_seccomp=False) == SPEC.env


def test_oci_config():
    assert oci_config(SPEC, host_uid=1000, host_gid=100, dev=DEV) == {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 1000, "gid": 100},
            "args": ["app", "-x", "a b"],
            "env": ["PATH=/usr/bin:/bin", "A=1"],
            "cwd": "/work",
        },
        "root": {"path": "/srv/uctr/rootfs", "readonly": False},
        "mounts": [
            {"destination": "/proc", "type": "bind", "source": "/proc", "options": ["rbind"]},
            {"destination": "/sys", "type": "bind", "source": "/sys", "options": ["rbind"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "noexec", "mode=755", "size=256k"]},
            # /dev/null: made by crun/runc themselves (r1.RUNTIME_DEVICES), not bound here
            {"destination": "/dev/shm", "type": "bind", "source": "/dev/shm", "options": ["rbind"]},
            {"destination": "/dev/fuse", "type": "bind", "source": "/dev/fuse", "options": ["rbind"]},
            {"destination": "/etc/passwd", "type": "bind", "source": "/state/identity/passwd-1",
             "options": ["bind", "ro"]},
            {"destination": "/etc/group", "type": "bind", "source": "/state/identity/group-1",
             "options": ["bind", "ro"]},
            {"destination": "/data", "type": "bind", "source": "/data", "options": ["rbind", "rw"]},
            {"destination": "/mnt/ref", "type": "bind", "source": "/ref", "options": ["rbind", "ro"]},
        ],
        "linux": {
            "uidMappings": [{"containerID": 1000, "hostID": 1000, "size": 1}],
            "gidMappings": [{"containerID": 100, "hostID": 100, "size": 1}],
            "namespaces": [{"type": "user"}, {"type": "mount"}],
        },
    }


def test_oci_config_root_maps_zero_and_grants_capabilities():
    config = oci_config(SPEC.replace(uid=0, gid=0, readonly=True), host_uid=1000, host_gid=100, dev=DEV)
    assert config["linux"]["uidMappings"] == [{"containerID": 0, "hostID": 1000, "size": 1}]
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert "CAP_CHOWN" in config["process"]["capabilities"]["bounding"]
    assert config["root"]["readonly"] is True
    # Never a PID, network, IPC or UTS namespace: signals, host network, shm, hostname.
    assert {n["type"] for n in config["linux"]["namespaces"]} == {"user", "mount"}
    assert "hostname" not in config and "rlimits" not in config["process"]


@pytest.mark.parametrize("table, expected", [
    ("27 1 0:22 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n", "unified"),
    ("27 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
     "28 27 0:23 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
     "29 27 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", "hybrid"),
    ("27 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
     "29 27 0:24 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n", "legacy"),
    ("22 1 0:21 / /proc rw - proc proc rw\n", "none"),
])
def test_cgroup_mode_from_mountinfo(tmp_path, table, expected):
    path = tmp_path / "mountinfo"
    path.write_text(table)
    assert cgroup_mode(str(path)) == expected


def test_apptainer_argv_and_env():
    assert apptainer_argv(SPEC, "apptainer", host_uid=1000) == [
        "apptainer", "exec", "--cleanenv", "--no-home", "--no-mount", "tmp,cwd", "--pwd", "/work",
        "--bind", "/state/identity/passwd-1:/etc/passwd:ro",
        "--bind", "/state/identity/group-1:/etc/group:ro",
        "--bind", "/data:/data:rw", "--bind", "/ref:/mnt/ref:ro",
        "--writable", "/srv/uctr/rootfs", "app", "-x", "a b",
    ]
    root_ro = apptainer_argv(SPEC.replace(uid=0, gid=0, readonly=True), host_uid=1000)
    assert "--fakeroot" in root_ro and "--writable" not in root_ro
    env = apptainer_env(SPEC, "singularity", host_env={"HOME": "/h", "SINGULARITYENV_OLD": "x"})
    assert env == {"HOME": "/h", "SINGULARITYENV_PATH": "/usr/bin:/bin", "SINGULARITYENV_A": "1"}


def test_apptainer_argv_and_env_for_a_sif():
    """A SIF is never written: --writable-tmpfs where the container is writable; the image's
    own PATH (its environment scripts) wins over uctr's default; a PATH someone set is kept."""
    from uctr_batch.envspec import DEFAULT_PATH

    argv = apptainer_argv(SPEC, "apptainer", host_uid=1000, sif=True)
    assert argv[:3] == ["apptainer", "--quiet", "exec"]
    assert "--writable-tmpfs" in argv and "--writable" not in argv
    assert "--writable-tmpfs" not in apptainer_argv(SPEC.replace(readonly=True), sif=True)
    default = SPEC.replace(env=dict(SPEC.env, PATH=DEFAULT_PATH))
    assert "APPTAINERENV_PATH" not in apptainer_env(default, host_env={}, sif=True)
    assert apptainer_env(default, host_env={})["APPTAINERENV_PATH"] == DEFAULT_PATH
    assert apptainer_env(SPEC, host_env={}, sif=True)["APPTAINERENV_PATH"] == "/usr/bin:/bin"


def test_apptainer_home_is_an_option_not_a_variable():
    """apptainer refuses APPTAINERENV_HOME ("Overriding HOME ... is not permitted") and keeps
    its own; --home sets $HOME (--no-home still mounts nothing)."""
    spec = SPEC.replace(env=dict(SPEC.env, HOME="/home/u"))
    argv = apptainer_argv(spec, "apptainer", host_uid=1000)
    assert argv[argv.index("--home") + 1] == "/home/u" and "--no-home" in argv
    assert "APPTAINERENV_HOME" not in apptainer_env(spec, "apptainer", host_env={})


# --- F1: a real little glibc rootfs made of host files -----------------------------------

HOST_TRUE = "/usr/bin/true"
HOST_LOADER = "/lib64/ld-linux-x86-64.so.2"
HOST_LIBFAKECHROOT = "/usr/lib/x86_64-linux-gnu/fakechroot/libfakechroot.so"


def _host_libc():
    for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64"):
        if os.path.exists(os.path.join(d, "libc.so.6")):
            return os.path.join(d, "libc.so.6")
    return None


needs_glibc_x86 = pytest.mark.skipif(
    not (os.path.exists(HOST_LOADER) and _host_libc() and os.path.exists(HOST_LIBFAKECHROOT)),
    reason="needs an x86-64 glibc host with fakechroot installed")


@pytest.fixture
def glibc_rootfs(tmp_path):
    root = tmp_path / "rootfs"
    for d in ("usr/bin", "lib64", "lib/x86_64-linux-gnu", "etc", "work"):
        (root / d).mkdir(parents=True)
    shutil.copy(HOST_TRUE, root / "usr/bin/true")
    shutil.copy(HOST_LOADER, root / "lib64/ld-linux-x86-64.so.2")
    shutil.copy(_host_libc(), root / "lib/x86_64-linux-gnu/libc.so.6")
    (root / "usr/bin/script").write_text("#!/usr/bin/true -e\n")
    (root / "usr/bin/script").chmod(0o755)
    return root


def _f1_spec(root, argv=("true", "x")):
    return RunSpec(rootfs=str(root), argv=argv, env={"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib"},
                   cwd="/work", binds=[("/data", "/data", False), ("/srv/x", "/mnt/x", False)],
                   uid=os.getuid(), gid=os.getgid(), passwd=None, group=None, state_dir=str(root.parent))


@needs_glibc_x86
def test_f1_runs_the_container_loader_with_the_preload(glibc_rootfs):
    root = str(glibc_rootfs)
    plan = Plan(_f1_spec(glibc_rootfs), HOST_LIBFAKECHROOT)
    loader = root + "/lib64/ld-linux-x86-64.so.2"
    assert plan.argv() == [loader, "--argv0", "true", root + "/usr/bin/true", "x"]
    env = plan.env()
    assert env["LD_PRELOAD"] == HOST_LIBFAKECHROOT
    assert env["FAKECHROOT_BASE"] == root and env["FAKECHROOT_ELFLOADER"] == loader
    assert env["FAKECHROOT_ELFLOADER_OPT_ARGV0"] == "--argv0"
    assert env["FAKECHROOT_EXCLUDE_PATH"] == "/proc:/sys:/dev:/data:/srv/x"
    # the image's own LD_LIBRARY_PATH first (mapped into the rootfs), then its lib dirs
    assert env["LD_LIBRARY_PATH"].split(":")[:2] == [root + "/opt/lib", root + "/lib/x86_64-linux-gnu"]
    assert env["PATH"] == "/usr/bin"


@needs_glibc_x86
def test_f1_runs_scripts_through_their_interpreter(glibc_rootfs):
    root = str(glibc_rootfs)
    plan = Plan(_f1_spec(glibc_rootfs, ("script", "arg")), HOST_LIBFAKECHROOT)
    assert plan.argv() == [root + "/lib64/ld-linux-x86-64.so.2", "--argv0", "script",
                           root + "/usr/bin/true", "-e", "/usr/bin/script", "arg"]


@needs_glibc_x86
def test_f1_refuses_a_static_binary(glibc_rootfs):
    from uctr_batch.inject import elf

    busybox = shutil.which("busybox")
    if not busybox or not elf.read_elf(os.path.realpath(busybox)).is_static:
        pytest.skip("needs busybox-static")
    shutil.copy(busybox, glibc_rootfs / "usr/bin/busybox")
    with pytest.raises(UctrError, match="statically linked"):
        Plan(_f1_spec(glibc_rootfs, ("busybox", "true")), HOST_LIBFAKECHROOT)


@needs_glibc_x86
def test_f1_refuses_musl(glibc_rootfs):
    if not shutil.which("patchelf"):
        pytest.skip("needs patchelf")
    subprocess.run(["patchelf", "--set-interpreter", "/lib/ld-musl-x86_64.so.1",
                    str(glibc_rootfs / "usr/bin/true")], check=True)
    with pytest.raises(UctrError, match="musl"):
        Plan(_f1_spec(glibc_rootfs), HOST_LIBFAKECHROOT)


@needs_glibc_x86
def test_f1_refuses_a_glibc_older_than_libfakechroot_needs(glibc_rootfs, tmp_path):
    # A copy of libfakechroot whose highest GLIBC_2.x requirement now reads GLIBC_9.x: the
    # real container glibc (the host's) is then "too old", through real ELF parsing.
    data = open(HOST_LIBFAKECHROOT, "rb").read()
    from uctr_batch.inject import elf

    needed = elf.version_text(elf.read_elf(HOST_LIBFAKECHROOT).glibc_needed())
    old, new = ("GLIBC_%s\0" % needed).encode(), ("GLIBC_9%s\0" % needed[1:]).encode()
    assert data.count(old) >= 1
    lib = tmp_path / "libfakechroot.so"
    lib.write_bytes(data.replace(old, new))
    with pytest.raises(UctrError, match=r"older than the 9\.\d+"):
        Plan(_f1_spec(glibc_rootfs), str(lib))


@needs_glibc_x86
def test_f1_refuses_root_and_writable_read_only_binds(glibc_rootfs, tmp_path):
    if os.getuid() != 0:  # a real root caller is root inside anyway (the conformance suite
        with pytest.raises(UctrError, match="root"):  # checks --root as the test user)
            Plan(_f1_spec(glibc_rootfs).replace(uid=0, gid=0), HOST_LIBFAKECHROOT)
    mine = tmp_path / "mine"
    mine.mkdir()
    spec = _f1_spec(glibc_rootfs).replace(binds=[(str(mine), "/mnt/mine", True)])
    if os.access(str(mine), os.W_OK):
        with pytest.raises(UctrError, match="read-only"):
            Plan(spec, HOST_LIBFAKECHROOT)
    assert not get_mode("F1").probe(spec).ok


def test_proot_probe_refuses_read_only_requests_it_cannot_enforce(tmp_path):
    if not shutil.which("proot"):
        pytest.skip("proot not installed")
    mine = tmp_path / "mine"
    mine.mkdir()
    root = tmp_path / "rootfs"
    root.mkdir()
    spec = RunSpec(rootfs=str(root), argv=["true"], binds=[(str(mine), "/m", True)])
    result = get_mode("P1").probe(spec)
    assert not result.ok and "read-only" in result.reason
    assert get_mode("P1").probe(spec.replace(binds=[(str(mine), "/m", False)])).ok
    assert not get_mode("P2").probe(spec.replace(binds=[], readonly=True)).ok


def test_oci_config_leaves_the_standard_nodes_to_the_runtime():
    """crun/runc create null, zero, ..., tty and the /dev/ptmx link themselves; a bind of ours
    broke /dev/ptmx under a /tmp bind (issue 10) and /dev/tty without a terminal (runc)."""
    from uctr_batch.modes.base import STANDARD_DEVICES

    dev = [(d, False) for d in STANDARD_DEVICES] + [("/dev/pts", True), ("/dev/fuse", False)]
    dests = [m["destination"] for m in oci_config(SPEC, dev=dev)["mounts"]]
    assert not set(STANDARD_DEVICES) & set(dests)
    assert "/dev/pts" in dests and "/dev/fuse" in dests


def test_destinations_are_handed_over_resolved(tmp_path):
    """R1, P1 and S1 never hand their runtime a destination through the image's links."""
    from uctr_batch.modes import inroot
    from uctr_batch.modes.proot import proot_argv
    from uctr_batch.modes.r1 import safe_destination
    from uctr_batch.modes.s1 import apptainer_argv

    rootfs = tmp_path / "rootfs"
    (rootfs / "real").mkdir(parents=True)
    (rootfs / "mnt").symlink_to("/real")
    (rootfs / "dev").symlink_to(str(tmp_path / "host-dev"))
    (rootfs / "etc").symlink_to("../../../../../../../../../../" + str(tmp_path / "host-etc"))
    spec = SPEC.replace(rootfs=str(rootfs), binds=[(str(tmp_path), "/mnt/data", False)],
                        passwd=str(tmp_path), group=None)
    config = oci_config(spec, dev=[], destination=safe_destination(str(rootfs)))
    dests = [m["destination"] for m in config["mounts"]]
    assert "/real/data" in dests and "/mnt/data" not in dests
    assert (rootfs / "dev").is_dir() and not (rootfs / "dev").is_symlink()
    etc = inroot.container_path(str(rootfs), inroot.resolve(str(rootfs), "/etc/passwd"))
    assert etc in dests and (rootfs / etc.lstrip("/")).is_file()
    assert not (tmp_path / "host-dev").exists() and not (tmp_path / "host-etc").exists()
    root = str(rootfs)
    argv = proot_argv(spec, dev=[], destination=lambda p, d: inroot.resolved(root, p, d))
    assert "%s:/real/data" % tmp_path in argv
    argv = apptainer_argv(spec, destination=lambda p, d: inroot.resolved(root, p, d))
    assert "%s:/real/data:rw" % tmp_path in argv
