"""Replay templates (uctr_batch/launch/replay.py, launchers/c/replay.c): the pieces both
sides must agree on without a cluster. The whole path runs in
tests/integration/test_fast_exec.py (the C check against the Python launcher) and
tests/slurm/test_slurm_fast_join.py (a step set up from C against one set up in Python)."""

import re
from pathlib import Path

from uctr_batch.launch import recipe, replay
from uctr_batch.modes import n1

REPO = Path(__file__).resolve().parents[2]


def c_run_op():
    source = (REPO / "launchers" / "c" / "replay.c").read_text()
    body = source[source.index("static int run_op("):source.index("static int setup(")]
    return body


def test_c_replays_every_op_python_records_with_its_arity():
    """n1.REPLAY_OPS is what setup_namespace writes down; replay.c run_op must take each
    name with that many arguments, and no other name."""
    body = c_run_op()
    names = re.findall(r'strcmp\(op, "([a-z]+)"\) == 0 && ([a-z>\-=0-9 ]+)\)', body)
    arity = {"two": 2, "three": 3, "l->argc == 2": 1}
    assert {name: arity[cond.strip()] for name, cond in names} == n1.REPLAY_OPS


def test_the_namespace_key_comes_back_from_its_template():
    """replay.fill puts the ids where JOB and STEP stood, as rp_fill does: repr() of a
    tuple with the stand-ins, filled, is repr() of the tuple with the ids."""
    def inputs(job, step):
        return ("img", (("SLURM_JOBID", job), ("SLURM_STEP_ID", step), ("X", "7.3")))

    template = repr(inputs(replay.JOB, replay.STEP))
    assert replay.fill(template, "77", "3") == repr(inputs("77", "3"))
    assert recipe.digest(inputs("77", "3")) == \
        replay.digest(replay.fill(template, "77", "3").encode())


def test_the_key_is_what_the_c_side_hashes():
    env = {"UCTR_IMAGE": "reg/img@sha256:ab"}
    assert replay.key(env, "/w", ["IMG", "--"]) == replay.digest(b"reg/img@sha256:ab\0/w\0IMG\0--")
    assert replay.key({}, None, []) == replay.digest(b"\0/")


def test_no_template_without_the_setup_or_when_the_record_asks_for_python():
    ops = [("userns", "1", "1"), ("pivot", "/r")]
    assert replay.complete([("step", "1.0")], [("replay_key", "k")], ops)[-1] == \
        ("replay_op", "pivot", "/r")
    assert replay.complete([("fallback", "x")], [], ops) is None
    assert replay.complete([("step", "1.0")], [], ops[:1]) is None
