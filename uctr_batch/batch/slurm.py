"""Slurm prolog/epilog logic and `uctr slurm install`.

Prolog (root, every allocated node, PrologFlags=Alloc):
  job context -> nothing to do without an image -> trusted site policy (read as root) ->
  mode/MPI checks -> stage the image as the job user in a forked child -> readiness record.
  User mistakes are recorded and the prolog exits 0: a failing prolog drains the node.
  Only node faults (unusable node-local storage, broken policy, bugs) exit non-zero.

Epilog (root): remove the readiness record and, as the job user, the job's in-use
references; then enforce the node-local quota. Missing state is normal; it never fails.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

# The hooks start for every job on every node: shlex, shutil, subprocess, tempfile and
# uctr_batch.proc (scontrol lookups, `uctr slurm install`) are imported where they are used.
from uctr_batch import log
from uctr_batch.batch import common
from uctr_batch.batch import job as jobs
from uctr_batch.batch import readiness
from uctr_batch.errors import EXIT_OK, ConfigError, UctrError, UsageError
from uctr_batch.records import Frozen

_log = log.get("slurm")

EXIT_NODE_FAULT = 1  # Slurm drains the node
SPANK_HEADER = "/usr/include/slurm/spank.h"
VERSION_HEADER = "/usr/include/slurm/slurm_version.h"


# -- the hooks' log file (uctr slurm install --log-dir) ----------------------------------------
HOOK_LOG = "UCTR_HOOK_LOG"  # set by the installed wrapper: DIR/uctr-KIND.NODE.log


def redirect_log(env: Mapping[str, str]) -> None:
    """Send stderr to the file named by UCTR_HOOK_LOG, when root alone controls its directory.

    A log dir a user can reach into (the site chose /tmp/uctr-logs, and a user created it
    first, or planted uctr-prolog.NODE.log as a symlink or FIFO there) would have root append
    to, or block on, whatever the user chose; then the hook keeps slurmd's stderr and says
    why. Never raises."""
    path = env.get(HOOK_LOG)
    if not path:
        return
    try:
        fd = open_root_log(path)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"uctr: not logging to {path}: {e}\n")
        return
    try:
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def open_root_log(path: str) -> int:
    """An O_APPEND descriptor of PATH, creating its directory (0755) and itself (0644). Every
    directory on the way must be ours or root's, closed to others (or sticky, like /tmp), the
    last one closed to others; root-owned symlinks on the way are followed, nobody else's.
    Raises OSError, or ValueError naming the first place that fails those rules."""
    import stat

    path = os.path.abspath(path)
    directory, name = os.path.split(path)
    me = os.geteuid()
    current, st = "/", os.lstat("/")
    for part in [p for p in directory.split("/") if p]:
        current = os.path.join(current, part)
        for _ in range(40):  # root's own symlinks (/var/run -> /run), a bounded number
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                try:
                    os.mkdir(current, 0o755)
                except FileExistsError:
                    pass
                st = os.lstat(current)
            if not stat.S_ISLNK(st.st_mode) or st.st_uid not in (0, me):
                break
            current = os.path.realpath(current)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in (0, me) \
                or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            raise ValueError(f"{current} is not a directory that only root can change")
    if st.st_mode & 0o022:
        raise ValueError(f"{current} is writable by others")
    fd = os.open(os.path.join(current, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT
                 | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, me) or st.st_nlink != 1:
        os.close(fd)
        raise ValueError(f"{path} is not a plain file of root's")
    return fd


# -- prolog -------------------------------------------------------------------------------
def prolog_main(env: Mapping[str, str] | None = None) -> int:
    redirect_log(os.environ if env is None else env)
    log.setup(0)
    try:
        return prolog(env)
    except common.NodeFault as e:  # root's run dir, the job's user unknown: an admin must look
        _log.error("uctr prolog: node fault: %s", e.message)
        return EXIT_NODE_FAULT
    except Exception as e:  # noqa: BLE001 - a bug: the job's steps stage (and fail) alone
        _log.exception("uctr prolog: internal error (the node stays up): %s", e)
        return EXIT_OK


def prolog(env: Mapping[str, str] | None = None) -> int:
    """Exit status 0 unless a common.NodeFault (or a NODE staging outcome: the node-local
    file system is read-only) stands in the way; a policy the node cannot use fails the job: a failing prolog drains the node, and
    nothing a user does, by mistake or malice, may do that."""
    env = os.environ if env is None else env
    ctx = common.node_step("the job", jobs.from_env, env, container_lookup=_container_or_none)
    if not ctx.wants_container:
        return EXIT_OK
    started = time.monotonic()
    try:
        node_policy = common.site_policy(ctx, env)
    except common.PolicyFault as e:  # the site's to fix: the job fails, the node stays up
        _log.error("uctr prolog: job %s: %s (the node is not drained; only container jobs "
                   "fail here)", ctx.job_id, e.message)
        common.write_record(ctx, common.policy_fault_fields(ctx, e), env)
        return EXIT_OK
    common.sweep_stale_records(env, _slurm_job_gone, keep=ctx.job_id, node_policy=node_policy)
    outcome = common.check_request(ctx, node_policy) or common.stage_as_user(ctx, node_policy, env)
    _log.info("uctr prolog: %s", common.describe_outcome(ctx, outcome, time.monotonic() - started))
    if outcome.get("fault") == "node":
        readiness.remove_readiness(ctx.job_id, env)  # the job is requeued: keep nothing of it
        return EXIT_NODE_FAULT
    common.write_record(ctx, common.record_fields(ctx, outcome), env)
    return EXIT_OK


_LIVE_STATES = ("PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "COMPLETING", "REQUEUED",
                "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED")


def _slurm_job_gone(job_id: str) -> bool:
    """True when the controller no longer knows job JOB_ID as live (in doubt: False)."""
    import subprocess

    cp = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                        text=True, timeout=common.SWEEP_BUDGET)
    if cp.returncode != 0:
        return "invalid job id" in (cp.stderr + cp.stdout).lower()
    for field in cp.stdout.split():
        if field.startswith("JobState="):
            return field[len("JobState="):] not in _LIVE_STATES
    return False


def _container_or_none(job_id: str) -> str | None:
    """Slurm's --container value; None if the controller cannot tell us now. Not knowing is
    no reason to drain a node: the steps then stage the image themselves (uctr-exec)."""
    import subprocess

    try:
        return jobs.job_container(job_id)
    except (UctrError, OSError, subprocess.SubprocessError) as e:
        _log.warning("uctr prolog: job %s: cannot read its --container value (%s); "
                     "its steps will stage the image themselves", job_id, e)
        return None


# -- epilog -------------------------------------------------------------------------------
def epilog_main(env: Mapping[str, str] | None = None) -> int:
    redirect_log(os.environ if env is None else env)
    log.setup(0)
    try:
        epilog(env)
    except Exception as e:  # noqa: BLE001 - never drain a node over cleanup
        _log.exception("uctr epilog: cleanup incomplete: %s", e)
    return EXIT_OK


def epilog(env: Mapping[str, str] | None = None) -> None:
    env = os.environ if env is None else env
    ctx = jobs.from_env(env, container_lookup=lambda job_id: None)
    record = readiness.read_readiness(ctx.job_id, ctx.uid, env)
    readiness.remove_readiness(ctx.job_id, env)
    named = named_marker(ctx.job_id, env)  # left by the plugin for --container-name steps
    if record is None and not ctx.wants_container and named is None:
        return  # the prolog staged nothing for this job here: no job-scoped state
    # no record but a container job: the prolog was cut short (scancel mid-staging) after
    # its child may have marked the bundle in use for the job; drop that reference too
    node_policy = common.site_policy(ctx, env)
    result = common.release_as_user(ctx, node_policy, env)
    _log.info("uctr epilog: job %s on %s: removed %d reference(s), evicted %d bundle(s), "
              "%d named container(s)", ctx.job_id, ctx.node, result["references"],
              len(result["evicted"]), result.get("containers", 0))
    if named is not None:
        named.unlink(missing_ok=True)


def named_marker(job_id: str, env: Mapping[str, str]):
    """<run dir>/containers/<job id>, root's record that a step of the job used a named
    container (spank/uctr_remote.c), or None."""
    path = readiness.run_dir(env) / "containers" / str(job_id)
    return path if path.is_file() else None


# -- uctr slurm install -------------------------------------------------------------------
def cmd_slurm(args) -> int:
    if args.slurm_command == "uninstall":  # --oci: the only thing it removes (oci_install.py)
        from uctr_batch.batch import oci_install

        directory = oci_install.conf_dir(args.slurm_conf_dir)
        sys.stdout.write(f"{directory / 'oci.conf'}: {oci_install.uninstall_profile(directory)}\n")
        return EXIT_OK
    if args.slurm_command == "install":
        plan = install_plan(Path(args.prefix), policy=args.policy, log_dir=args.log_dir)
        oci = _oci_first(plan, args)
        if not args.dry_run:
            install(plan)
        else:
            for step in plan.steps():
                _log.info("would %s", step)
        sys.stdout.write(plan.snippets())
        if oci:
            sys.stdout.write(oci())
    return EXIT_OK


def _oci_first(plan, args):
    """With --oci: refuse before building anything when the profile cannot go in (old Slurm,
    a foreign oci.conf); returns the step that writes it after the plugin is installed."""
    if not getattr(args, "oci", False):
        return None
    from uctr_batch.batch import oci_install

    directory = oci_install.conf_dir(args.slurm_conf_dir)
    release = oci_install.installed_release()
    oci_install.check_release(release)
    oci_install.check_foreign(directory, args.replace_oci_conf)

    def write() -> str:
        what = oci_install.install(plan, directory, replace=args.replace_oci_conf,
                                   dry_run=args.dry_run, release=release)
        return oci_install.snippet(directory, what)
    return write


class InstallPlan(Frozen):
    __slots__ = ("prefix", "source", "python", "policy", "log_dir")
    # source: the tree holding spank/, hooks/ (and launchers/): the package's parent

    @property
    def plugin(self) -> Path:
        return self.prefix / "lib" / "uctr" / "uctr_spank.so"

    @property
    def libexec(self) -> Path:
        return self.prefix / "libexec" / "uctr"

    @property
    def uctr_exec(self) -> Path:
        return self.prefix / "bin" / "uctr-exec"

    @property
    def python_launcher(self) -> Path:
        """The Python uctr-exec (a wrapper of launchers/uctr-exec); bin/uctr-exec is the C
        front when a compiler is there, which hands it every rank it does not join itself."""
        return self.libexec / "uctr-exec-python"

    def launcher_env(self):
        """What the wrapper of the Python launcher exports (also set by the C front)."""
        env = [("PYTHONPATH", str(self.source))]
        if self.policy:
            env.append(("UCTR_POLICY", self.policy))
        return env + [("UCTR_PYTHON", self.python)]

    @property
    def uctr_cli(self) -> Path:
        """`uctr` for sbatch/salloc/srun to pin images with, on every submit host."""
        return self.prefix / "bin" / "uctr"

    @property
    def share(self) -> Path:
        return self.prefix / "share" / "uctr" / "slurm"

    def hook(self, kind: str) -> Path:
        return self.libexec / f"slurm-{kind}"

    def steps(self) -> list[str]:
        return [f"build {self.source / 'spank'} for {slurm_release()} and install {self.plugin}",
                f"install {self.hook('prolog')} and {self.hook('epilog')} (python: {self.python})",
                f"install {self.python_launcher} and {self.uctr_exec} (the C front, "
                "when a compiler is there; else the Python launcher)",
                f"install {self.uctr_cli}",
                f"byte-compile {self.source / 'uctr_batch'} (the job user cannot write its "
                "__pycache__)",
                f"write {self.share / 'plugstack.conf'} and {self.share / 'slurm.conf'}"]

    def plugstack_line(self) -> str:
        args = [f"uctr_exec={self.uctr_exec}"] + ([f"policy={self.policy}"] if self.policy else [])
        args.append(f"resolver={self.uctr_cli}")  # the submit-time pin (uctr resolve)
        return f"required {self.plugin} {' '.join(args)}\n"

    def slurm_conf(self) -> str:
        return (f"Prolog={self.hook('prolog')}\nEpilog={self.hook('epilog')}\n"
                "PrologFlags=Alloc\n")

    def snippets(self) -> str:
        return ("# plugstack.conf (or a file in plugstack.conf.d/):\n" + self.plugstack_line()
                + "# slurm.conf (then: scontrol reconfigure; restart slurmd):\n" + self.slurm_conf())

    def hook_script(self, kind: str, script: Path) -> str:
        """The Prolog/Epilog slurm.conf names: Python for container jobs only."""
        import shlex

        command = f"exec {shlex.quote(self.python)} {shlex.quote(str(script))}"
        if self.log_dir:  # the hook opens it (redirect_log): never through a user's symlink
            log_file = shlex.quote(f"{self.log_dir.rstrip('/')}/uctr-{kind}.")
            command = f"export {HOOK_LOG}={log_file}\"$SLURMD_NODENAME\".log\n{command}"
        return self.wrapper(no_container_exit(kind) + command)

    def wrapper(self, target: str) -> str:
        """A hook/launcher script: this Python, this package, the site policy."""
        import shlex

        lines = ["#!/bin/sh", "# written by `uctr slurm install`; re-run it to update",
                 f"export PYTHONPATH={shlex.quote(str(self.source))}"]
        if self.policy:
            lines.append(f"export UCTR_POLICY={shlex.quote(self.policy)}")
        return "\n".join(lines + [target, ""])


def no_container_exit(kind: str) -> str:
    """sh that ends the hook before Python starts for a job the SPANK client marked as
    submitted without an image (UCTR_NO_IMAGE), as prolog() and epilog() would end it: the
    prolog has nothing to stage, the epilog nothing to release unless the job left a
    readiness record or used a named container here. Most jobs of a cluster run no
    container, and a Python start costs each of them ~0.05 CPU-s per node and hook. A false
    mark comes from the submitter and costs only that user's own job (docs/slurm.md)."""
    test = '[ -z "${SPANK_UCTR_IMAGE:-}" ] && [ "${SPANK_UCTR_NO_IMAGE:-}" = 1 ]'
    if kind == "epilog":
        run = f'"${{UCTR_RUN_DIR:-{readiness.DEFAULT_RUN_DIR}}}'
        test += "".join(f' \\\n    && [ ! -e {run}/{what}/$SLURM_JOB_ID" ]'
                        for what in ("readiness", "containers"))
    return f"# a job without a container: nothing to do here\nif {test}; then exit 0; fi\n"


def install_plan(prefix: Path, policy: str | None = None,
                 log_dir: str | None = None) -> InstallPlan:
    import uctr_batch

    source = Path(uctr_batch.__file__).resolve().parent.parent
    for needed in ("spank/Makefile", "hooks/slurm/prolog.py", "hooks/slurm/epilog.py"):
        if not (source / needed).exists():
            raise ConfigError(f"{source / needed} is missing: uctr slurm install needs the "
                              "uctr-batch source tree", "run it from a checkout of uctr-batch")
    for name, value in (("--prefix", str(prefix)), ("--policy", policy), ("--log-dir", log_dir)):
        if value is not None and not os.path.isabs(value):
            raise UsageError(f"{name} must be an absolute path: {value}",
                             f"give a path that starts with /, e.g. {name} /opt/uctr")
    return InstallPlan(Path(prefix), source, sys.executable, policy, log_dir)


def install(plan: InstallPlan) -> None:
    import shlex

    if not Path(SPANK_HEADER).exists():
        raise ConfigError(f"{SPANK_HEADER} is missing: cannot build the SPANK plugin",
                          "install Slurm's headers (Debian/Ubuntu: apt-get install libslurm-dev)")
    _build_plugin(plan)
    for kind in ("prolog", "epilog"):
        script = plan.libexec / f"{kind}.py"
        _install_file(script, (plan.source / "hooks" / "slurm" / f"{kind}.py").read_bytes(), 0o644)
        _install_file(plan.hook(kind), plan.hook_script(kind, script).encode(), 0o755)
    launcher = plan.wrapper(_launcher_command(plan)).encode()
    _install_file(plan.python_launcher, launcher, 0o755)
    _install_file(plan.uctr_exec, _front(plan) or launcher, 0o755)
    cli = f'exec {shlex.quote(plan.python)} -m uctr_batch "$@"'
    _install_file(plan.uctr_cli, plan.wrapper(cli).encode(), 0o755)
    _install_file(plan.share / "plugstack.conf", plan.plugstack_line().encode(), 0o644)
    _install_file(plan.share / "slurm.conf", plan.slurm_conf().encode(), 0o644)
    byte_compile(plan.source)
    for step in plan.steps():
        log.verbose("done: %s", step)


def byte_compile(source: Path) -> bool:
    """Compile every module of SOURCE/uctr_batch once, as the admin. The prolog's staging
    child, the epilog's release child and uctr-exec run as the job user, who cannot write
    __pycache__ in root's tree: each would otherwise compile every module root never
    imported, on every job and every rank (30-40 ms of CPU for the launch and unpack
    modules). False (and a warning) when the tree is read-only: that only costs the time."""
    import compileall

    package = source / "uctr_batch"
    if compileall.compile_dir(str(package), quiet=2, workers=1):
        return True
    _log.warning("could not byte-compile %s: the hooks' children and uctr-exec compile the "
                 "modules they import on every start", package)
    return False


def slurm_release(header: str = VERSION_HEADER) -> str:
    """The Slurm release whose headers the plugin is built against ("Slurm 24.11.5"): a
    SPANK plugin loads only into the major.minor it was built for."""
    import re

    try:
        text = Path(header).read_text(errors="replace")
    except OSError:
        return "the installed Slurm (no slurm_version.h)"
    match = re.search(r"#define\s+SLURM_VERSION_NUMBER\s+0x([0-9a-fA-F]+)", text)
    if not match:
        return "the installed Slurm (no SLURM_VERSION_NUMBER)"
    number = int(match.group(1), 16)
    return f"Slurm {number >> 16}.{(number >> 8) & 0xff:02d}.{number & 0xff}"


def _launcher_command(plan: InstallPlan) -> str:
    import shlex

    shim = plan.source / "launchers" / "uctr-exec"  # a sh script that picks UCTR_PYTHON
    if shim.exists():
        return f'export UCTR_PYTHON={shlex.quote(plan.python)}\nexec {shlex.quote(str(shim))} "$@"'
    _log.warning("%s is missing: %s will fail until uctr-exec is installed", shim, plan.uctr_exec)
    return 'echo "uctr: uctr-exec is not installed" >&2; exit 127'


def _front(plan: InstallPlan) -> bytes | None:
    """The C front of uctr-exec for this install, or None (no compiler: Python alone)."""
    from uctr_batch.batch import cfront

    if cfront.compiler() is None or not (plan.source / "launchers" / "c" / "Makefile").exists():
        _log.warning("no C compiler: %s is the Python launcher (a Python start per rank)",
                     plan.uctr_exec)
        return None
    return cfront.build_front(plan.source, str(plan.python_launcher), plan.launcher_env(),
                              _direct_python(plan))


def _direct_python(plan: InstallPlan) -> tuple[str, str] | None:
    """(python, package directory) when the Python launcher's wrapper ends in the checkout's
    launchers/uctr-exec on plan.python (_launcher_command): the front then execs that
    Python itself (cfront.front_config), else None (it execs the wrapper)."""
    if not (plan.source / "launchers" / "uctr-exec").exists() \
            or not (plan.source / "uctr_batch" / "launch" / "main.py").exists():
        return None
    return plan.python, str(plan.source)


def _build_plugin(plan: InstallPlan) -> None:
    """make in a scratch copy (the source tree may be read-only), then install atomically."""
    import shutil
    import tempfile

    from uctr_batch import proc
    from uctr_batch.batch import cfront

    with tempfile.TemporaryDirectory(prefix="uctr-spank-") as scratch:
        build = Path(scratch) / "spank"
        shutil.copytree(plan.source / "spank", build,
                        ignore=shutil.ignore_patterns("*.o", "*.so"))
        # task_init's join links the C front's record code, with the front's configuration
        # (the exports it sets before reading a record): spank/uctr_join.c
        front = Path(scratch) / "launchers" / "c"
        shutil.copytree(plan.source / "launchers" / "c", front,
                        ignore=shutil.ignore_patterns("uctr-exec", "*-asan", "fastrec-*"))
        (front / "front_config.h").write_text(
            cfront.front_config(str(plan.python_launcher), plan.launcher_env()))
        proc.run(["make", "-s", "-C", str(build), "FRONT_CONFIG=1"],
                 error="building the SPANK plugin failed",
                 hint="it needs make, a C compiler and Slurm's headers (libslurm-dev)")
        _install_file(plan.plugin, (build / "uctr_spank.so").read_bytes(), 0o755)
    _log.info("built the SPANK plugin for %s (%s); rebuild it after every Slurm upgrade",
              slurm_release(), VERSION_HEADER)


def _install_file(path: Path, data: bytes, mode: int) -> None:
    """Write next to PATH and rename over it: running slurmstepds keep the old plugin."""
    from uctr_batch import fsutil

    path.parent.mkdir(parents=True, exist_ok=True)
    fsutil.write_atomic(path, data, mode)
