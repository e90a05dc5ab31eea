"""`uctr slurm install --oci` / `uctr slurm uninstall --oci` (batch/oci_install.py) and the
shipped profile site-config/slurm/oci.conf.uctr."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from uctr_batch.batch import oci_install
from uctr_batch.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / oci_install.PROFILE
# every key oci.conf knows in 23.02 .. 26.05 (SchedMD/slurm src/common/oci_config.c)
OCI_KEYS = {"ContainerPath", "CreateEnvFile", "DisableHooks", "EnvExclude", "MountSpoolDir",
            "RunTimeCreate", "RunTimeDelete", "RunTimeKill", "RunTimeEnvExclude", "RunTimeQuery",
            "RunTimeRun", "RunTimeStart", "SrunPath", "SrunArgs", "DisableCleanup", "StdIODebug",
            "SyslogDebug", "FileDebug", "DebugFlags", "IgnoreFileConfigJson"}


def settings(text):
    return dict(line.split("=", 1) for line in text.splitlines()
                if line.strip() and not line.startswith("#"))


def test_shipped_profile_uses_only_keys_and_patterns_slurm_knows():
    keys = settings(SHIPPED.read_text())
    assert set(keys) <= OCI_KEYS
    assert keys["IgnoreFileConfigJson"] == "true" and keys["CreateEnvFile"] == "null"
    assert "RunTimeStart" not in keys  # fatal together with IgnoreFileConfigJson
    for key, value in keys.items():
        assert set(re.findall(r"%(.)", value)) <= set("%@bejmnprstuU"), key
    run = keys["RunTimeRun"]
    assert run.startswith('"exec ') and "'%b'" in run and "'%e'" in run and run.endswith(' -- %@"')
    for key in ("RunTimeKill", "RunTimeDelete"):  # run as root: no user-controlled pattern
        assert "%p" in keys[key] and not set(re.findall(r"%(.)", keys[key])) - {"p"}


def test_rendered_profile_names_the_installed_runtime(tmp_path):
    runtime = tmp_path / "libexec" / "uctr" / "uctr-oci"
    text = oci_install.render(REPO, runtime)
    assert text.startswith(oci_install.PROFILE_MARK)
    assert "/opt/uctr" not in "".join(settings(text).values())
    assert text.count(str(runtime)) == 3


@pytest.mark.parametrize("text, release", [("slurm 24.11.5\n", (24, 11)),
                                           ("slurm-wlm 22.05.8\n", (22, 5)),
                                           ("slurm 26.05.0-0rc1", (26, 5)), ("", None),
                                           ("slurm dev", None)])
def test_release_is_read_from_the_version_line(text, release):
    assert oci_install.parse_release(text) == release


@pytest.mark.parametrize("release", [None, (22, 5), (21, 8)])
def test_releases_without_ignore_file_config_json_are_refused(release):
    with pytest.raises(ConfigError) as e:
        oci_install.check_release(release)
    assert e.value.hint


@pytest.mark.parametrize("release", [(23, 2), (24, 11), (26, 5)])
def test_releases_since_23_02_are_accepted(release):
    oci_install.check_release(release)


def test_install_is_idempotent_and_uninstall_removes_it(tmp_path):
    text = oci_install.render(REPO, Path("/opt/x/libexec/uctr/uctr-oci"))
    assert oci_install.install_profile(text, tmp_path) == "written"
    assert oci_install.install_profile(text, tmp_path) == "unchanged"
    assert (tmp_path / "oci.conf").stat().st_mode & 0o777 == 0o644
    newer = text.replace("/opt/x/", "/opt/y/")
    assert oci_install.install_profile(newer, tmp_path) == "updated"
    assert (tmp_path / "oci.conf").read_text() == newer
    assert oci_install.uninstall_profile(tmp_path) == "removed"
    assert not (tmp_path / "oci.conf").exists()
    assert oci_install.uninstall_profile(tmp_path) == "absent"


def test_a_foreign_oci_conf_is_never_overwritten_without_the_flag(tmp_path):
    foreign = 'IgnoreFileConfigJson=true\nRunTimeRun="singularity exec --userns %r %@"\n'
    (tmp_path / "oci.conf").write_text(foreign)
    text = oci_install.render(REPO, Path("/opt/x/libexec/uctr/uctr-oci"))
    with pytest.raises(ConfigError) as e:
        oci_install.install_profile(text, tmp_path)
    assert "--replace-oci-conf" in e.value.hint
    assert (tmp_path / "oci.conf").read_text() == foreign
    with pytest.raises(ConfigError):  # uninstall leaves it alone too
        oci_install.uninstall_profile(tmp_path)
    assert (tmp_path / "oci.conf").read_text() == foreign
    # with the flag: kept aside, and put back by uninstall
    assert oci_install.install_profile(text, tmp_path, replace=True) == "updated"
    assert (tmp_path / "oci.conf.before-uctr").read_text() == foreign
    assert oci_install.install_profile(text, tmp_path, replace=True) == "unchanged"
    assert oci_install.uninstall_profile(tmp_path) == "restored"
    assert (tmp_path / "oci.conf").read_text() == foreign
    assert not (tmp_path / "oci.conf.before-uctr").exists()


def test_an_existing_backup_is_not_overwritten(tmp_path):
    (tmp_path / "oci.conf").write_text("RunTimeRun=a\n")
    (tmp_path / "oci.conf.before-uctr").write_text("older\n")
    with pytest.raises(ConfigError):
        oci_install.install_profile(oci_install.render(REPO, Path("/r")), tmp_path, replace=True)
    assert (tmp_path / "oci.conf.before-uctr").read_text() == "older\n"


def test_a_symlinked_oci_conf_is_refused(tmp_path):
    (tmp_path / "elsewhere").write_text(oci_install.render(REPO, Path("/r")))
    (tmp_path / "oci.conf").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError):
        oci_install.install_profile(oci_install.render(REPO, Path("/s")), tmp_path)
    with pytest.raises(ConfigError):
        oci_install.uninstall_profile(tmp_path)
    assert (tmp_path / "oci.conf").is_symlink()


def test_conf_dir_follows_slurm_conf():
    assert oci_install.conf_dir("/x/y", {"SLURM_CONF": "/a/b.conf"}) == Path("/x/y")
    assert oci_install.conf_dir(None, {"SLURM_CONF": "/a/b.conf"}) == Path("/a")
    assert oci_install.conf_dir(None, {}) == Path("/etc/slurm")


def uctr(*args):
    return subprocess.run([sys.executable, "-m", "uctr_batch", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


def test_cli_refuses_a_foreign_oci_conf_before_building_anything(tmp_path):
    release = oci_install.installed_release()
    if release is None or release < oci_install.MIN_RELEASE:
        pytest.skip("Slurm >= 23.02 needed to get past the release check")
    (tmp_path / "oci.conf").write_text("RunTimeRun=x\n")
    result = uctr("slurm", "install", "--prefix", str(tmp_path / "prefix"), "--oci",
                  "--slurm-conf-dir", str(tmp_path))
    assert result.returncode == 1 and "--replace-oci-conf" in result.stderr, result.stderr
    assert not (tmp_path / "prefix").exists()


def test_cli_on_a_release_before_23_02_refuses_with_the_reason(tmp_path):
    release = oci_install.installed_release()
    if release is None or release >= oci_install.MIN_RELEASE:
        pytest.skip("this node's Slurm has IgnoreFileConfigJson")
    result = uctr("slurm", "install", "--prefix", str(tmp_path / "prefix"), "--oci",
                  "--slurm-conf-dir", str(tmp_path))
    assert result.returncode == 1, result.stderr
    assert "error: Slurm %d.%02d cannot use" % release in result.stderr
    assert "hint: " in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "prefix").exists() and not (tmp_path / "oci.conf").exists()


def test_cli_uninstall_needs_oci_and_leaves_a_foreign_file(tmp_path):
    result = uctr("slurm", "uninstall", "--slurm-conf-dir", str(tmp_path))
    assert result.returncode == 2 and "hint: " in result.stderr
    (tmp_path / "oci.conf").write_text("RunTimeRun=x\n")
    result = uctr("slurm", "uninstall", "--oci", "--slurm-conf-dir", str(tmp_path))
    assert result.returncode == 1 and "left alone" in result.stderr
    assert (tmp_path / "oci.conf").read_text() == "RunTimeRun=x\n"


def test_a_tree_without_the_profile_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as e:
        oci_install.render(tmp_path, Path("/r"))
    assert "checkout" in e.value.hint
