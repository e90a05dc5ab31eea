"""Contract tests: PBS queuejob pins the image at submission (issue 13, item 1), run like the
other hook contract tests (tests/pbs/pbs_double.py stands in for the `pbs` module; the hook
really asks the harness registry)."""

import pytest

from tests.harness.images import push
from tests.pbs.test_pbs_hook_contract import site  # noqa: F401 - the fixture

pytestmark = [pytest.mark.pbs, pytest.mark.contract]


def test_queuejob_pins_the_image_resource_to_its_digest(site, registry_http,  # noqa: F811
                                                        test_images):
    ref = push(test_images["busybox"], registry_http, repo="pbs-pin", tag="1")
    result = site.event("queuejob", site.job(ref))
    assert result["accepted"], result
    digest = test_images["busybox"].manifest_digest()
    assert result["resources"]["container_image"] == f"{registry_http.host}/pbs-pin@{digest}"
    assert result["variables"]["UCTR_IMAGE_TAG"] == ref


def test_queuejob_pins_a_v_uctr_image(site, registry_http, test_images):  # noqa: F811
    ref = push(test_images["busybox"], registry_http, repo="pbs-pin-v", tag="1")
    result = site.event("queuejob", site.job(variables={"UCTR_IMAGE": ref}))
    assert result["accepted"], result
    assert result["variables"]["UCTR_IMAGE"].endswith("@" + test_images["busybox"].manifest_digest())
    assert result["variables"]["UCTR_IMAGE_TAG"] == ref


def test_queuejob_refuses_what_it_cannot_resolve_with_a_clear_message(site):  # noqa: F811
    site.registries.append("127.0.0.1:9")  # allowed, but nothing listens there
    site.write_policy()
    result = site.event("queuejob", site.job("127.0.0.1:9/nothing:1"))
    assert not result["accepted"]
    assert result["reject_message"].startswith(
        "uctr: cannot resolve 127.0.0.1:9/nothing:1 to a digest at submission: ")
    assert "(hint: " in result["reject_message"]


def test_the_site_can_leave_the_tag_to_the_execution_hosts(site, registry_http,  # noqa: F811
                                                          test_images):
    ref = push(test_images["busybox"], registry_http, repo="pbs-pin-off", tag="1")
    site.write_config(pin="prolog")
    result = site.event("queuejob", site.job(ref))
    assert result["accepted"], result
    assert result["resources"]["container_image"] == ref
    assert "UCTR_IMAGE_TAG" not in result["variables"]
