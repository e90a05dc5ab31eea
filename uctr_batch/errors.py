"""The one error tree and the one exit-code table of uctr-batch.

Every user-facing failure is a UctrError carrying a message and an optional hint. Only
``cli.main`` (and the thin hook entry points) turn these into ``error:``/``hint:`` lines and
exit codes. This module imports nothing from the package, so every layer may raise from it.
"""

# No typing import: this module is on the per-rank hot path (uctr-exec), where `import
# typing` alone costs several milliseconds; the annotation below is a string.

# Exit codes. Documented in README.md ("Exit codes"); keep the two in step.
EXIT_OK = 0
EXIT_USER = 1  # user or configuration error
EXIT_USAGE = 2  # bad command line
EXIT_MODE = 3  # execution mode not allowed or not available on this node
EXIT_REGISTRY = 4  # registry, network or pull failure
EXIT_LAYER = 5  # an image layer was rejected by the safety checks
EXIT_INTERNAL = 70  # a bug in uctr-batch (traceback with -vv)
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C) before a payload ran: 128+2, as a shell reports it

EXIT_CODES = {
    EXIT_OK: "ok",
    EXIT_USER: "user or configuration error",
    EXIT_USAGE: "usage error",
    EXIT_MODE: "execution mode unavailable or not allowed on this node",
    EXIT_REGISTRY: "registry or pull failure",
    EXIT_LAYER: "image layer rejected by the safety checks",
    EXIT_INTERNAL: "internal error",
    EXIT_INTERRUPTED: "interrupted (SIGINT, Ctrl-C)",
}
# `uctr run` and `uctr-exec` also exit with the payload's own status: 126 (not executable),
# 127 (not found in the image) or 128+N (killed by signal N) come from the payload side.
PAYLOAD_CODES = (126, 127)  # plus 128+N, N a signal number


class UctrError(Exception):
    """Base of every error a user can act on."""

    exit_code = EXIT_USER

    def __init__(self, message: str, hint: "Optional[str]" = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class UsageError(UctrError):
    exit_code = EXIT_USAGE


class ConfigError(UctrError):
    """Bad policy, bad settings, untrusted policy file."""


class ReferenceError_(UctrError):
    """An image reference that does not parse. (Trailing _ avoids the builtin name.)"""


class StorageError(UctrError):
    """Unsafe or unusable cache / node-local directory, quota, lock timeout."""


class NoSpace(StorageError):
    """ENOSPC/EDQUOT: the disk, the user's quota or the inodes ran out (fsutil.no_space)."""


class ImageNotFound(UctrError):
    """The image is not in the local cache (and was not pulled)."""


class RegistryError(UctrError):
    exit_code = EXIT_REGISTRY


class AuthError(RegistryError):
    pass


class DigestMismatch(RegistryError):
    pass


class TransferError(RegistryError):
    """Connection failures, 5xx after retries, stalls, truncated bodies."""


class LayerRejected(UctrError):
    exit_code = EXIT_LAYER


class ModeError(UctrError):
    exit_code = EXIT_MODE


class InternalError(UctrError):
    exit_code = EXIT_INTERNAL
