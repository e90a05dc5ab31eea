"""The `uctr` command line: subcommands -> module functions.

This is the only place where exceptions become exit codes (see errors.py). Handlers are
imported lazily, so `uctr --help` and the per-rank hot path stay cheap.
"""

import argparse
import importlib
import logging
import os
import sys
from typing import Callable, List, Optional

from uctr_batch import __version__, log
from uctr_batch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USAGE, UctrError

_log = log.get()


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the project's error:/hint: shape, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message}\nhint: see '{self.prog} --help'\n")
        raise SystemExit(EXIT_USAGE)


def _common(p: argparse.ArgumentParser, top: bool = False) -> None:
    # Subcommands leave the counts unset unless given, so `uctr -v pull` keeps its -v.
    default = 0 if top else argparse.SUPPRESS
    p.add_argument("-v", "--verbose", action="count", default=default, help="more diagnostics (-vv: debug)")
    p.add_argument("-q", "--quiet", action="count", default=default, help="errors only")


def _registry_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", help="os/arch[/variant] to select from a multi-arch image (default: this host)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP for this registry (repeatable; also UCTR_INSECURE_REGISTRIES)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle for registry TLS (also UCTR_TLS_CA)")
    from uctr_batch.envnum import flag_type

    p.add_argument("--parallel", type=flag_type("UCTR_PARALLEL"), metavar="N",
                   help="concurrent layer downloads (default 4; UCTR_PARALLEL)")


def _args_pull(p):
    _registry_opts(p)
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:12")


def _args_resolve(p):
    from uctr_batch.envnum import bounded

    _registry_opts(p)
    p.add_argument("--timeout", type=bounded(float, 0.1, 600), default=30.0, metavar="SECONDS",
                   help="give up after this long (0.1 to 600, default 30)")
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:12")


def _args_create(p):
    _registry_opts(p)
    p.add_argument("--dest", metavar="DIR", help="bundle directory to create (default: node-local store)")
    p.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing image")
    p.add_argument("image")


def _args_images(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _args_inspect(p):
    p.add_argument("--platform", help="os/arch[/variant] of a multi-platform image (default: this host)")
    p.add_argument("image")


def _args_rmi(p):
    p.add_argument("image", nargs="+")


def _args_gc(p):
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def _args_verify(p):
    p.add_argument("--remove", action="store_true", help="delete blobs that fail verification")


def _args_load(p):
    p.add_argument("file", help="docker-archive tar (docker save), OCI archive tar, or OCI layout dir; "
                   "or oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:NAME] to pick one image")
    p.add_argument("--tag", metavar="REF", help="reference to record the image under")
    p.add_argument("--platform", help="os/arch[/variant] to select from a multi-arch image (default: this host)")


def _args_login(p):
    p.add_argument("registry", help="registry host[:port]")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")


def _args_logout(p):
    p.add_argument("registry")


def _args_ps(p):
    p.add_argument("--json", action="store_true")


def _args_rm(p):
    p.add_argument("bundle", nargs="+", help="bundle id (from `uctr ps`) or path")


def _args_policy(p):
    sub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    check = sub.add_parser("check", help="validate policy files (trust not required)")
    check.add_argument("file", nargs="+", help="policy file; a main file is checked with its conf.d/")
    explain = sub.add_parser("explain", help="show what the policy does on a node, and why")
    explain.add_argument("--node", help="node name (default: this node, SLURMD_NODENAME)")
    explain.add_argument("--partition", help="partition/queue (default: the job's)")
    explain.add_argument("--features", metavar="F,..", help="node features (default: from scontrol)")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    for action in (check, explain):  # -v/-q after the action too; SUPPRESS keeps earlier counts
        action.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS)
        action.add_argument("-q", "--quiet", action="count", default=argparse.SUPPRESS)


def _args_run(p):
    _registry_opts(p)
    from uctr_batch.run import add_arguments  # light module: os, typing, the modes' base

    add_arguments(p)


def _args_doctor(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _args_slurm(p):
    sub = p.add_subparsers(dest="slurm_command", metavar="ACTION", parser_class=_Parser)
    sub.required = True
    install = sub.add_parser("install", help="build the SPANK plugin, install hooks, print the "
                                             "plugstack.conf and slurm.conf lines")
    install.add_argument("--prefix", required=True, metavar="DIR",
                         help="install under DIR (lib/uctr, libexec/uctr, bin, share/uctr)")
    install.add_argument("--policy", metavar="FILE",
                         help="site policy the hooks and the plugin use (default /etc/uctr/policy.yaml)")
    install.add_argument("--log-dir", metavar="DIR",
                         help="append the hooks' diagnostics to DIR/uctr-{prolog,epilog}.NODE.log "
                              "(slurmd discards them otherwise)")
    install.add_argument("--dry-run", action="store_true", help="only print what would be done")
    _args_slurm_oci(install, sub)


def _args_slurm_oci(install, sub):
    """--oci: uctr's oci.conf profile for Slurm's own --container (batch/oci_install.py)."""
    conf_dir = dict(metavar="DIR", help="slurm.conf's directory, where oci.conf goes "
                    "(default: that of $SLURM_CONF, else /etc/slurm)")
    install.add_argument("--oci", action="store_true",
                         help="also write uctr's oci.conf profile (Slurm >= 23.02), so that "
                              "Slurm's own --container=IMAGE runs tasks through uctr-exec")
    install.add_argument("--slurm-conf-dir", **conf_dir)
    install.add_argument("--replace-oci-conf", action="store_true",
                         help="replace an oci.conf that is not uctr's (kept as "
                              "oci.conf.before-uctr; uninstall puts it back)")
    uninstall = sub.add_parser("uninstall", help="remove uctr's oci.conf profile (--oci); "
                                                 "an oci.conf that is not uctr's stays")
    uninstall.add_argument("--oci", action="store_true", required=True,
                           help="remove the oci.conf profile (the only thing uninstall does)")
    uninstall.add_argument("--slurm-conf-dir", **conf_dir)


def _args_pbs(p):
    from uctr_batch.batch.pbs import add_arguments  # standard library only at import

    add_arguments(p, _Parser)


# name -> (help, "module:function", add_arguments)
COMMANDS = {
    "pull": ("pull an image into the shared cache", "uctr_batch.image.pull:cmd_pull", _args_pull),
    "resolve": ("print the digest reference a tag names now (the submit-time pin)",
                "uctr_batch.image.pull:cmd_resolve", _args_resolve),
    "create": ("unpack an image into a node-local root filesystem; prints its path",
               "uctr_batch.image.rootfs:cmd_create", _args_create),
    "images": ("list cached images", "uctr_batch.image.store:cmd_images", _args_images),
    "inspect": ("show an image's manifest and config", "uctr_batch.image.store:cmd_inspect", _args_inspect),
    "rmi": ("remove images from the cache index", "uctr_batch.image.store:cmd_rmi", _args_rmi),
    "gc": ("delete cache blobs no image refers to", "uctr_batch.image.store:cmd_gc", _args_gc),
    "verify": ("re-hash every cached blob", "uctr_batch.image.store:cmd_verify", _args_verify),
    "load": ("import a docker-archive / OCI archive", "uctr_batch.image.archive:cmd_load", _args_load),
    "login": ("store registry credentials (0600)", "uctr_batch.image.auth:cmd_login", _args_login),
    "logout": ("forget registry credentials", "uctr_batch.image.auth:cmd_logout", _args_logout),
    "ps": ("list node-local root filesystems", "uctr_batch.image.rootfs:cmd_ps", _args_ps),
    "rm": ("remove node-local root filesystems", "uctr_batch.image.rootfs:cmd_rm", _args_rm),
    "run": ("run a command in an image or rootfs (no root needed)", "uctr_batch.run:cmd_run", _args_run),
    "doctor": ("what this node supports: user namespaces, modes, tools, free space",
               "uctr_batch.doctor:cmd_doctor", _args_doctor),
    "policy": ("check the site policy, explain it for a node", "uctr_batch.policy.explain:cmd_policy", _args_policy),
    "slurm": ("Slurm integration: `uctr slurm install`", "uctr_batch.batch.slurm:cmd_slurm", _args_slurm),
    "pbs": ("OpenPBS integration: `uctr pbs install|uninstall`", "uctr_batch.batch.pbs:cmd_pbs", _args_pbs),
}


def build_parser(argv: Optional[List[str]] = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand gets its arguments, so their (sometimes
    lazily imported) definitions cost nothing for the other commands."""
    wanted = _command_in(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="uctr", description="Containers for HPC batch jobs, without root.")
    parser.add_argument("--version", action="version", version=f"uctr-batch {__version__}")
    _common(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, target, add_args) in COMMANDS.items():
        if wanted and name != wanted:
            continue  # a known command needs no other subparser (each costs ~1 ms)
        p = sub.add_parser(name, help=help_, description=help_)
        if name == wanted:
            _common(p)
            add_args(p)
        p.set_defaults(_target=target)
    return parser


def _command_in(argv: List[str]) -> Optional[str]:
    """The first word that names a command (options before it belong to `uctr`)."""
    for word in argv:
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def _handler(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    verbosity = log.setup(args.verbose - args.quiet)
    if not getattr(args, "_target", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run_handler(args._target, args, verbosity)


def run_handler(target: str, args, verbosity: int) -> int:
    """Call a handler and turn what it raises into an exit code."""
    try:
        return int(_handler(target)(args) or 0)
    except UctrError as e:
        report(e)
        if verbosity >= 2:
            _log.exception("traceback")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception:  # a bug: keep the traceback visible
        _log.critical("internal error (please report this)", exc_info=True)
        return EXIT_INTERNAL


def report(e: UctrError) -> None:
    sys.stderr.write(f"error: {e.message}\n")
    if e.hint:
        sys.stderr.write(f"hint: {e.hint}\n")


def entry() -> None:
    """The `uctr` console script. Ends with os._exit once output is flushed: tearing down
    every module at exit costs tens of milliseconds once requests is loaded, and no uctr
    command leaves work for exit handlers (with-blocks release locks and temp files)."""
    code = main()
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
