"""PBS Professional's container syntax (uctr_batch/batch/pbs_pro.py): container_engine in
select chunks, mapped by the policy's container_engines, and PBS_CONTAINER_ARGS."""

import pytest

from uctr_batch import errors
from uctr_batch.batch import pbs_pro
from uctr_batch.policy.model import NodePolicy, builtin_body, merge_body


def node_policy(engines):
    body = merge_body(builtin_body(), {"container_engines": engines})
    return NodePolicy.from_body(body, {}, node="n1", partition=None, features=(),
                                class_name=None, reason="test")


@pytest.mark.parametrize("select, engines", [
    ("1:ncpus=2:container_engine=singularity", ("singularity",)),
    ("2:ncpus=1:container_engine=docker+1:ncpus=4:container_engine=docker", ("docker",)),
    ("1:container_engine=\"apptainer\":ncpus=1", ("apptainer",)),
    ("1:ncpus=1+1:container_engine=a", ("a",)),
    ("1:ncpus=1:my_container_engine=x", ()),
    ("2:ncpus=1", ()),
    (None, ()),
])
def test_select_engines(select, engines):
    assert pbs_pro.select_engines(select) == engines


def test_engine_mode_maps_by_the_policy():
    policy = node_policy({"singularity": "S1", "uctr": "auto"})
    assert pbs_pro.engine_mode(("singularity",), policy) == "S1"
    assert pbs_pro.engine_mode(("uctr",), policy) is None  # the class's ladder
    assert pbs_pro.engine_mode((), policy) is None
    with pytest.raises(errors.UsageError) as unknown:
        pbs_pro.engine_mode(("docker",), policy)
    assert "container_engine=docker is not an engine this site offers" in unknown.value.message
    assert "singularity, uctr" in unknown.value.message and unknown.value.hint
    with pytest.raises(errors.UsageError) as mixed:
        pbs_pro.engine_mode(("singularity", "uctr"), policy)
    assert "different container_engine values: singularity, uctr" in mixed.value.message


def test_an_engine_and_a_policy_that_names_none():
    with pytest.raises(errors.UsageError) as e:
        pbs_pro.engine_mode(("singularity",), node_policy({}))
    assert "(engines in the site policy: none)" in e.value.message


def test_container_args_map_to_uctr_settings():
    args = pbs_pro.parse_args("--bind=/home:/home;--bind /scratch:/data:ro,/opt;-B /tmp/x;"
                              " --env=OMP_NUM_THREADS=4 ; -e HOME2;--pwd=/data;--nv;--no-home;"
                              "-v /a:/b:rw;--writable")
    assert args.mounts == ["/home:/home:rw", "/scratch:/data:ro", "/opt:/opt:rw",
                           "/tmp/x:/tmp/x:rw", "/a:/b:rw"]
    env = args.environment({"UCTR_MOUNTS": "/mine:/mine", "UCTR_GPU": "none"})
    assert env["UCTR_MOUNTS"] == ("/mine:/mine,/home:/home:rw,/scratch:/data:ro,/opt:/opt:rw,"
                                  "/tmp/x:/tmp/x:rw,/a:/b:rw")
    assert env["UCTR_ENV_NAMES"] == "HOME2,OMP_NUM_THREADS" and env["OMP_NUM_THREADS"] == "4"
    assert env["UCTR_WORKDIR"] == "/data" and env["UCTR_MOUNT_HOME"] == "0"
    assert env["UCTR_WRITABLE"] == "1"
    assert "UCTR_GPU" not in env, "the job's own UCTR_GPU wins over --nv"
    assert pbs_pro.parse_args("--nv").environment({}) == {"UCTR_GPU": "nvidia"}
    assert pbs_pro.parse_args(" ; ").environment({}) == {}
    assert pbs_pro.parse_args(None).environment({}) == {}


@pytest.mark.parametrize("text, named", [
    ("--bind=/a:/b;--fakeroot", "--fakeroot is not supported by uctr"),
    ("--net", "--net is not supported by uctr (containers share the host network"),
    ("--workdir=/x", "--workdir is not supported by uctr (singularity's --workdir"),
    ("--no-https", "--no-https is not supported by uctr (registries"),
    ("--overlay /x.img", "--overlay is not supported by uctr"),
    ("--bind=relative:/x", "--bind relative:/x is not SRC[:DST[:ro|rw]]"),
    ("--bind=/a:/b:nosuid", "has the bind option 'nosuid'"),
    ("--bind", "--bind needs a value"),
    ("--env=1X=2", "--env 1X=2 does not start with a variable name"),
    ("--env=UCTR_MODE=P1", "sets a uctr setting; give it with qsub -v instead"),
    ("--pwd=data", "--pwd data needs an absolute directory"),
    ("--nv=1", "--nv=1 takes no value"),
])
def test_other_container_args_are_refused_naming_the_argument(text, named):
    with pytest.raises(errors.UsageError) as e:
        pbs_pro.parse_args(text)
    assert e.value.message.startswith("PBS_CONTAINER_ARGS: ")
    assert named in e.value.message, e.value.message
    assert "--bind/-B/--volume/-v" in e.value.hint and "';'" in e.value.hint


def test_container_args_are_bounded():
    with pytest.raises(errors.UsageError, match="longer than"):
        pbs_pro.parse_args("--nv;" * 5000)
    with pytest.raises(errors.UsageError, match="more than 128"):
        pbs_pro.parse_args(";".join(["--nv"] * 200))


def test_container_engines_survive_the_node_policy_cache():
    policy = node_policy({"singularity": "S1"})
    again = NodePolicy.from_dict(policy.to_dict())
    assert again.container_engines == {"singularity": "S1"}


def test_the_policy_file_key_validates(tmp_path):
    from uctr_batch.policy import load, resolve

    from tests.unit.policy_util import write_policy

    good = write_policy(tmp_path, """
        version: 1
        defaults:
          container_engines: {singularity: S1, docker: R1, uctr: auto}
        classes:
          - name: bigmem
            match: {partition: bigmem}
            container_engines: {singularity: P1}
        """)
    policy = load.load_policy(good, require_trusted=False)
    assert resolve(policy, node="n1", partition=None, features=()).container_engines == \
        {"singularity": "S1", "docker": "R1", "uctr": "auto"}
    assert resolve(policy, node="n1", partition="bigmem", features=()).container_engines == \
        {"singularity": "P1", "docker": "R1", "uctr": "auto"}
    bad = write_policy(tmp_path / "bad", """
        version: 1
        defaults:
          container_engines: {singularity: S9}
        """)
    problems, _, _ = load.check_file(bad)
    assert any("container_engines.singularity" in str(p) for p in problems), problems


def test_policy_explain_shows_the_engine_map(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.unit.policy_util import write_policy

    path = write_policy(tmp_path, """
        version: 1
        defaults:
          container_engines: {singularity: auto, runc: R1}
        """)
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "-m", "uctr_batch", "policy", "explain"],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, UCTR_POLICY=str(path), PYTHONPATH=str(repo)))
    assert "PBS container_engine: runc -> R1, singularity -> auto" in done.stdout, done
