"""PMI/PMIx pass-through from launcher environments as Slurm, Open MPI's mpirun and MPICH's
hydra set them (values taken from the Slurm lab notes), over a fabricated host tree."""

import subprocess
import sys
from pathlib import Path

from uctr_batch.inject import InjectionPlan, pmi_plan
from uctr_batch.inject.pmi import flavour, shared_dirs


def _slurm_env(root, job="41", step="0", uid="1003"):
    spool = root / "var/spool/slurmd/node1"
    server = spool / ("pmix.%s.%s" % (job, step))
    server.mkdir(parents=True)
    appdir = root / "tmp" / ("spmix_appdir_%s_%s.%s" % (uid, job, step))
    appdir.mkdir(parents=True)
    env = {
        "SLURM_JOB_ID": job,
        "SLURM_STEP_ID": step,
        "SLURM_JOB_UID": uid,
        "SLURM_PROCID": "0",
        "PMIX_RANK": "0",
        "PMIX_NAMESPACE": "slurm.pmix.%s.%s" % (job, step),
        "PMIX_SERVER_TMPDIR": "/var/spool/slurmd/node1/pmix.%s.%s" % (job, step),
        "PMIX_DSTORE_21_BASE_PATH": "/var/spool/slurmd/node1/pmix.%s.%s/pmix_dstor_ds21_1"
        % (job, step),
        "PMIX_SERVER_URI41": "pmix-server.123;tcp4://127.0.0.1:40123",
        "PMIX_SECURITY_MODE": "native",
        "PMIX_GDS_MODULE": "ds21,ds12,hash",
        "PMIX_PTL_MODULE": "tcp,usock",
        "PMIX_MCA_gds": "hash",  # already chosen by the user: never overridden
        "HOME": "/home/u",
    }
    return env, server, appdir


def test_slurm_pmix_step(tmp_path):
    env, server, appdir = _slurm_env(tmp_path)
    plan = pmi_plan(env, host_root=str(tmp_path))
    binds = {b.dst: b for b in plan.binds}
    assert set(binds) == {env["PMIX_SERVER_TMPDIR"], "/tmp/spmix_appdir_1003_41.0"}
    assert binds[env["PMIX_SERVER_TMPDIR"]].src == str(server)
    assert binds["/tmp/spmix_appdir_1003_41.0"].src == str(appdir)
    assert all(not b.ro and b.kind == "dir" for b in plan.binds)
    # The dstore path lies inside the server dir: no nested second bind.
    assert plan.env == {"PMIX_MCA_ptl": "tcp,usock", "PMIX_MCA_psec": "native"}
    assert "PMIX_MCA_gds" not in plan.env
    assert plan.host_network
    assert "HOME" not in plan.passthrough_env
    assert {"SLURM_JOB_ID", "PMIX_RANK", "PMIX_SERVER_URI41", "PMIX_MCA_ptl"} <= set(
        plan.passthrough_env
    )
    assert plan.keep_fds == []
    assert flavour(env) == "pmix"


def test_old_slurm_appdir_name_and_policy_spool(tmp_path):
    (tmp_path / "scratch/tmpfs/spmix_appdir_7.2").mkdir(parents=True)
    (tmp_path / "spool/pmix.7.2").mkdir(parents=True)
    env = {"SLURM_JOB_ID": "7", "SLURM_STEP_ID": "2", "PMIX_RANK": "3"}
    policy = {"slurmd_spool_dir": "/spool", "slurm_tmpfs": "/scratch/tmpfs"}
    assert shared_dirs(env, str(tmp_path), policy) == [
        "/spool/pmix.7.2",
        "/scratch/tmpfs/spmix_appdir_7.2",
    ]
    # Without the policy hints nothing exists at the default places.
    assert shared_dirs(env, str(tmp_path)) == []


def test_slurm_appdir_in_tmpfs_from_slurm_conf(tmp_path):
    """Slurm makes the PMIx client dir in its TmpFS (here with %n), which the job environment
    does not name: Open MPI's MPI_Init failed (session_dir.c) creating its job session dir
    there in a read-only rootfs, as the directory was not bound."""
    env, _, _ = _slurm_env(tmp_path)
    env.update(SLURM_CONF="/etc/slurm/slurm.conf", SLURMD_NODENAME="node1", TMPDIR="/tmp")
    appdir = tmp_path / "var/lib/slurm-tmp/node1/spmix_appdir_1003_41.0"
    appdir.mkdir(parents=True)
    conf = tmp_path / "etc/slurm/slurm.conf"
    conf.parent.mkdir(parents=True)
    conf.write_text("# TmpFS=/wrong\nClusterName=lab\nTmpFS=/var/lib/slurm-tmp/%n  # per node\n"
                    "NodeName=node1 CPUs=2\n")
    dst = "/var/lib/slurm-tmp/node1/spmix_appdir_1003_41.0"
    assert dst in shared_dirs(env, str(tmp_path))
    assert {b.dst: b.src for b in pmi_plan(env, str(tmp_path)).binds}[dst] == str(appdir)
    # mpi.conf's PMIxCliTmpDirBase moves the dir; SLURM_PMIX_TMPDIR moves it again.
    (tmp_path / "etc/slurm/mpi.conf").write_text("PMIxCliTmpDirBase=/scratch\n")
    (tmp_path / "scratch/spmix_appdir_1003_41.0").mkdir(parents=True)
    assert "/scratch/spmix_appdir_1003_41.0" in shared_dirs(env, str(tmp_path))
    env["SLURM_PMIX_TMPDIR"] = "/elsewhere"
    (tmp_path / "elsewhere/spmix_appdir_1003_41.0").mkdir(parents=True)
    assert "/elsewhere/spmix_appdir_1003_41.0" in shared_dirs(env, str(tmp_path))


def test_pmi2_fd_is_kept_open():
    env = {
        "PMI_FD": "5",
        "PMI_RANK": "1",
        "PMI_SIZE": "4",
        "PMI_JOBID": "9.0",
        "SLURM_STEP_ID": "0",
    }
    plan = pmi_plan(env, host_root="/nonexistent")
    assert plan.keep_fds == [5]
    assert plan.binds == []
    assert not plan.host_network  # a socketpair from slurmstepd, no TCP
    assert flavour(env) == "pmi"
    bad = pmi_plan({"PMI_FD": "five"}, host_root="/nonexistent")
    assert bad.keep_fds == [] and bad.warnings


def test_hydra_and_mpirun(tmp_path):
    hydra = {
        "PMI_PORT": "node1:45123",
        "PMI_RANK": "0",
        "PMI_SIZE": "2",
        "MPI_LOCALRANKID": "0",
        "MPI_LOCALNRANKS": "2",
    }
    plan = pmi_plan(hydra, host_root=str(tmp_path))
    assert plan.host_network and flavour(hydra) == "pmi"
    assert {"PMI_PORT", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"} <= set(plan.passthrough_env)
    session = tmp_path / "tmp/ompi.node1.1000"
    (session / "pid.77").mkdir(parents=True)
    mpirun = {
        "OMPI_COMM_WORLD_RANK": "0",
        "PMIX_RANK": "0",
        "PMIX_SERVER_TMPDIR": "/tmp/ompi.node1.1000/pid.77",
        "OMPI_MCA_orte_top_session_dir": "/tmp/ompi.node1.1000",
        "PMIX_SYSTEM_TMPDIR": "/tmp",
        "PMIX_SERVER_URI4": "x;tcp4://127.0.0.1:1",
    }
    plan = pmi_plan(mpirun, host_root=str(tmp_path))
    # The session dir holds the server dir; /tmp itself is never bound.
    assert [(b.dst, b.src) for b in plan.binds] == [("/tmp/ompi.node1.1000", str(session))]


def test_munge_socket_per_policy(tmp_path):
    (tmp_path / "run/munge").mkdir(parents=True)
    (tmp_path / "var").mkdir()
    (tmp_path / "var/run").symlink_to("../run")
    assert pmi_plan({}, str(tmp_path)).binds == []
    plan = pmi_plan({}, str(tmp_path), {"munge": True})
    assert [(b.src, b.dst, b.ro) for b in plan.binds] == [
        (str(tmp_path / "run/munge"), "/run/munge", True)
    ]
    missing = pmi_plan({}, str(tmp_path / "empty"), {"munge": True})
    assert missing.binds == [] and any("munge" in m.reason for m in missing.manifest)


def test_plan_merges_and_round_trips(tmp_path):
    env, _, _ = _slurm_env(tmp_path)
    env["PMI_FD"] = "7"
    plan = pmi_plan(env, host_root=str(tmp_path))
    again = InjectionPlan.from_json(plan.to_json())
    assert again == plan
    merged = InjectionPlan().merge(plan).merge(again)
    assert merged.keep_fds == [7] and len(merged.binds) == len(plan.binds)
    assert merged.info["pmi"] == {"flavour": "pmix"}


def test_resolved_node_policy(tmp_path):
    from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body

    def policy(body):
        return NodePolicy.from_body(
            merge_body(builtin_body(), body),
            {},
            node="n1",
            partition=None,
            features=(),
            class_name=None,
            reason="test",
        )

    (tmp_path / "var/lib/munge-sock").mkdir(parents=True)
    env, server, _ = _slurm_env(tmp_path)
    plan = pmi_plan(
        env,
        str(tmp_path),
        policy({"munge": True, "munge_socket": "/var/lib/munge-sock/munge.socket.2"}),
    )
    assert ("/var/lib/munge-sock", False) in [(b.dst, not b.ro) for b in plan.binds]
    assert env["PMIX_SERVER_TMPDIR"] in {b.dst for b in plan.binds}
    off = pmi_plan(env, str(tmp_path), policy({"pmix": False}))
    assert off.binds == [] and off.env == {} and off.passthrough_env  # variables still pass


def test_reading_a_cached_plan_stays_lean():
    """uctr-exec reads a cached plan per rank: only plan.py may load, and no yaml, requests
    or jsonschema."""
    code = (
        "import sys\n"
        "from uctr_batch.inject import InjectionPlan\n"
        "InjectionPlan.from_json(InjectionPlan().to_json())\n"
        "heavy = ('yaml', 'requests', 'jsonschema')\n"
        "mine = 'uctr_batch.inject.'\n"
        "print(' '.join(sorted(m for m in sys.modules\n"
        "                      if m.split('.')[0] in heavy or m.startswith(mine))))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    ).stdout
    assert out.split() == ["uctr_batch.inject.plan"]


# -- gds modules both sides have (a PMIx 4.2 image under a PMIx 5 server) ----------------------

def _image_with_pmix(root: Path, builtin, dsos=(), libdir="usr/lib/x86_64-linux-gnu"):
    """An image tree whose libpmix names its built-in gds components as PMIx's build does
    (symbols pmix_mca_gds_NAME_component), plus component DSOs beside it."""
    lib = root / libdir
    lib.mkdir(parents=True)
    symbols = (b"\0pmix_mca_gds_%s_component\0" % n.encode() for n in builtin)
    body = b"\x7fELF junk" + b"".join(symbols)
    (lib / "libpmix.so.2.6.2").write_bytes(body)
    (lib / "libpmix.so.2").symlink_to("libpmix.so.2.6.2")
    if dsos:
        (lib / "pmix").mkdir()
        for name in dsos:
            (lib / "pmix" / ("mca_gds_%s.so" % name)).write_bytes(b"\x7fELF")
    return str(root)


def _pmix5_server_env():
    return {"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.5.0", "PMIX_GDS_MODULE": "shmem2,hash"}


def test_gds_the_image_lacks_is_left_out(tmp_path):
    image = _image_with_pmix(tmp_path / "image", ["hash", "ds12", "ds21"])
    plan = pmi_plan(_pmix5_server_env(), host_root=str(tmp_path), image_root=image)
    assert plan.env["PMIX_MCA_gds"] == "hash"
    assert "PMIX_MCA_gds" in plan.passthrough_env
    reasons = [e.reason for e in plan.manifest if e.subject == "PMIX_MCA_gds"]
    assert reasons == ["set from PMIX_GDS_MODULE=shmem2,hash, less what the image's PMIx "
                       "lacks (it has ds12, ds21, hash)"]


def test_gds_unchanged_when_the_image_has_every_module(tmp_path):
    image = _image_with_pmix(tmp_path / "image", ["hash"], dsos=["shmem2"])
    plan = pmi_plan(_pmix5_server_env(), host_root=str(tmp_path), image_root=image)
    assert plan.env["PMIX_MCA_gds"] == "shmem2,hash"


def test_gds_unchanged_without_a_readable_libpmix(tmp_path):
    (tmp_path / "image" / "usr/lib").mkdir(parents=True)
    image = str(tmp_path / "image")
    plan = pmi_plan(_pmix5_server_env(), host_root=str(tmp_path), image_root=image)
    assert plan.env["PMIX_MCA_gds"] == "shmem2,hash"


def test_gds_none_in_common_falls_back_to_hash(tmp_path):
    image = _image_with_pmix(tmp_path / "image", ["hash", "ds21"])
    env = dict(_pmix5_server_env(), PMIX_GDS_MODULE="shmem2")
    assert pmi_plan(env, host_root=str(tmp_path), image_root=image).env["PMIX_MCA_gds"] == "hash"


def test_gds_user_choice_is_never_overridden(tmp_path):
    image = _image_with_pmix(tmp_path / "image", ["hash", "ds21"])
    env = dict(_pmix5_server_env(), PMIX_MCA_gds="shmem2")
    assert "PMIX_MCA_gds" not in pmi_plan(env, host_root=str(tmp_path), image_root=image).env


def test_gds_image_symlinks_stay_inside_the_image(tmp_path):
    """An image whose usr/lib points at this machine's /usr/lib is read inside the image."""
    image = tmp_path / "image"
    image.mkdir()
    (image / "usr").symlink_to("/usr")
    plan = pmi_plan(_pmix5_server_env(), host_root=str(tmp_path), image_root=str(image))
    assert plan.env["PMIX_MCA_gds"] == "shmem2,hash"  # nothing read from the host's libpmix
