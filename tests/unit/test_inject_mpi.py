"""Host MPI injection decisions on real ELF libraries compiled here: a fabricated host tree and
small image roots, each with an ld.so.cache written by ldconfig -r. No mocks: the plan is
computed from the files exactly as on a node."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.unit.inject_util import (
    GCC,
    NEEDS_FUTURE,
    build_lib,
    ldconfig,
    libdir,
    make_root,
    needs_toolchain,
    stub_libc,
)
from uctr_batch.errors import ConfigError
from uctr_batch.inject import LIB_DIR, InjectionPlan, mpi_plan
from uctr_batch.inject.mpi import (
    MPICH_ABI,
    OPENMPI,
    abi_verdict,
    canonical,
    family_of,
    is_core,
)
from uctr_batch.inject.plan import REFUSE, STEP

RUNNING_GLIBC = os.confstr("CS_GNU_LIBC_VERSION").split()[1]


# -- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, image, rule, ok, partial, words",
    [
        ((40, 30, 4), (40, 20, 0), "major", True, False, "rule major"),
        ((40, 30, 4), (40, 20, 0), "full", True, False, ">="),
        ((40, 10), (40, 20, 0), "full", True, True, "partial"),
        ((40, 30, 4), (40, 20, 0), "strict", False, False, "strict"),
        ((40, 30, 4), (40, 30, 1), "strict", True, False, "equal"),
        ((12,), (12, 0), "strict", True, False, "equal"),  # a missing minor counts as 0
        ((12, 1), (12,), "full", True, False, ">="),
        ((40, 30), (20, 10), "major", False, False, "major 40 (host) != 20 (image)"),
        ((), (40,), "major", False, False, "no major"),
        ((40,), (), "full", False, False, "no major"),
    ],
)
def test_abi_rule_table(host, image, rule, ok, partial, words):
    v = abi_verdict(host, image, rule)
    assert (v.ok, v.partial) == (ok, partial)
    assert words in v.reason


def test_abi_rule_unknown():
    with pytest.raises(ConfigError):
        abi_verdict((1,), (1,), "loose")


@pytest.mark.parametrize(
    "name, needed, family",
    [
        ("libmpi.so.40", (), OPENMPI),
        ("libmpi.so.20", (), OPENMPI),
        ("libmpi.so.12", (), MPICH_ABI),
        ("libmpi.so.12", ("libopen-rte.so.12", "libc.so.6"), OPENMPI),  # Open MPI 1.10
        ("libmpich.so.12", (), MPICH_ABI),
        ("libopen-pal.so.80", (), OPENMPI),
        ("libfabric.so.1", (), None),
        ("libmpi.so.99", (), None),
    ],
)
def test_family_table(name, needed, family):
    assert family_of(name, needed) == family


def test_core_and_canonical_names():
    assert is_core("libmpi_cxx.so.40", OPENMPI) and is_core("libmca_common_ofi.so.10", OPENMPI)
    assert not is_core("libmpi_cxx.so.40", MPICH_ABI)  # an Open MPI library beside MPICH
    assert is_core("libmpichfort.so.12", MPICH_ABI) and not is_core("libfabric.so.1", MPICH_ABI)
    assert (
        canonical("libmpich.so.12", MPICH_ABI)
        == canonical("libmpi.so.12", MPICH_ABI)
        == "libmpi.so"
    )
    assert canonical("libmpich.so.12", OPENMPI) == "libmpich.so"


# -- fabricated host and images ---------------------------------------------------------------


def _lib(root):
    return root / libdir().lstrip("/")


def _ompi(lib_dir, label, mpi_version, pal_version, extra_link=(), extra=()):
    pal = build_lib(lib_dir, "libopen-pal.so.40", pal_version, label)
    return build_lib(
        lib_dir, "libmpi.so.40", mpi_version, label, link=[pal] + list(extra_link), extra=extra
    )


@pytest.fixture
def host(tmp_path):
    """A host with an Open MPI-like stack: libmpi -> libopen-pal, libfabric as a dependency."""
    root = make_root(tmp_path / "host", glibc=False)
    fabric = build_lib(_lib(root), "libfabric.so.1", "18.0", "host")
    _ompi(_lib(root), "host", "30.4", "30.2", extra_link=[fabric])
    ldconfig(root)
    return root


def _image(tmp_path, name="image", mpi="20.0", pal="20.1", fabric=None, glibc=True):
    root = make_root(tmp_path / name, glibc=glibc)
    if mpi:
        _ompi(_lib(root), "image", mpi, pal)
    if fabric:
        build_lib(_lib(root), "libfabric.so.1", fabric, "image")
    ldconfig(root)
    return root


def _binds(plan):
    return {b.dst: b.src for b in plan.binds}


def _steps(plan):
    return [(m.subject, m.reason) for m in plan.manifest if m.action == STEP]


@needs_toolchain
def test_full_swap_binds_host_libs_over_the_image(tmp_path, host):
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "full", plan.summary_lines()
    binds = _binds(plan)
    lib = libdir()
    assert binds[lib + "/libmpi.so.40.20.0"] == str(_lib(host) / "libmpi.so.40.30.4")
    assert binds[lib + "/libopen-pal.so.40.20.1"] == str(_lib(host) / "libopen-pal.so.40.30.2")
    # The image has no libfabric: the host's goes to the dedicated dir, first on the path.
    assert binds[LIB_DIR + "/libfabric.so.1"] == str(_lib(host) / "libfabric.so.1.18.0")
    assert plan.ld_library_path == [LIB_DIR]
    assert plan.no_injection is None and not plan.warnings
    assert plan.info["mpi"]["image_family"] == plan.info["mpi"]["host_family"] == OPENMPI
    env = plan.apply_env({"LD_LIBRARY_PATH": "/opt/x"})
    assert env["LD_LIBRARY_PATH"] == LIB_DIR + ":/opt/x"
    # Every bound file is in the manifest with its reason.
    bound = {m.subject for m in plan.manifest if m.action == "bind"}
    assert bound == set(binds)


@needs_toolchain
def test_full_rule_partial_when_host_minor_is_older(tmp_path, host):
    image = _image(tmp_path, mpi="31.0")
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "full"
    assert any("partial" in w and "libmpi.so.40" in w for w in plan.warnings)
    assert libdir() + "/libmpi.so.40.31.0" in _binds(plan)


def _profile(**kw):
    base = {
        "family": "openmpi",
        "libs": [libdir() + "/libmpi.so.40", libdir() + "/libopen-pal.so.40"],
        "dependency_libs": ["libfabric"],
    }
    base.update(kw)
    return {"mpi_profiles": {"site": base}}


@needs_toolchain
def test_strict_rule_refuses_then_fabric_only(tmp_path, host):
    image = _image(tmp_path, fabric="10.0")
    plan = mpi_plan(str(image), "site", _profile(abi_check="strict"), host_root=str(host))
    assert plan.mpi_level == "fabric", plan.summary_lines()
    steps = dict(_steps(plan))
    assert "minor 30 (host) != 20 (image), rule strict" in steps["full swap refused"]
    binds = _binds(plan)
    assert binds == {libdir() + "/libfabric.so.1.10.0": str(_lib(host) / "libfabric.so.1.18.0")}
    assert any("only the fabric libraries were bound" in w for w in plan.warnings)


@needs_toolchain
def test_fabric_refused_when_host_copy_is_older(tmp_path, host):
    image = _image(tmp_path, fabric="20.1")
    plan = mpi_plan(str(image), "site", _profile(abi_check="strict"), host_root=str(host))
    assert plan.mpi_level == "none"
    assert plan.binds == []
    refusals = [m.reason for m in plan.manifest if m.action == REFUSE]
    assert any("host libfabric.so.1 1.18.0 is older than the image's 1.20.1" in r for r in refusals)
    assert any(s == "none" and "image MPI untouched" in r for s, r in _steps(plan))


@needs_toolchain
def test_major_mismatch_is_refused(tmp_path, host):
    image = make_root(tmp_path / "image")
    build_lib(_lib(image), "libmpi.so.20", "10.0", "image")
    ldconfig(image)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "none"
    assert "major 40 (host) != 20 (image)" in dict(_steps(plan))["full swap refused"]
    refused = [m for m in plan.manifest if m.action == REFUSE]
    assert refused and refused[0].src is None and "libmpi.so.40" in refused[0].reason


@needs_toolchain
def test_family_mismatch_is_refused(tmp_path, host):
    image = make_root(tmp_path / "image")
    build_lib(_lib(image), "libmpi.so.12", "1.0", "image")  # an MPICH-ABI library
    ldconfig(image)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "none"
    reason = dict(_steps(plan))["full swap refused"]
    assert "host MPI family openmpi" in reason and "mpich-abi (libmpi.so.12)" in reason
    assert plan.binds == []


@needs_toolchain
def test_mpich_names_pair_libmpich_with_libmpi(tmp_path):
    host = make_root(tmp_path / "host", glibc=False)
    build_lib(_lib(host), "libmpich.so.12", "2.2", "host")
    ldconfig(host)
    image = make_root(tmp_path / "image")
    build_lib(_lib(image), "libmpi.so.12", "1.0", "image")
    ldconfig(image)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "full"
    assert _binds(plan) == {libdir() + "/libmpi.so.12.1.0": str(_lib(host) / "libmpich.so.12.2.2")}


@needs_toolchain
def test_glibc_check_refuses_a_library_needing_a_newer_glibc(tmp_path):
    host = make_root(tmp_path / "host", glibc=False)
    stub = stub_libc(tmp_path / "stub")
    pal = build_lib(_lib(host), "libopen-pal.so.40", "30.2", "host")
    mpi = build_lib(
        _lib(host), "libmpi.so.40", "30.4", "host", link=[pal, stub], symbols=NEEDS_FUTURE
    )
    ldconfig(host)
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "none"
    refusal = [m for m in plan.manifest if m.action == REFUSE and m.subject == str(mpi)]
    assert refusal, plan.summary_lines()
    expected = "needs GLIBC_2.99 (from libc.so.6); the image's glibc is %s" % RUNNING_GLIBC
    assert refusal[0].reason == expected
    assert expected in dict(_steps(plan))["full swap refused"]
    assert plan.binds == []
    # The dynamic loader agrees: this glibc cannot load it. In a child, with the stand-in
    # libopen-pal found first (not the host's, which may have another soname or none).
    load = subprocess.run([sys.executable, "-c", f"import ctypes; ctypes.CDLL({str(mpi)!r})"],
                          env=dict(os.environ, LD_LIBRARY_PATH=str(_lib(host))),
                          capture_output=True, text=True)
    assert load.returncode != 0 and "GLIBC_2.99" in load.stderr, load.stderr


@needs_toolchain
def test_missing_needed_library_is_added_from_the_host(tmp_path):
    host = make_root(tmp_path / "host", glibc=False)
    extra = build_lib(_lib(host), "libextra.so.3", "0.1", "host")
    _ompi(_lib(host), "host", "30.4", "30.2", extra_link=[extra])
    ldconfig(host)
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "full"
    assert _binds(plan)[LIB_DIR + "/libextra.so.3"] == str(extra)
    why = [m.reason for m in plan.manifest if m.subject == LIB_DIR + "/libextra.so.3"]
    assert "needed by libmpi.so.40" in why[0]


@needs_toolchain
def test_unresolvable_needed_library_refuses_the_swap(tmp_path):
    host = make_root(tmp_path / "host", glibc=False)
    gone = build_lib(tmp_path / "elsewhere", "libgone.so.1", "0", "host")
    _ompi(_lib(host), "host", "30.4", "30.2", extra_link=[gone])
    ldconfig(host)
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.mpi_level == "none"
    assert (
        "libmpi.so.40 needs libgone.so.1, found neither in the image nor on the host"
        in dict(_steps(plan))["full swap refused"]
    )


@needs_toolchain
def test_plugin_directory_travels_with_its_library(tmp_path, host):
    plugins = _lib(host) / "openmpi"
    build_lib(plugins, "mca_btl_x.so", "0", "host")
    (plugins / "mca_btl_x.so.0").rename(plugins / "mca_btl_x.so")
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    dirs = {b.dst: b for b in plan.binds if b.kind == "dir"}
    assert libdir() + "/openmpi" in dirs
    assert dirs[libdir() + "/openmpi"].src == str(plugins) and dirs[libdir() + "/openmpi"].ro


@needs_toolchain
def test_image_mpi_found_through_the_application(tmp_path, host):
    image = make_root(tmp_path / "image")
    app_lib = image / "opt/app/lib"
    _ompi(app_lib, "image", "20.0", "20.1")
    ldconfig(image)  # /opt/app/lib is not in ld.so.conf: the cache does not know it
    app = image / "opt/app/bin/app"
    app.parent.mkdir(parents=True)
    src = tmp_path / "app.c"
    src.write_text(
        "const char *uctr_id_libmpi_so(void);\nint main(void){return !uctr_id_libmpi_so();}\n"
    )
    subprocess.run(
        [
            GCC,
            "-o",
            str(app),
            str(src),
            "-Wl,--no-as-needed",
            str(app_lib / "libmpi.so.40"),
            "-Wl,-rpath,$ORIGIN/../lib",
            "-Wl,--enable-new-dtags",
        ],
        check=True,
    )
    none = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert none.mpi_level == "none" and "nothing to replace" in dict(_steps(none))["none"]
    plan = mpi_plan(str(image), "auto", None, host_root=str(host), app=["/opt/app/bin/app"])
    assert plan.mpi_level == "full"
    assert "/opt/app/lib/libmpi.so.40.20.0" in _binds(plan)
    assert "DT_NEEDED" in plan.info["mpi"]["image_mpi"]


@needs_toolchain
def test_musl_image_gets_no_injection(tmp_path, host):
    image = make_root(tmp_path / "image", glibc=False)
    (image / "usr/lib/ld-musl-x86_64.so.1").write_bytes(b"\x7fELF")
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.no_injection and "musl" in plan.no_injection
    assert plan.mpi_level == "none" and plan.binds == []


@needs_toolchain
@pytest.mark.skipif(not os.path.exists("/bin/busybox"), reason="busybox-static not installed")
def test_static_image_and_static_app(tmp_path, host):
    image = tmp_path / "static"
    (image / "bin").mkdir(parents=True)
    shutil.copy("/bin/busybox", image / "bin/busybox")
    plan = mpi_plan(str(image), "auto", None, host_root=str(host))
    assert plan.no_injection and "no glibc" in plan.no_injection and "static" in plan.no_injection
    glibc_image = _image(tmp_path)
    shutil.copy("/bin/busybox", glibc_image / "usr/bin/busybox")
    plan = mpi_plan(str(glibc_image), "auto", None, host_root=str(host), app=["/bin/busybox"])
    assert plan.no_injection == (
        "/bin/busybox is statically linked: host libraries cannot replace its MPI"
    )
    assert plan.binds == []


@needs_toolchain
def test_profile_extras_and_none(tmp_path, host):
    (host / "etc/fabric.conf").write_text("x\n")
    policy = _profile(
        binds=["/etc/fabric.conf:/etc/fabric.conf:ro", {"src": "/nope", "dst": "/x"}],
        devices=["/dev/cxi0"],
        env={"FI_PROVIDER": "cxi"},
    )
    image = _image(tmp_path)
    plan = mpi_plan(str(image), "site", policy, host_root=str(host))
    assert plan.mpi_level == "full"
    assert _binds(plan)["/etc/fabric.conf"] == str(host / "etc/fabric.conf")
    refused = {m.subject: m.reason for m in plan.manifest if m.action == REFUSE}
    assert "does not exist" in refused["/x"] and "does not exist" in refused["/dev/cxi0"]
    assert plan.env == {"FI_PROVIDER": "cxi"}
    assert plan.apply_env({"FI_PROVIDER": "verbs"})["FI_PROVIDER"] == "cxi"
    off = mpi_plan(str(image), "none", policy, host_root=str(host))
    assert off.mpi_level == "none" and off.binds == []


def test_unknown_profile_and_bad_family(tmp_path):
    with pytest.raises(ConfigError) as e:
        mpi_plan(str(tmp_path), "cray", {"mpi_profiles": {"site": {"family": "openmpi"}}})
    assert "unknown MPI profile: cray" in e.value.message and "site" in e.value.hint
    with pytest.raises(ConfigError):
        mpi_plan(str(tmp_path), "bad", {"mpi_profiles": {"bad": {"family": "lam"}}})
    with pytest.raises(ConfigError):
        mpi_plan(
            str(tmp_path), "bad", {"mpi_profiles": {"bad": {"family": "openmpi", "abi_check": "x"}}}
        )


@needs_toolchain
def test_plan_round_trips_through_json(tmp_path, host):
    plan = mpi_plan(str(_image(tmp_path)), "auto", None, host_root=str(host))
    path = tmp_path / "plan.json"
    plan.write(str(path))
    again = InjectionPlan.read(str(path))
    assert again == plan
    assert again.bind_tuples() == [(b.src, b.dst, True) for b in plan.binds]


def _node_policy(body, profiles):
    """A NodePolicy as the policy layer resolves it (attributes, tuples, EnvRules)."""
    from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body

    return NodePolicy.from_body(
        merge_body(builtin_body(), body),
        profiles,
        node="n1",
        partition=None,
        features=(),
        class_name=None,
        reason="test",
    )


@needs_toolchain
def test_resolved_node_policy(tmp_path, host):
    (host / "etc/fabric.d").mkdir()
    profile = {
        "family": "openmpi",
        "libs": [libdir() + "/libmpi.so.40", libdir() + "/libopen-pal.so.40"],
        "abi_check": "strict",
        "env": {
            "set": {"FI_PROVIDER": "cxi"},
            "prepend": {"FI_PATH": "/p"},
            "unset": ["OMPI_MCA_pml"],
        },
        "binds": [{"src": "/etc/fabric.d", "mode": "rw"}, {"src": "/gone", "optional": True}],
    }
    image = _image(tmp_path, fabric="10.0")
    policy = _node_policy({"mpi": {"profile": "site"}}, {"site": dict(profile, abi_check="full")})
    plan = mpi_plan(str(image), None, policy, host_root=str(host))  # None: the class's profile
    assert plan.mpi_level == "full" and plan.info["mpi"]["profile"] == "site"
    fabric = [b for b in plan.binds if b.dst == "/etc/fabric.d"]
    assert fabric and not fabric[0].ro and fabric[0].kind == "dir"
    env = plan.apply_env({"FI_PATH": "/q", "OMPI_MCA_pml": "ob1"})
    assert env["FI_PROVIDER"] == "cxi" and env["FI_PATH"] == "/p:/q" and "OMPI_MCA_pml" not in env
    assert not [m for m in plan.manifest if m.action == REFUSE]  # the optional bind is only noted
    # mpi.fallback: false turns a refused swap into an error instead of the ladder.
    strict = _node_policy({"mpi": {"profile": "site", "fallback": False}}, {"site": profile})
    plan = mpi_plan(str(image), None, strict, host_root=str(host))
    assert plan.mpi_level == "none" and plan.binds == []
    assert (
        plan.errors and "mpi.fallback: false" in plan.errors[0] and "rule strict" in plan.errors[0]
    )
    assert mpi_plan(str(image), None, _node_policy({}, {}), host_root=str(host)).mpi_level == "none"


@needs_toolchain
def test_profile_lib_dirs_outside_the_ld_cache(tmp_path):
    """A site MPI under /opt that the host ld cache does not know, as module systems install it."""
    host = make_root(tmp_path / "host", glibc=False)
    site = host / "opt/mpi/lib"
    fabric = build_lib(host / "opt/fabric/lib", "libfabric.so.1", "18.0", "host")
    _ompi(site, "host", "30.4", "30.2", extra_link=[fabric])
    ldconfig(host)
    image = _image(tmp_path)
    everything = {
        "mpi_profiles": {
            "site": {
                "family": "openmpi",
                "lib_dirs": ["/opt/mpi/lib"],
                "dependency_libs": ["/opt/fabric/lib/libfabric.so.1"],
            }
        }
    }
    named = {
        "mpi_profiles": {
            "site": {
                "family": "openmpi",
                "lib_dirs": ["/opt/mpi/lib"],
                "libs": ["libmpi.so.40"],
                "dependency_libs": ["/opt/fabric/lib/libfabric.so.1"],
            }
        }
    }
    for policy in (everything, named):
        plan = mpi_plan(str(image), "site", policy, host_root=str(host))
        assert plan.mpi_level == "full", plan.summary_lines()
        binds = _binds(plan)
        assert binds[libdir() + "/libmpi.so.40.20.0"] == str(site / "libmpi.so.40.30.4")
        # libopen-pal is found through lib_dirs even when only libmpi is named.
        assert binds[libdir() + "/libopen-pal.so.40.20.1"] == str(site / "libopen-pal.so.40.30.2")
        assert binds[LIB_DIR + "/libfabric.so.1"] == str(fabric)
    missing = {"mpi_profiles": {"site": {"family": "openmpi", "lib_dirs": ["/opt/none"]}}}
    plan = mpi_plan(str(image), "site", missing, host_root=str(host))
    assert plan.mpi_level == "none"
    assert "no libraries in /opt/none" in dict(_steps(plan))["full swap refused"]


def _ucx_stack(root: Path, label: str, link_ucs=()) -> None:
    """libucp -> libucs, with UCX's unversioned file names (libucs.so.0.0.0)."""
    ucs = build_lib(_lib(root), "libucs.so.0", "0.0", label, link=list(link_ucs),
                    symbols=NEEDS_FUTURE if link_ucs else "")
    build_lib(_lib(root), "libucp.so.0", "0.0", label, link=[ucs])


def _host_with_ucx(tmp_path, link_ucs=()) -> Path:
    root = make_root(tmp_path / "host", glibc=False)
    _ucx_stack(root, "host", link_ucs)
    ucp = _lib(root) / "libucp.so.0.0.0"
    _ompi(_lib(root), "host", "30.4", "30.2", extra_link=[ucp])
    ldconfig(root)
    return root


def _image_with_ucx(tmp_path) -> Path:
    image = make_root(tmp_path / "image")
    _ompi(_lib(image), "image", "20.0", "20.1")
    _ucx_stack(image, "image")
    ldconfig(image)
    return image


@needs_toolchain
def test_fabric_library_goes_with_the_hosts_build_of_what_it_needs(tmp_path):
    """The host's libucp is bound with the host's libucs over the image's other build of the
    same file: UCX has no symbol versions, and the host's libucp may need newer symbols."""
    host = _host_with_ucx(tmp_path)
    image = _image_with_ucx(tmp_path)
    plan = mpi_plan(str(image), "site", _profile(abi_check="strict", dependency_libs=["libucp"]),
                    host_root=str(host))
    assert plan.mpi_level == "fabric", plan.summary_lines()
    assert _binds(plan) == {
        libdir() + "/libucp.so.0.0.0": str(_lib(host) / "libucp.so.0.0.0"),
        libdir() + "/libucs.so.0.0.0": str(_lib(host) / "libucs.so.0.0.0"),
    }


@needs_toolchain
def test_fabric_library_refused_when_the_hosts_build_of_a_need_is_refused(tmp_path):
    """Debian trixie host, bookworm image: the host's libucs needs a newer glibc, so the host's
    libucp must not be bound alone over the image's (it would fail with an undefined symbol
    of the image's older libucs)."""
    host = _host_with_ucx(tmp_path, link_ucs=[stub_libc(tmp_path / "stub")])
    image = _image_with_ucx(tmp_path)
    plan = mpi_plan(str(image), "site", _profile(abi_check="strict", dependency_libs=["libucp"]),
                    host_root=str(host))
    assert plan.mpi_level == "none", plan.summary_lines()
    assert plan.binds == []
    refusal = [m.reason for m in plan.manifest
               if m.action == REFUSE and m.subject == str(_lib(host) / "libucp.so.0.0.0")]
    assert refusal and "libucs.so.0" in refusal[0] and "GLIBC_2.99" in refusal[0], refusal


@needs_toolchain
def test_a_need_the_image_has_byte_identical_stays_the_images(tmp_path):
    """An image built from the host's own packages: its identical copy is not bound over."""
    host = _host_with_ucx(tmp_path)
    image = _image_with_ucx(tmp_path)
    shutil.copy(_lib(host) / "libucs.so.0.0.0", _lib(image) / "libucs.so.0.0.0")
    plan = mpi_plan(str(image), "site", _profile(abi_check="strict", dependency_libs=["libucp"]),
                    host_root=str(host))
    assert plan.mpi_level == "fabric", plan.summary_lines()
    assert list(_binds(plan)) == [libdir() + "/libucp.so.0.0.0"]
