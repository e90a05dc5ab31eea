"""build_spec and its parts: argv, binds, working directory, identity, paths inside a rootfs,
and the mode ladder's choice (real probes)."""

import os
import shutil

import pytest

from uctr_batch import identity, run
from uctr_batch.errors import ConfigError, ModeError, UsageError
from uctr_batch.modes import inroot
from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body


def policy(**body):
    return NodePolicy.from_body(merge_body(builtin_body(), body), {}, node="n1", partition=None,
                                features=(), class_name=None, reason="test")


@pytest.mark.parametrize("config, command, entrypoint, expected", [
    ({"Cmd": ["/bin/sh"]}, [], None, ["/bin/sh"]),
    ({"Cmd": ["/bin/sh"]}, ["ls", "-l"], None, ["ls", "-l"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--help"]}, [], None, ["/init", "--help"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--help"]}, ["run"], None, ["/init", "run"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--help"]}, ["ls"], "", ["ls"]),
    ({"Entrypoint": ["/init"], "Cmd": ["--help"]}, [], "/bin/env", ["/bin/env"]),
])
def test_compose_argv_follows_docker(config, command, entrypoint, expected):
    assert run.compose_argv(config, command, entrypoint) == expected


def test_no_command_at_all_is_a_usage_error():
    with pytest.raises(UsageError):
        run.compose_argv({}, [])


@pytest.mark.parametrize("workdir, host_cwd, image_wd, expected", [
    ("/w", "/data/sub", "/img", "/w"),            # -w first
    (None, "/data/sub/x", "/img", "/mnt/d/sub/x"),  # caller's cwd, mapped through its bind
    (None, "/data", "/img", "/mnt/d"),
    (None, "/home/u/p", "/img", "/home/u/p"),     # the longest bind source wins
    (None, "/elsewhere", "/img", "/img"),        # not bound: the image's WorkingDir
    (None, "/datax", None, "/"),                 # /datax is not inside /data; nothing: /
    ("/a/../b/", None, None, "/b"),
])
def test_working_directory_precedence(workdir, host_cwd, image_wd, expected):
    binds = [("/data", "/mnt/d", False), ("/home/u", "/home/u", True), ("/home", "/h", False)]
    assert run.choose_cwd(workdir, host_cwd, binds, image_wd) == expected


def test_relative_workdir_is_refused():
    with pytest.raises(UsageError):
        run.choose_cwd("rel", None, [], None)


def test_parse_volume(tmp_path):
    src = tmp_path / "d"
    src.mkdir()
    assert run.parse_volume(f"{src}:/mnt/x:ro", "/") == (str(src), "/mnt/x", True)
    assert run.parse_volume(f"{src}", "/") == (str(src), str(src), False)
    assert run.parse_volume("d:/m", str(tmp_path)) == (str(src), "/m", False)
    for bad in (f"{src}:rel", f"{src}:/m:rx", f"{tmp_path}/missing:/m", ":/m", "a:b:c:d"):
        with pytest.raises(UsageError):
            run.parse_volume(bad, "/")


def test_user_binds_replace_policy_binds_and_nest_by_depth():
    merged = run.merge_binds([("/etc/hosts", "/etc/hosts", True), ("/p", "/data", True)],
                             [("/u/sub", "/data/sub", False), ("/u", "/data", False)])
    assert merged == [("/u", "/data", False), ("/etc/hosts", "/etc/hosts", True),
                      ("/u/sub", "/data/sub", False)]


def test_policy_binds_expand_and_skip_missing_optional(tmp_path):
    there = tmp_path / "there"
    there.mkdir()
    p = policy(binds=[{"src": str(there), "dst": "/t", "mode": "rw"},
                      {"src": str(tmp_path / "${USER}-missing"), "dst": "/x", "optional": True}])
    assert run.policy_binds(p) == [(str(there), "/t", False)]
    with pytest.raises(ConfigError):
        run.policy_binds(policy(binds=[{"src": str(tmp_path / "missing")}]))


def test_resolve_in_root_never_leaves_the_rootfs(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "run").mkdir()
    os.symlink("/run", root / "var-run")            # absolute link: re-rooted
    os.symlink("../../../..", root / "etc/up")      # climbs: clamped at the top
    os.symlink("/etc/passwd", root / "etc/pw")      # would be the host's /etc/passwd
    os.symlink("loop", root / "loop")
    r = str(root)
    assert inroot.resolve(r, "/var-run/x") == r + "/run/x"
    assert inroot.resolve(r, "/etc/up/etc") == r + "/etc"
    assert inroot.resolve(r, "/etc/pw") == r + "/etc/passwd"
    assert inroot.resolve(r, "/../../etc/./passwd") == r + "/etc/passwd"
    with pytest.raises(Exception, match="symbolic links"):
        inroot.resolve(r, "/loop")


def test_mount_points_are_created_inside_the_rootfs(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    os.symlink("/elsewhere", root / "link")
    host = inroot.ensure_mountpoint(str(root), "/link/deep/file", is_dir=False)
    assert host == str(root / "elsewhere/deep/file") and os.path.isfile(host)
    assert inroot.ensure_mountpoint(str(root), "/d/e", is_dir=True) == str(root / "d/e")
    with pytest.raises(Exception, match="directory"):
        inroot.ensure_mountpoint(str(root), "/d/e", is_dir=False)


IMAGE_PASSWD = ("root:x:0:0:root:/root:/bin/sh\nubuntu:x:1000:1000::/home/ubuntu:/bin/bash\n"
                "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
IMAGE_GROUP = "root:x:0:\nusers:x:100:\nnogroup:x:65534:\n"


def test_passwd_adds_the_caller_and_replaces_a_clash():
    me = identity.Identity(1000, 100, "alice", "users", "/home/alice")
    text = identity.passwd_text(IMAGE_PASSWD, me, "/bin/bash")
    assert text.splitlines() == ["root:x:0:0:root:/root:/bin/sh",
                                 "nobody:x:65534:65534:nobody:/nonexistent:/bin/false",
                                 "alice:x:1000:100:alice:/home/alice:/bin/bash"]
    # the image already has gid 100: its group line is kept as it is
    assert identity.group_text(IMAGE_GROUP, me) == IMAGE_GROUP
    other = identity.Identity(2000, 2000, "bob", "bob", "/h")
    assert identity.group_text(IMAGE_GROUP, other).splitlines()[-1] == "bob:x:2000:bob"
    assert identity.passwd_text(identity.passwd_text(IMAGE_PASSWD, me, "/bin/sh"), me, "/bin/sh") \
        == identity.passwd_text(IMAGE_PASSWD, me, "/bin/sh")  # idempotent (F1 rewrites in place)


def test_root_keeps_the_image_files_and_adds_root_if_missing():
    root = identity.Identity(0, 0, "root", "root", "/root")
    assert identity.passwd_text(IMAGE_PASSWD, root, "/bin/sh") == IMAGE_PASSWD
    assert identity.passwd_text("", root, "/bin/sh") == identity.ROOT_PASSWD + "\n"
    assert identity.group_text("", root) == identity.ROOT_GROUP + "\n"


def test_identity_files_are_content_addressed(tmp_path):
    a = identity.store(str(tmp_path / "id"), "passwd", "one\n")
    assert identity.store(str(tmp_path / "id"), "passwd", "one\n") == a
    b = identity.store(str(tmp_path / "id"), "passwd", "two\n")
    assert a != b and open(a).read() == "one\n" and open(b).read() == "two\n"


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc/passwd").write_text(IMAGE_PASSWD)
    (root / "etc/group").write_text(IMAGE_GROUP)
    return root


def test_build_spec(rootfs, tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    target = run.Target(str(rootfs), {"Env": ["PATH=/bin", "IMG=1"], "WorkingDir": "/srv/app",
                                      "Cmd": ["/bin/sh"]})
    p = policy(env={"set": {"SITE": "1"}}, devices=["/dev/fuse"], readonly_rootfs=True)
    spec = run.build_spec(target, p, command=["--", "x"][1:], volumes=[f"{data}:/data:ro"],
                          user_env=["U=1"], host_env={"SLURM_JOB_ID": "7", "HOME": "/home/me"},
                          host_cwd=str(data / "sub"), scratch=str(tmp_path / "state"))
    assert spec.argv == ("x",)
    assert spec.env == {"PATH": "/bin", "IMG": "1", "SITE": "1", "SLURM_JOB_ID": "7",
                        "HOME": "/home/me", "U": "1"}
    assert spec.cwd == "/data/sub" and spec.binds == ((str(data), "/data", True),)
    assert spec.devices == ("/dev/fuse",) and spec.readonly
    assert (spec.uid, spec.gid) == (os.getuid(), os.getgid())
    passwd = open(spec.passwd).read()
    if os.getuid() != 0:  # the caller's entry carries the final HOME (root keeps the image's)
        assert ":/home/me:" in passwd.splitlines()[-1]
    assert spec.passwd.startswith(str(tmp_path / "state/identity/"))


def test_build_spec_creates_the_image_workdir_and_maps_root(rootfs, tmp_path):
    target = run.Target(str(rootfs), {"WorkingDir": "/srv/app", "Cmd": ["/bin/sh"]})
    spec = run.build_spec(target, policy(), root=True, host_env={}, host_cwd="/",
                          scratch=str(tmp_path / "state"))
    assert spec.cwd == "/srv/app" and (rootfs / "srv/app").is_dir()
    assert (spec.uid, spec.gid) == (0, 0) and spec.root


def test_target_from_a_bundle_reads_its_image_config(tmp_path):
    import json

    bundle = tmp_path / "b"
    (bundle / "rootfs").mkdir(parents=True)
    (bundle / "image.json").write_text(json.dumps({"reference": "r", "config": {"Cmd": ["x"]}}))
    for path in (bundle, bundle / "rootfs"):
        t = run.target_from_path(str(path))
        assert t.rootfs == str(bundle / "rootfs") and t.config == {"Cmd": ["x"]}
    plain = run.target_from_path(str(bundle / "rootfs") + "/")
    assert plain.config == {"Cmd": ["x"]}
    with pytest.raises(UsageError):
        run.target_from_path(str(tmp_path / "missing"))


def test_ladder_skips_modes_whose_probe_fails(rootfs):
    if shutil.which("apptainer") or shutil.which("singularity") or not shutil.which("proot"):
        pytest.skip("needs proot and no apptainer")
    spec = run.RunSpec(rootfs=str(rootfs), argv=["true"])
    mode, result, skipped = run.choose_mode(["S1", "P1"], spec, explicit=False)
    assert mode.name == "P1" and result.ok
    assert skipped == [("S1", "apptainer/singularity not found on PATH")]
    with pytest.raises(ModeError, match="not found on PATH"):
        run.choose_mode(["S1", "P1"], spec, explicit=True)


def test_mode_not_allowed_for_users_is_exit_3():
    with pytest.raises(ModeError) as e:
        policy(user_modes=["P1"]).mode_ladder("N1")
    assert e.value.exit_code == 3 and "P1" in e.value.hint


def test_command_lookup_goes_through_binds_and_the_container_path(tmp_path):
    from uctr_batch.modes.base import PayloadNotFound, check_command

    root = tmp_path / "root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/tool").write_text("")
    os.symlink("usr/bin", root / "bin")
    opt = tmp_path / "opt"
    (opt / "bin").mkdir(parents=True)
    (opt / "bin/app").write_text("")
    spec = run.RunSpec(rootfs=str(root), argv=["tool"], env={"PATH": "/bin"},
                       binds=[(str(opt), "/opt/app", True)])
    check_command(spec)                                             # /bin -> usr/bin in the image
    check_command(spec.replace(argv=["/opt/app/bin/app"]))          # inside a bind
    check_command(spec.replace(argv=["./relative"]))                # left to the mode
    for argv, env in ((["app"], {"PATH": "/bin"}), (["tool"], {"PATH": "/usr/local/bin"}),
                      (["/opt/app/bin/none"], {})):
        with pytest.raises(PayloadNotFound) as e:
            check_command(spec.replace(argv=argv, env=env))
        assert e.value.exit_code == 127
