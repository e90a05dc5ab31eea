"""S1: apptainer (or singularity) `exec` on the rootfs directory or SIF file, when installed.

    apptainer exec --cleanenv --no-home --no-mount tmp,cwd --pwd CWD
        --bind PASSWD:/etc/passwd:ro --bind SRC:DST[:ro] ... [--fakeroot] [--writable] ROOTFS CMD

Environment: the final env is passed as APPTAINERENV_K=V (SINGULARITYENV_ for singularity)
with --cleanenv, so host variables reach the payload only through our precedence rules.
apptainer shares the host network, PID and IPC namespaces by default; it binds the host's
/proc, /sys and /dev itself (the policy device list is not enforced in S1). It execs its
starter, so this process leaves nothing behind; apptainer reports the payload's status.

A SIF file (image.sif) runs as it is: read-only, or with --writable-tmpfs when the container
is writable (the changes end with the step, as in the other modes); its own /etc/passwd and
environment scripts are apptainer's to apply, so no passwd bind and no default PATH is passed.
"""

import os

from uctr_batch.modes import inroot
from uctr_batch.modes.base import (
    Mode, ProbeResult, execve, find_program, program_version, register_mode,
)

PROGRAMS = ("apptainer", "singularity")


def find_apptainer():
    for name in PROGRAMS:
        path = find_program(name)
        if path:
            return name, path
    return None


@register_mode("S1")
class Apptainer(Mode):
    summary = "apptainer/singularity exec on the rootfs directory"

    def probe(self, spec=None) -> ProbeResult:
        found = find_apptainer()
        if not found:
            return ProbeResult(False, "apptainer/singularity not found on PATH")
        name, path = found
        if spec is not None and not os.path.isdir(spec.rootfs) and not is_sif(spec.rootfs):
            return ProbeResult(False, "rootfs is not a directory or SIF file: %s" % spec.rootfs)
        version = program_version([path, "--version"]) if spec is None else None
        return ProbeResult(True, name, version)

    def exec(self, spec):
        self.require(spec)
        name, path = find_apptainer()
        root = os.path.realpath(spec.rootfs)
        sif = is_sif(root)
        if sif:  # the image's links are apptainer's to resolve; it makes missing mount points
            destination = None
        elif spec.readonly:  # apptainer makes missing mount points in an overlay of its own
            def destination(path, is_dir):
                return inroot.resolved(root, path, is_dir)
        else:  # --writable: apptainer mounts onto the rootfs itself and creates nothing
            inroot.system_dirs(root)

            def destination(path, is_dir):
                return inroot.container_path(root, inroot.ensure_mountpoint(root, path, is_dir))
        argv = apptainer_argv(spec, path, destination=destination, sif=sif)
        execve(path, argv, apptainer_env(spec, name, sif=sif))


def is_sif(path: str) -> bool:
    """Whether the rootfs is a SIF file (a directory never is)."""
    from uctr_batch.image.sif import sif_path

    return os.path.isfile(path) and sif_path(path) is not None


def apptainer_argv(spec, program="apptainer", host_uid=None, destination=None, sif=False):
    """destination(path, is_dir): a bind's container path with the image's links resolved inside the
    rootfs (exec passes inroot.resolved: apptainer creates missing bind targets itself)."""
    host_uid = os.getuid() if host_uid is None else host_uid
    destination = destination or (lambda path, _is_dir: path)
    # a SIF: --quiet, or every rank prints apptainer's INFO lines about its image drivers
    argv = [program] + (["--quiet"] if sif else []) + [
        "exec", "--cleanenv", "--no-home", "--no-mount", "tmp,cwd", "--pwd", spec.cwd]
    if spec.env.get("HOME"):  # apptainer refuses APPTAINERENV_HOME; --home sets it (no mount)
        argv += ["--home", spec.env["HOME"]]
    for host, path in ((spec.passwd, "/etc/passwd"), (spec.group, "/etc/group")):
        if host:
            argv += ["--bind", "%s:%s:ro" % (host, destination(path, False))]
    for src, dst, ro in spec.binds:
        argv += ["--bind", "%s:%s:%s" % (src, destination(dst, os.path.isdir(src)),
                                          "ro" if ro else "rw")]
    if spec.uid == 0 and host_uid != 0:
        argv.append("--fakeroot")
    if not spec.readonly:
        argv.append("--writable-tmpfs" if sif else "--writable")
    return argv + [os.path.realpath(spec.rootfs)] + list(spec.argv)


def apptainer_env(spec, name: str = "apptainer", host_env=None, sif=False) -> dict:
    """The env of the apptainer process: the host's, plus the payload's under the prefix.
    For a SIF, uctr's default PATH is left out: the image's environment scripts set its own."""
    from uctr_batch.envspec import DEFAULT_PATH

    prefix = "SINGULARITYENV_" if name == "singularity" else "APPTAINERENV_"
    host_env = os.environ if host_env is None else host_env
    env = {k: v for k, v in host_env.items() if not k.startswith(prefix)}
    for key, value in spec.env.items():
        if key == "HOME":  # passed as --home (apptainer_argv)
            continue
        if sif and key == "PATH" and value == DEFAULT_PATH:
            continue
        env[prefix + key] = value
    return env
