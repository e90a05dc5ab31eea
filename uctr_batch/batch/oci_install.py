"""`uctr slurm install --oci` and `uctr slurm uninstall --oci`: uctr's oci.conf profile.

The profile (site-config/slurm/oci.conf.uctr) goes next to slurm.conf, where slurmstepd looks
for oci.conf. Rules:
  * Slurm >= 23.02 only: 22.05 knows no IgnoreFileConfigJson (an unknown key is a fatal parse
    error in slurmstepd), reads IMAGE/config.json and refuses more than one task per node;
  * an oci.conf that is not ours (no PROFILE_MARK line) is never overwritten, unless the admin
    says --replace-oci-conf; then it is kept as oci.conf.before-uctr and uninstall puts it back;
  * installing the same profile again changes nothing; uninstall removes only ours.
"""

import os
import re
import subprocess
from pathlib import Path
from typing import Optional, Tuple

from uctr_batch import fsutil, log
from uctr_batch.errors import ConfigError

_log = log.get("slurm")

PROFILE = "site-config/slurm/oci.conf.uctr"
PROFILE_MARK = "# uctr-batch oci.conf profile"  # the first line of the profile: ours
EXAMPLE_RUNTIME = "/opt/uctr/libexec/uctr/uctr-oci"  # the path the shipped example names
BACKUP_SUFFIX = ".before-uctr"
MIN_RELEASE = (23, 2)
VERSION_COMMANDS = (["slurmd", "-V"], ["srun", "--version"], ["sinfo", "--version"])


def conf_dir(given: Optional[str], env=None) -> Path:
    """Where oci.conf goes: --slurm-conf-dir, else slurm.conf's directory ($SLURM_CONF), else
    /etc/slurm (Slurm reads every extra .conf file from slurm.conf's directory)."""
    env = os.environ if env is None else env
    if given:
        return Path(given)
    if env.get("SLURM_CONF"):
        return Path(env["SLURM_CONF"]).parent
    return Path("/etc/slurm")


def parse_release(text: str) -> Optional[Tuple[int, int]]:
    """(major, minor) from `slurmd -V` output ("slurm 24.11.5", "slurm-wlm 22.05.8")."""
    found = re.search(r"\b(\d{2})\.(\d{2})\.\d+", text)
    return (int(found.group(1)), int(found.group(2))) if found else None


def installed_release() -> Optional[Tuple[int, int]]:
    for argv in VERSION_COMMANDS:
        try:
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        release = parse_release(cp.stdout + cp.stderr) if cp.returncode == 0 else None
        if release:
            return release
    return None


def check_release(release: Optional[Tuple[int, int]]) -> None:
    if release is None:
        raise ConfigError("cannot tell which Slurm release this node runs (slurmd -V, "
                          "srun --version)", "install Slurm first, or run this on a node")
    if release < MIN_RELEASE:
        raise ConfigError(
            "Slurm %d.%02d cannot use uctr's oci.conf profile: before 23.02 oci.conf has no "
            "IgnoreFileConfigJson, so --container must be an OCI bundle directory with a "
            "config.json, with one task per node" % release,
            "keep this node without an oci.conf: the SPANK plugin then runs "
            "`--container=IMAGE` jobs (docs/slurm.md)")


def render(source: Path, runtime: Path) -> str:
    try:
        text = (source / PROFILE).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read {source / PROFILE}: {e.strerror}",
                          "run it from a checkout of uctr-batch (it ships the profile)")
    if not text.startswith(PROFILE_MARK) or EXAMPLE_RUNTIME not in text:
        raise ConfigError(f"{source / PROFILE} is not uctr's oci.conf profile",
                          "restore it from the uctr-batch source tree")
    return text.replace(EXAMPLE_RUNTIME, str(runtime))


def is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.readline().decode(errors="replace").startswith(PROFILE_MARK)
    except FileNotFoundError:
        return False


def check_foreign(directory: Path, replace: bool) -> None:
    """Refuse an existing oci.conf that is not ours, unless told to replace it."""
    target = directory / "oci.conf"
    if replace or not target.exists() or is_ours(target):
        return
    raise ConfigError(
        f"{target} exists and is not uctr's: the site already runs Slurm's OCI support "
        "with another runtime", "keep it (uctr-exec still works in any step), or "
        "install with --replace-oci-conf: it is kept as oci.conf.before-uctr and "
        "`uctr slurm uninstall --oci` puts it back")


def install_profile(text: str, directory: Path, replace: bool = False) -> str:
    """Write DIRECTORY/oci.conf; returns what happened: "written", "updated", "unchanged"."""
    target = directory / "oci.conf"
    if target.is_symlink() or (target.exists() and not target.is_file()):
        raise ConfigError(f"{target} is not a plain file", "remove it, then install again")
    existing = target.read_text(errors="replace") if target.exists() else None
    if existing == text:
        return "unchanged"
    check_foreign(directory, replace)
    if existing is not None and not is_ours(target):
        backup = directory / ("oci.conf" + BACKUP_SUFFIX)
        if backup.exists() or backup.is_symlink():
            raise ConfigError(f"{backup} exists already: it would be overwritten",
                              "move it away, then install again")
        os.link(target, backup)
    if not directory.is_dir():
        raise ConfigError(f"{directory} is not a directory",
                          "give slurm.conf's directory with --slurm-conf-dir")
    fsutil.write_atomic(target, text.encode(), 0o644)
    return "written" if existing is None else "updated"


def uninstall_profile(directory: Path) -> str:
    """Remove DIRECTORY/oci.conf when it is ours (putting back the one it replaced)."""
    target = directory / "oci.conf"
    backup = directory / ("oci.conf" + BACKUP_SUFFIX)
    if not target.exists() and not target.is_symlink():
        return "absent"
    if target.is_symlink() or not is_ours(target):
        raise ConfigError(f"{target} is not uctr's oci.conf profile: left alone",
                          "remove or edit it yourself if it should go")
    if backup.is_file() and not backup.is_symlink():
        os.replace(backup, target)
        return "restored"
    target.unlink()
    return "removed"


def runtime_wrapper(plan) -> str:
    """libexec/uctr/uctr-oci: the launchers/uctr-oci shim with this Python and policy."""
    import shlex

    shim = plan.source / "launchers" / "uctr-oci"
    if not shim.exists():
        raise ConfigError(f"{shim} is missing", "run it from a checkout of uctr-batch")
    return plan.wrapper(f'export UCTR_PYTHON={shlex.quote(plan.python)}\n'
                        f'exec {shlex.quote(str(shim))} "$@"')


def install(plan, directory: Path, replace: bool = False, dry_run: bool = False,
            release: Optional[Tuple[int, int]] = None) -> str:
    """The whole of --oci: the runtime wrapper, a copy under share/, the profile."""
    check_release(release if release is not None else installed_release())
    runtime = plan.libexec / "uctr-oci"
    text = render(plan.source, runtime)
    if dry_run:
        _log.info("would install %s and write %s", runtime, directory / "oci.conf")
        return "dry-run"
    plan.libexec.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(runtime, runtime_wrapper(plan).encode(), 0o755)
    plan.share.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(plan.share / "oci.conf", text.encode(), 0o644)
    what = install_profile(text, directory, replace=replace)
    _log.info("%s: %s", directory / "oci.conf", what)
    return what


def snippet(directory: Path, what: str) -> str:
    return (f"# oci.conf ({directory / 'oci.conf'}: {what}); slurmstepd reads it for every "
            "step, no restart needed\n")
