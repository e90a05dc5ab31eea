"""inject.plan writes the injection manifest without the json module (the step's creator
must not import it): its to_json() must write what json.dumps(indent=1, sort_keys=True)
writes, and hand anything else to json."""

import json
import math

import pytest

from uctr_batch.inject import pmi
from uctr_batch.inject.plan import InjectionPlan, ManifestEntry, to_json

VALUES = [
    None, True, False, 0, -1, 2 ** 70, 1.5, -0.0, 1e300, 3.141592653589793, "",
    "plain", 'quote " back \\ slash', "tab\tnew\nline\r\x00\x1f\x7f", "é ü 日本 \U0001f600",
    "\ud800 lone surrogate", [], {}, [[]], {"": {}}, (1, "two"),
    {"b": [1, {"z": None, "a": [True, False]}], "a": "x", "A": 1.25e-7},
    [{"k": ["v", 1, None]}, [], {}, "end"],
]


@pytest.mark.parametrize("value", VALUES, ids=range(len(VALUES)))
def test_to_json_writes_what_json_writes(value):
    assert to_json(value) == json.dumps(value, indent=1, sort_keys=True)


@pytest.mark.parametrize("value", [math.nan, math.inf, {1: "int key"}, {"k": {2}}, b"x"])
def test_to_json_refuses_what_it_does_not_write(value):
    with pytest.raises(TypeError):
        to_json(value)


def test_plan_round_trips_and_falls_back_to_json():
    plan = pmi.pmi_plan({"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.1.0",
                         "PMI_FD": "5", "SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"})
    plan.info["odd"] = {3: math.inf}  # json's rules: int keys become strings, inf Infinity
    text = plan.to_json()
    assert text == json.dumps(plan.to_dict(), indent=1, sort_keys=True)
    again = InjectionPlan.from_json(text)
    assert again.info["odd"] == {"3": math.inf} and again.env == plan.env
    entry = ManifestEntry("bind", "/x", "a \"reason\"\n")
    assert InjectionPlan(manifest=[entry]).to_json() == json.dumps(
        InjectionPlan(manifest=[entry]).to_dict(), indent=1, sort_keys=True)


@pytest.mark.parametrize("name, shared", [
    ("PMIX_SERVER_TMPDIR", True), ("OMPI_MCA_orte_top_session_dir", True),
    ("OMPI_MCA_prte_top_session_dir", True), ("PRTE_MCA_prte_top_session_dir", True),
    ("PMIX_DSTORE_21_BASE_PATH", True), ("PMIX_DSTORE_ESH_BASE_PATH", True),
    ("PMIX_DSTORE_BASE_PATH", True), ("PMIX_DSTORE__BASE_PATH", True),
    ("PMIX_DSTORE_x_BASE_PATH", False), ("PMIX_DSTORE_21_BASE_PATHS", False),
    ("XPMIX_SERVER_TMPDIR", False), ("PMIX_SERVER_TMPDIR2", False), ("PMIX_DSTORE_", False),
    ("PMIX_DSTORE_BASE_PAT", False), ("PMIX_SYSTEM_TMPDIR", False), ("", False),
])
def test_shared_dir_variables(name, shared):
    assert pmi._names_shared_dir(name) is shared


@pytest.mark.parametrize("name, slurm", [
    ("pmix.12.0", True), ("pmix.4294967294.7", True), ("pmix.1", False), ("pmix.1.2.3", False),
    ("pmix.a.1", False), ("pmix..1", False), ("Pmix.1.2", False), ("pmix.1.2\n", False),
    ("pmix.\u0661.2", False), ("spmix_appdir_1.2", False),
])
def test_slurm_pmix_directory_names(name, slurm):
    assert pmi._is_slurm_pmix_dir(name) is slurm
