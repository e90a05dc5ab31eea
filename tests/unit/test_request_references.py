"""The hooks' request check (batch/common.validate_request, used by the Slurm prolog and the
PBS queuejob/runjob hooks) reads images with the one reference parser: enroot's forms and
squashfs paths pass, daemon prefixes fail with the export to use, and the site's registry
rules see the canonical name (so REGISTRY#IMAGE cannot slip past a deny rule)."""

import pytest

from uctr_batch.batch.common import check_request, validate_request
from uctr_batch.errors import ConfigError, ReferenceError_
from uctr_batch.policy.model import NodePolicy, builtin_body


def policy(**registries):
    body = builtin_body()
    body["registries"] = dict(body.get("registries") or {}, **registries)
    return NodePolicy.from_body(body, {}, node="n1", partition=None, features=(),
                                class_name=None, reason="test")


@pytest.mark.parametrize("image", ["nvcr.io#nvidia/pytorch:24.01-py3",
                                   "alice@nvcr.io#nvidia/cuda:12.4.0-base",
                                   "/shared/images/pytorch.sqsh", "./app.sqsh"])
def test_enroot_images_pass(image):
    validate_request(image, None, None, policy())


def test_daemon_prefix_is_a_user_error_with_the_alternative():
    with pytest.raises(ReferenceError_, match="local container daemon") as info:
        validate_request("dockerd://ubuntu", None, None, policy())
    assert "docker save" in info.value.hint


def test_deny_rules_see_the_canonical_name():
    strict = policy(deny=["nvcr.io/*"])
    with pytest.raises(ConfigError, match="refused by the site policy"):
        validate_request("nvcr.io#nvidia/pytorch:24.01-py3", None, None, strict)


def test_outcome_for_the_job_is_a_user_error():
    class Ctx:
        image, mode, mpi = "podman://x", None, None

    outcome = check_request(Ctx(), policy())
    assert outcome is not None and "podman save" in str(outcome)
