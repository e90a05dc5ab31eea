"""Issue 10, class 9: numeric and path UCTR_* settings are checked, never a traceback.

One reader (uctr_batch.envnum) for every numeric setting; junk, negative, zero where it
makes no sense, NaN, infinity and huge values are a ConfigError naming the variable, with
a hint. Before, `UCTR_PARALLEL=abc uctr pull` ended in a ValueError traceback (exit 70),
UCTR_STAGE_TIMEOUT=nan silently became 0 and inf waited forever.
"""

import pytest

from uctr_batch import cli, envnum, errors, settings
from uctr_batch.errors import ConfigError
from uctr_batch.launch import policy_cache

JUNK = ["abc", "-1", "nan", "inf", "-inf", "1e999", "1" * 5000, "0x10", "4 4", "\u0664\u0665x", "1.5.1"]


@pytest.mark.parametrize("name", sorted(envnum.NUMERIC))
@pytest.mark.parametrize("value", JUNK)
def test_junk_is_a_config_error(name, value):
    with pytest.raises(ConfigError) as e:
        envnum.number(name, {name: value}, None)
    assert name in e.value.message and e.value.hint and name in e.value.hint
    assert len(e.value.message) < 200  # a huge value is cut, not echoed whole


@pytest.mark.parametrize("name, value", [("UCTR_PARALLEL", "0"), ("UCTR_PARALLEL", "65"),
                                         ("UCTR_PARALLEL", "1.5"), ("UCTR_RETRIES", "101"),
                                         ("UCTR_STALL_TIMEOUT", "0"),
                                         ("UCTR_STAGE_TIMEOUT", str(8 * 86400))])
def test_out_of_bounds(name, value):
    with pytest.raises(ConfigError):
        envnum.number(name, {name: value}, None)


@pytest.mark.parametrize("name, value, want", [("UCTR_PARALLEL", " 8 ", 8), ("UCTR_RETRIES", "0", 0),
                                               ("UCTR_STALL_TIMEOUT", "2.5", 2.5),
                                               ("UCTR_STAGE_TIMEOUT", "0", 0.0),
                                               ("UCTR_PARALLEL", "", "default"),
                                               ("UCTR_PARALLEL", "  ", "default")])
def test_good_values_and_defaults(name, value, want):
    assert envnum.number(name, {name: value}, "default") == want
    assert envnum.number(name, {}, "default") == "default"


@pytest.mark.parametrize("name", ["UCTR_PARALLEL", "UCTR_RETRIES", "UCTR_STALL_TIMEOUT"])
@pytest.mark.parametrize("value", ["abc", "-1", "nan"])
def test_registry_config_checks_the_environment(monkeypatch, name, value):
    """The path `uctr pull` takes (this raised ValueError before)."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError):
        settings.registry_config()


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_stage_timeout_of_the_launcher(value):
    with pytest.raises(ConfigError):
        policy_cache.stage_timeout({}, {"UCTR_STAGE_TIMEOUT": value})
    assert policy_cache.stage_timeout({}, {"UCTR_STAGE_TIMEOUT": "30"}) == 30.0
    assert policy_cache.stage_timeout({"storage": {"stage_timeout": 5}}, {}) == 5.0


@pytest.mark.parametrize("value", ["0", "-3", "65", "99999999999999999999", "x"])
def test_parallel_flag_is_bounded(capsys, value):
    with pytest.raises(SystemExit) as e:
        cli.build_parser(["pull"]).parse_args(["pull", "--parallel", value, "busybox"])
    assert e.value.code == errors.EXIT_USAGE
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["UCTR_CACHE", "UCTR_LOCAL_DIR", "UCTR_CONFIG_DIR"])
@pytest.mark.parametrize("value", ["relative/dir", "~/x", "\u202e"])
def test_directories_must_be_absolute(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as e:
        {"UCTR_CACHE": settings.cache_dir, "UCTR_LOCAL_DIR": settings.local_dir,
         "UCTR_CONFIG_DIR": settings.default_config_dir}[name]()
    assert name in e.value.message and e.value.hint


def test_launcher_directories_must_be_absolute():
    with pytest.raises(ConfigError):
        policy_cache.local_base({"UCTR_LOCAL_DIR": "rel"})
    with pytest.raises(ConfigError):
        policy_cache.default_cache_dir({"UCTR_CACHE": "rel"})
    assert policy_cache.local_base({"UCTR_LOCAL_DIR": "/x"}) == "/x"


def test_interrupt_code_is_documented():
    assert errors.EXIT_INTERRUPTED == 130 and 130 in errors.EXIT_CODES
