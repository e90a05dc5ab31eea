"""Node classes: matching, first match wins, layering on defaults, drop-ins, the example."""

import json
import os

import pytest

from uctr_batch.errors import ConfigError, ModeError
from uctr_batch.policy import (
    DEFAULT_PASSTHROUGH, MODES, NodePolicy, load_policy, match_trace, registry_settings, resolve,
)
from uctr_batch.policy import paths
from uctr_batch.policy.load import schema

from policy_util import EXAMPLE, write_policy

CLASSES = """
    version: 1
    classes:
      - name: gpu-early
        match: {hostlist: "gpu[001-004]"}
      - name: gpu
        match: {hostlist: "gpu[001-128],dgx[1-2]"}
      - name: login
        match: {regex: 'login[0-9]+'}
      - name: bigmem
        match: {features: [bigmem, ssd]}
      - name: short
        match: {partition: [debug, short]}
      - name: batch-cn
        match: {hostlist: "cn[01-10]", partition: batch}
"""

# (node, partition, features, expected class or None)
MATCHES = [
    ("gpu003", None, (), "gpu-early"),        # both gpu classes match: the first wins
    ("gpu005", None, (), "gpu"),
    ("gpu128", None, (), "gpu"),
    ("gpu129", None, (), None),
    ("dgx2", None, (), "gpu"),               # second part of a hostlist
    ("gpu005.cluster.example.org", None, (), "gpu"),  # domain is dropped
    ("login1", None, (), "login"),
    ("login12", None, (), "login"),
    ("xlogin1", None, (), None),             # the regex must match the whole name
    ("login1a", None, (), None),
    ("n1", None, ("bigmem", "ssd", "ib"), "bigmem"),
    ("n1", None, ("bigmem",), None),         # every listed feature is needed
    ("n1", "short", (), "short"),
    ("n1", "debug", ("bigmem", "ssd"), "bigmem"),   # order decides, not specificity
    ("cn05", "batch", (), "batch-cn"),
    ("cn05", "gpu", (), None),               # all criteria of a class must hold
    ("cn11", "batch", (), None),
    ("gpu010", "short", (), "gpu"),
]


@pytest.fixture
def classes_policy(tmp_path):
    return load_policy(write_policy(tmp_path, CLASSES), require_trusted=False)


@pytest.mark.parametrize("node,partition,features,expected", MATCHES)
def test_first_matching_class_wins(classes_policy, node, partition, features, expected):
    np = resolve(classes_policy, node=node, partition=partition, features=features)
    assert np.class_name == expected
    if expected is None:
        assert np.reason == "no class matched: policy defaults apply"
    else:
        assert np.reason.startswith(f'matched class "{expected}" by ')


def test_reason_and_trace_say_why(classes_policy):
    np = resolve(classes_policy, node="cn05", partition="batch", features=())
    assert np.reason == 'matched class "batch-cn" by hostlist cn[01-10] and partition batch'
    trace = match_trace(classes_policy.classes, "cn05", "batch", ())
    assert [(t.class_name, t.matched, t.why) for t in trace] == [
        ("gpu-early", False, "node cn05 is not in hostlist gpu[001-004]"),
        ("gpu", False, "node cn05 is not in hostlist gpu[001-128],dgx[1-2]"),
        ("login", False, "node cn05 does not match regex login[0-9]+"),
        ("bigmem", False, "node lacks feature(s) bigmem,ssd"),
        ("short", False, "partition batch is not debug/short"),
        ("batch-cn", True, "hostlist cn[01-10] and partition batch"),
    ]
    unknown = match_trace(classes_policy.classes, "x", None, ())
    assert unknown[4].why == \
        "no partition known (wants debug/short; outside a job give --partition)"


def test_partition_and_node_default_to_the_job(classes_policy):
    env = {"SLURMD_NODENAME": "cn03", "SLURM_JOB_PARTITION": "batch"}
    np = resolve(classes_policy, features=(), env=env)
    assert (np.node, np.partition, np.class_name) == ("cn03", "batch", "batch-cn")
    np = resolve(classes_policy, node="n1", features=(), env={"PBS_QUEUE": "short"})
    assert (np.partition, np.class_name) == ("short", "short")


LAYERS = """
    version: 1
    defaults:
      modes: [N1, R1, P1]
      user_modes: [N1, P1]
      binds:
        - {src: /etc/localtime}
        - {src: /data, dst: /data}
      devices: [/dev/fuse]
      env:
        set: {A: "1", B: "2"}
        unset: [LD_PRELOAD]
        passthrough: ["UCX_*"]
      storage: {cache_dir: /shared/cache, local_quota: 10G}
      registries:
        allow: ["docker.io/*"]
        deny: ["*:latest"]
        mirrors: {docker.io: ["https://m1"]}
      gpu: {vendor: none}
    classes:
      - name: special
        match: {regex: special}
        modes: [P1]
        binds:
          - {src: /other/data, dst: /data, mode: rw}
          - {src: /opt/site}
        devices: [/dev/fuse, /dev/kvm]
        env:
          set: {B: "3"}
          unset: [PYTHONPATH]
          passthrough: [LANG]
        storage: {local_quota: 1T}
        registries:
          allow: ["quay.io/*"]
          deny: ["quay.io/bad/*"]
        gpu: {cuda_check: ignore}
"""


def test_class_layers_on_defaults(tmp_path):
    policy = load_policy(write_policy(tmp_path, LAYERS), require_trusted=False)
    np = resolve(policy, node="special", partition=None, features=())
    assert np.modes == ("P1",)  # lists replace...
    assert np.user_modes == ("N1", "P1")  # ...keys the class does not set are inherited
    # ...except binds (de-duplicated by dst, the class winning), devices, env.unset,
    # env.passthrough and registries.deny, which accumulate.
    assert [(b.src, b.dst, b.mode) for b in np.binds] == [
        ("/etc/localtime", "/etc/localtime", "ro"), ("/other/data", "/data", "rw"),
        ("/opt/site", "/opt/site", "ro")]
    assert np.devices == ("/dev/fuse", "/dev/kvm")
    assert np.env.set == {"A": "1", "B": "3"}
    assert np.env.unset == ("LD_PRELOAD", "PYTHONPATH")
    assert np.env.passthrough == DEFAULT_PASSTHROUGH + ("UCX_*", "LANG")
    assert np.storage.cache_dir == "/shared/cache"
    assert np.storage.local_quota_bytes == 1024 ** 4
    assert np.registries.allow == ("quay.io/*",)
    assert np.registries.deny == ("*:latest", "quay.io/bad/*")
    assert np.registries.mirrors == {"docker.io": ("https://m1",)}
    assert (np.gpu.vendor, np.gpu.cuda_check) == ("none", "ignore")
    plain = resolve(policy, node="other", partition=None, features=())
    assert plain.class_name is None and plain.modes == ("N1", "R1", "P1")
    assert plain.storage.local_quota_bytes == 10 * 1024 ** 3


def test_no_policy_file_gives_builtin_defaults(tmp_path, monkeypatch):
    missing = tmp_path / "absent" / "policy.yaml"
    monkeypatch.setattr(paths, "DEFAULT_POLICY", missing)
    policy = load_policy(env={})  # trust is required, but there is nothing to trust
    assert policy.builtin
    assert policy.notes == (f"no policy file at {missing}: built-in defaults apply",)
    np = resolve(policy, node="anything", partition=None, features=())
    assert np.modes == MODES and np.user_modes == MODES
    assert np.class_name is None and np.reason == "no site policy: built-in defaults"
    assert np.mpi.profile == "none" and np.env.passthrough == DEFAULT_PASSTHROUGH
    assert np.storage.local_quota_bytes is None and np.binds == ()


def test_dropins_merge_in_lexical_order(tmp_path):
    main = write_policy(tmp_path, """
        version: 1
        defaults:
          modes: [N1, R1]
          binds: [{src: /a}]
          storage: {cache_dir: /c, local_quota: 1G}
        classes:
          - {name: one, match: {regex: "n1"}, modes: [R1]}
          - {name: two, match: {regex: "n.*"}, modes: [P1]}
        mpi_profiles:
          site: {family: openmpi, libs: [libmpi.so.40], abi_check: strict}
        """)
    write_policy(tmp_path, """
        version: 1
        defaults:
          binds: [{src: /b}]
          storage: {local_quota: 2G}
        classes:
          - {name: early, match: {regex: "n2"}, modes: [F1]}
          - {name: two, match: {regex: "n[0-9]"}, modes: [P2]}
        """, "conf.d/10-first.yaml")
    write_policy(tmp_path, """
        version: 1
        classes:
          - {name: late, match: {regex: "n[23]"}, modes: [S1]}
        mpi_profiles:
          site: {family: mpich-abi}
        """, "conf.d/20-second.yaml")
    for ignored in ("README", "30-x.yaml~", ".40-hidden.yaml", "50-x.yml.bak"):
        (tmp_path / "conf.d" / ignored).write_text("not: [valid")
    policy = load_policy(main, require_trusted=False)
    assert policy.sources == (str(main), str(tmp_path / "conf.d/10-first.yaml"),
                              str(tmp_path / "conf.d/20-second.yaml"))
    # New classes of later files go first; a same-named class is replaced where it stands.
    assert [c["name"] for c in policy.classes] == ["late", "early", "one", "two"]
    assert policy.classes[3]["modes"] == ["P2"]
    # defaults: mappings merge key by key, a later list replaces.
    assert policy.defaults["binds"] == [{"src": "/b"}]
    assert policy.defaults["storage"] == {"cache_dir": "/c", "local_quota": "2G"}
    assert policy.defaults["modes"] == ["N1", "R1"]
    # mpi_profiles: replaced whole, so the strict abi_check and libs are gone.
    assert policy.mpi_profiles == {"site": {"family": "mpich-abi"}}
    resolved = {n: resolve(policy, node=n, partition=None, features=()).class_name
                for n in ("n1", "n2", "n3", "n4", "x")}
    assert resolved == {"n1": "one", "n2": "late", "n3": "late", "n4": "two", "x": None}


def test_example_policy_resolves_as_documented():
    """site-config/policy.yaml with its conf.d drop-in, for a few nodes."""
    policy = load_policy(EXAMPLE, require_trusted=False)
    assert [c["name"] for c in policy.classes] == ["debug", "gpu", "login", "bigmem", "cray"]

    gpu = resolve(policy, node="gpu017", partition="batch", features=())
    assert gpu.reason == 'matched class "gpu" by hostlist gpu[001-128]'
    assert gpu.modes == ("N1", "R1") and gpu.user_modes == ("N1", "R1", "P1", "P2")
    assert gpu.devices == ("/dev/fuse", "/dev/nvidia-caps")
    assert gpu.storage.local_dir == "/local/nvme/uctr-${UID}"
    assert gpu.storage.cache_dir == "/shared/uctr/cache"
    assert gpu.storage.local_quota_bytes == 200 * 1024 ** 3
    assert gpu.storage.stage_timeout == 900  # from conf.d/50-example.yaml
    assert (gpu.gpu.vendor, gpu.gpu.cuda_check) == ("nvidia", "error")
    name, profile = gpu.selected_mpi()
    assert (name, profile.family, profile.abi_check) == ("host-openmpi", "openmpi", "major")

    login = resolve(policy, node="login2", partition=None, features=())
    assert login.class_name == "login" and login.modes == ("P1", "P2", "F1")  # the drop-in's
    assert login.registries.allow == () and login.registries.deny == ("docker.io/library/*:latest",)

    debug = resolve(policy, node="n7", partition="debug", features=("bigmem",))
    assert debug.class_name == "debug" and debug.user_modes == MODES
    bigmem = resolve(policy, node="n7", partition="bigmem", features=("bigmem",))
    assert bigmem.class_name == "bigmem" and bigmem.readonly_rootfs
    assert bigmem.storage.local_quota_bytes == 1024 ** 4 and bigmem.selected_mpi() == ("auto", None)

    cray = resolve(policy, node="nid000100", partition="compute", features=())
    assert cray.class_name == "cray" and cray.modes == ("N1",) and cray.user_modes == ()
    assert cray.munge and not cray.mpi.fallback
    assert cray.env.set["OMP_PROC_BIND"] == "spread" and cray.env.set["SITE_NAME"] == "example"
    assert [b.dst for b in cray.binds][-1] == "/var/spool/slurmd"
    name, profile = cray.selected_mpi()
    assert name == "cray-mpich" and profile.devices == ("/dev/cxi0",)
    assert profile.env.prepend == {"LD_LIBRARY_PATH": "/opt/cray/pe/lib64"}
    with pytest.raises(ModeError) as info:
        cray.mode_ladder("N1")
    assert info.value.message == 'mode N1 is not allowed on node nid000100 (class "cray")'
    assert info.value.hint == "modes users may choose here: none; see `uctr policy explain`"

    other = resolve(policy, node="cn001", partition="batch", features=())
    assert other.class_name is None and other.modes == ("N1", "R1", "P1")
    assert other.binds[2].src == "/scratch/${USER}" and other.binds[2].optional
    assert NodePolicy.from_dict(json.loads(json.dumps(other.to_dict()))) == other


def _schema_keys(node, keys):
    if isinstance(node, dict):
        for name, sub in node.get("properties", {}).items():
            keys.add(name)
        for sub in node.values():
            _schema_keys(sub, keys)
    return keys


def _data_keys(node, keys, free_form=("set", "prepend", "append", "mirrors", "mpi_profiles")):
    if isinstance(node, dict):
        for k, v in node.items():
            keys.add(k)
            if k not in free_form:
                _data_keys(v, keys)
            elif k == "mpi_profiles":
                for profile in v.values():
                    _data_keys(profile, keys)
    elif isinstance(node, list):
        for v in node:
            _data_keys(v, keys)
    return keys


def test_example_policy_uses_every_schema_key():
    import yaml

    data = yaml.safe_load(EXAMPLE.read_text())
    missing = _schema_keys(schema(), set()) - _data_keys(data, set())
    assert not missing, f"site-config/policy.yaml does not show: {sorted(missing)}"


def test_mode_ladder_user_override():
    np = resolve(load_policy(EXAMPLE, require_trusted=False), node="cn001", partition="batch",
                 features=())
    assert np.mode_ladder() == ("N1", "R1", "P1")
    assert np.mode_ladder("P2") == ("P2",)  # allowed although not on the ladder
    with pytest.raises(ModeError) as info:
        np.mode_ladder("F1")
    assert info.value.message == "mode F1 is not allowed on node cn001 (policy defaults)"
    assert info.value.hint == \
        "modes users may choose here: N1, R1, P1, P2; see `uctr policy explain`"
    with pytest.raises(ModeError, match="unknown mode: X1"):
        np.mode_ladder("X1")
    with pytest.raises(ConfigError, match="unknown MPI profile: nope"):
        np.selected_mpi("nope")
    assert np.selected_mpi("cray-mpich")[1].family == "mpich-abi"


def test_registry_settings_come_from_the_policy():
    np = resolve(load_policy(EXAMPLE, require_trusted=False), node="cn001", partition=None,
                 features=())
    cfg = registry_settings(np)
    assert cfg.allow == ("docker.io/library/*", "registry.example.org/*", "ghcr.io/*")
    assert cfg.deny == ("docker.io/library/*:latest",)
    assert cfg.mirrors == {
        "docker.io": ("https://mirror.example.org", "https://mirror2.example.org")}
    assert cfg.insecure == ("registry.cluster.local:5000",)
    assert cfg.ca_file == "/etc/ssl/certs/ca-certificates.crt"


def test_features_come_from_scontrol_when_not_given(classes_policy, tmp_path, monkeypatch):
    """A recorded `scontrol show node -o` line, played back by a stand-in on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "scontrol"
    fake.write_text(
        "#!/bin/sh\n"
        '[ "$*" = "show node -o n42" ] || exit 1\n'
        "echo 'NodeName=n42 Arch=x86_64 CoresPerSocket=32 AvailableFeatures=bigmem,ssd,ib "
        "ActiveFeatures=bigmem,ssd Gres=(null) NodeAddr=n42 State=IDLE'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    np = resolve(classes_policy, node="n42", partition="batch")
    assert np.features == ("bigmem", "ssd") and np.class_name == "bigmem"
    # Another node: the stand-in fails, as scontrol does for unknown nodes -> no features.
    assert resolve(classes_policy, node="n43", partition="batch").features == ()
