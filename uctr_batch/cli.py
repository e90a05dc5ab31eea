"""The `uctr` command line: subcommands -> module functions.

This is the only place where exceptions become exit codes (see errors.py). Handlers are
imported lazily, so `uctr --help` and the per-rank hot path stay cheap.
"""

import argparse
import importlib
import sys
from typing import Callable, List, Optional

from uctr_batch import __version__, log
from uctr_batch.errors import EXIT_INTERNAL, EXIT_USAGE, UctrError

_log = log.get()


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in the project's error:/hint: shape, exit 2."""

    def error(self, message: str):  # noqa: D401 - argparse API
        sys.stderr.write(f"error: {message}\nhint: see '{self.prog} --help'\n")
        raise SystemExit(EXIT_USAGE)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-v", "--verbose", action="count", default=0, help="more diagnostics (-vv: debug)")
    p.add_argument("-q", "--quiet", action="count", default=0, help="errors only")


def _registry_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--platform", help="os/arch[/variant] to select from a multi-arch image (default: this host)")
    p.add_argument("--insecure-registry", action="append", default=[], metavar="HOST[:PORT]",
                   help="allow plain HTTP for this registry (repeatable; also UCTR_INSECURE_REGISTRIES)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA bundle for registry TLS (also UCTR_TLS_CA)")
    p.add_argument("--parallel", type=int, metavar="N", help="concurrent layer downloads (default 4; UCTR_PARALLEL)")


def _args_pull(p):
    _registry_opts(p)
    p.add_argument("image", help="image reference, e.g. docker.io/library/debian:12")


def _args_create(p):
    _registry_opts(p)
    p.add_argument("--dest", metavar="DIR", help="bundle directory to create (default: node-local store)")
    p.add_argument("--no-pull", action="store_true", help="fail instead of pulling a missing image")
    p.add_argument("image")


def _args_images(p):
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _args_inspect(p):
    p.add_argument("image")


def _args_rmi(p):
    p.add_argument("image", nargs="+")


def _args_gc(p):
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")


def _args_verify(p):
    p.add_argument("--remove", action="store_true", help="delete blobs that fail verification")


def _args_load(p):
    p.add_argument("file", help="docker-archive tar (docker save), OCI archive tar, or OCI layout dir")
    p.add_argument("--tag", metavar="REF", help="reference to record the image under")


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


# name -> (help, "module:function", add_arguments)
COMMANDS = {
    "pull": ("pull an image into the shared cache", "uctr_batch.image.pull:cmd_pull", _args_pull),
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
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="uctr", description="Containers for HPC batch jobs, without root.")
    parser.add_argument("--version", action="version", version=f"uctr-batch {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (help_, target, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        _common(p)
        add_args(p)
        p.set_defaults(_target=target)
    return parser


def _handler(target: str) -> Callable:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
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
        return 130
    except BrokenPipeError:
        return 0
    except Exception:  # a bug: keep the traceback visible
        _log.exception("internal error (please report this)")
        return EXIT_INTERNAL


def report(e: UctrError) -> None:
    sys.stderr.write(f"error: {e.message}\n")
    if e.hint:
        sys.stderr.write(f"hint: {e.hint}\n")


if __name__ == "__main__":
    raise SystemExit(main())
