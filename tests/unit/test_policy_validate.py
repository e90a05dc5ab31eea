"""Policy validation: every kind of mistake is reported with file:line, key path and hint."""

import pytest

from uctr_batch.errors import ConfigError
from uctr_batch.policy import PolicyInvalid, check_file, load_policy

from policy_util import write_policy

# (id, YAML, expected "LINE: path: message" of the first problem, expected hint or None)
CASES = [
    ("unknown key, close match", """
        version: 1
        defaults:
          modes: [N1]
          bnids: []
        """, "4: defaults.bnids: unknown key 'bnids'", "did you mean 'binds'?"),
    ("unknown top-level key", """
        version: 1
        clases: []
        """, "2: clases: unknown key 'clases'", "did you mean 'classes'?"),
    ("unknown key, nothing close", """
        version: 1
        defaults:
          storage:
            zzz: 1
        """, "4: defaults.storage.zzz: unknown key 'zzz'",
     "valid keys here: cache_dir, local_dir, local_quota, stage_timeout"),
    ("unknown match key", """
        version: 1
        classes:
          - name: a
            match:
              hostlists: "n[1-2]"
        """, "5: classes[0].match.hostlists: unknown key 'hostlists'", "did you mean 'hostlist'?"),
    ("bad mode name", """
        version: 1
        classes:
          - name: a
            match: {regex: a}
          - name: b
            match: {regex: b}
            modes:
              - N1
              - N9
        """, "9: classes[1].modes[1]: 'N9' is not one of N1, R1, P1, P2, F1, S1",
     "N1 native userns, R1 crun/runc rootless, P1 proot, P2 proot without seccomp, "
     "F1 fakechroot, S1 apptainer/singularity"),
    ("bad quota string", """
        version: 1
        defaults:
          storage:
            local_quota: 20 gigs
        """, "4: defaults.storage.local_quota: invalid value '20 gigs'",
     "write a size in bytes with an optional K, M, G, T or P suffix (powers of 1024), e.g. 20G"),
    ("modes is not a list", """
        version: 1
        defaults:
          modes: N1
        """, "3: defaults.modes: expected a list, got a string", None),
    ("munge is not a boolean", """
        version: 1
        defaults:
          munge: "yes"
        """, "3: defaults.munge: expected true or false, got a string", None),
    ("binds is a mapping", """
        version: 1
        defaults:
          binds:
            src: /x
        """, "3: defaults.binds: expected a list, got a mapping", None),
    ("stage_timeout not a number", """
        version: 1
        defaults:
          storage: {stage_timeout: soon}
        """, "3: defaults.storage.stage_timeout: expected a number, got a string", None),
    ("stage_timeout zero", """
        version: 1
        defaults:
          storage: {stage_timeout: 0}
        """, "3: defaults.storage.stage_timeout: 0 is too small (must be more than 0)", None),
    ("env value not a string", """
        version: 1
        defaults:
          env:
            set:
              OMP_NUM_THREADS: 4
        """, "5: defaults.env.set.OMP_NUM_THREADS: expected a string, got an integer", None),
    ("bad env name", """
        version: 1
        defaults:
          env:
            unset: [GOOD, 9BAD]
        """, "4: defaults.env.unset[1]: invalid value '9BAD'",
     "environment variable names use letters, digits and '_', not starting with a digit"),
    ("bad env name as a key", """
        version: 1
        defaults:
          env:
            set:
              A-B: x
        """, "5: defaults.env.set.A-B: invalid name 'A-B'",
     "environment variable names use letters, digits and '_', not starting with a digit"),
    ("bind mode", """
        version: 1
        defaults:
          binds:
            - {src: /a, mode: wr}
        """, "4: defaults.binds[0].mode: 'wr' is not one of ro, rw", None),
    ("relative bind source", """
        version: 1
        defaults:
          binds:
            - src: data
        """, "4: defaults.binds[0].src: invalid value 'data'",
     "write an absolute path (it may use ${UID}, ${USER}, ... see docs/policy.md)"),
    ("wrong version", """
        version: 2
        """, "1: version: 2 is not 1",
     "this uctr-batch reads policy version 1: write 'version: 1'"),
    ("missing version", """
        defaults: {munge: true}
        """, "1: missing required key 'version'", None),
    ("class without match", """
        version: 1
        classes:
          - name: a
            modes: [N1]
        """, "3: classes[0]: missing required key 'match'", None),
    ("empty match", """
        version: 1
        classes:
          - name: a
            match: {}
        """, "4: classes[0].match: must not be empty",
     "give at least one of hostlist, regex, features, partition"),
    ("empty ladder", """
        version: 1
        defaults:
          modes: []
        """, "3: defaults.modes: must not be empty", None),
    ("mode listed twice", """
        version: 1
        defaults:
          user_modes: [N1, N1]
        """, "3: defaults.user_modes: lists the same entry twice", "remove the repeated entry"),
    ("gpu vendor", """
        version: 1
        defaults:
          gpu: {vendor: intel}
        """, "3: defaults.gpu.vendor: 'intel' is not one of auto, nvidia, amd, none", None),
    ("YAML boolean where a word is meant", """
        version: 1
        defaults:
          gpu: {cuda_check: no}
        """, "3: defaults.gpu.cuda_check: False is not one of warn, error, ignore",
     "YAML reads an unquoted yes/no/on/off as false: quote the value"),
    ("abi_check", """
        version: 1
        mpi_profiles:
          site:
            family: openmpi
            abi_check: minor
        """, "5: mpi_profiles.site.abi_check: 'minor' is not one of major, full, strict", None),
    ("reserved profile name", """
        version: 1
        mpi_profiles:
          auto:
            family: openmpi
        """, "3: mpi_profiles.auto: invalid name 'auto'",
     "profile names use letters, digits, '.', '_' and '-'; 'auto' and 'none' are reserved"),
    ("profile without family", """
        version: 1
        mpi_profiles:
          site:
            lib_dirs: [/opt/mpi/lib]
        """, "3: mpi_profiles.site: missing required key 'family'", None),
    ("mirror without scheme", """
        version: 1
        defaults:
          registries:
            mirrors:
              docker.io: [mirror.example.org]
        """, "5: defaults.registries.mirrors[\"docker.io\"][0]: invalid value 'mirror.example.org'",
     "write a URL starting with https:// (or http:// for a plain-HTTP mirror)"),
    ("duplicate class name", """
        version: 1
        classes:
          - name: gpu
            match: {hostlist: "gpu[1-2]"}
          - name: gpu
            match: {regex: "g.*"}
        """, "5: classes[1].name: class 'gpu' is defined twice",
     "the first one is classes[0]; give each class its own name"),
    ("bad regex", """
        version: 1
        classes:
          - name: a
            match:
              regex: "node("
        """, "5: classes[0].match.regex: invalid regular expression: "
             "missing ), unterminated subpattern at position 4",
     "the regex must match the whole short host name, e.g. 'login[0-9]+'"),
    ("bad hostlist", """
        version: 1
        classes:
          - name: a
            match:
              hostlist: "gpu[001-"
        """, "5: classes[0].match.hostlist: invalid hostlist 'gpu[001-': unbalanced brackets",
     "use Slurm syntax, e.g. gpu[001-128],login[1-2]"),
    ("unknown path variable", """
        version: 1
        defaults:
          storage:
            local_dir: "/local/${LOGNAME}"
        """, "4: defaults.storage.local_dir: unknown variable ${LOGNAME}",
     "paths may use ${UID}, ${GID}, ${USER}, ${HOME}, ${HOSTNAME}, ${JOB_ID}, ${SLURM_JOB_ID}, "
     "${PBS_JOBID}"),
    ("unknown MPI profile", """
        version: 1
        classes:
          - name: a
            match: {regex: a}
            mpi: {profile: cray}
        mpi_profiles:
          ompi: {family: openmpi}
        """, "5: classes[0].mpi.profile: unknown MPI profile 'cray'",
     "define it under mpi_profiles (defined: ompi), or use auto or none"),
    ("duplicate YAML key", """
        version: 1
        defaults:
          munge: true
          munge: false
        """, "4: defaults.munge: duplicate key 'munge'", "remove one of the two entries"),
    ("YAML syntax error", """
        version: 1
        defaults:
          modes: [N1, R1
          munge: true
        """, "4: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence "
             "started at line 3)",
     "check the indentation and the ':' after each key; quote values that contain ${...}, "
     "'{', ': ' or ' #'"),
    ("unquoted ${} in a flow mapping", """
        version: 1
        defaults:
          binds:
            - {src: /scratch/${USER}}
        """, "4: invalid YAML: expected ',' or '}', but got '{'", None),
    ("empty file", "", "1: the policy is empty", "a policy starts with 'version: 1'"),
    ("not a mapping", """
        - version
        """, "1: expected a mapping, got a list", None),
]


@pytest.mark.parametrize("text,where,hint", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_first_problem_names_file_line_key_and_hint(tmp_path, text, where, hint):
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyInvalid) as info:
        load_policy(path, require_trusted=False)
    first = info.value.problems[0]
    assert str(first) == f"{path}:{where}"
    if hint is not None:
        assert first.hint == hint
    # The ConfigError the CLI prints is the first problem, in the same words.
    assert isinstance(info.value, ConfigError)
    assert info.value.message == f"{path}:{where}"


def test_all_problems_are_reported_in_line_order(tmp_path):
    path = write_policy(tmp_path, """
        version: 1
        defaults:
          modes: [N7]
          storage: {local_quota: lots}
        classes:
          - name: a
            matcher: {regex: a}
        """)
    problems, policy, _ = check_file(path)
    assert policy is None
    assert [(p.line, p.path) for p in problems] == [
        (3, "defaults.modes[0]"), (4, "defaults.storage.local_quota"),
        (6, "classes[0]"), (7, "classes[0].matcher")]
    with pytest.raises(PolicyInvalid) as info:
        load_policy(path, require_trusted=False)
    assert info.value.hint.endswith(f"3 more problem(s): run `uctr policy check {path}`")


def test_problem_in_dropin_names_the_dropin(tmp_path):
    write_policy(tmp_path, "version: 1\n")
    dropin = write_policy(tmp_path, """
        version: 1
        classes:
          - name: x
            match: {partition: debug}
            readonly_rootfs: maybe
        """, "conf.d/20-debug.yaml")
    with pytest.raises(PolicyInvalid) as info:
        load_policy(tmp_path / "policy.yaml", require_trusted=False)
    assert str(info.value.problems[0]) == \
        f"{dropin}:5: classes[0].readonly_rootfs: expected true or false, got a string"


def test_profile_reference_may_point_into_another_file(tmp_path):
    write_policy(tmp_path, """
        version: 1
        defaults:
          mpi: {profile: site-mpich}
        """)
    write_policy(tmp_path, """
        version: 1
        mpi_profiles:
          site-mpich: {family: mpich-abi}
        """, "conf.d/10-mpi.yaml")
    policy = load_policy(tmp_path / "policy.yaml", require_trusted=False)
    assert policy.defaults["mpi"]["profile"] == "site-mpich"
    assert policy.mpi_profiles == {"site-mpich": {"family": "mpich-abi"}}


def test_missing_explicit_policy_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="policy file not found: .*nope.yaml"):
        load_policy(tmp_path / "nope.yaml", require_trusted=False)
    with pytest.raises(ConfigError, match="policy file not found"):
        load_policy(env={"UCTR_POLICY": str(tmp_path / "nope.yaml")}, require_trusted=False)
