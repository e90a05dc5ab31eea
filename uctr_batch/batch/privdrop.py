"""Run a function as another user in a forked child, from a root hook (prolog, epilog).

The child drops every privilege before the function runs, in the only safe order:
supplementary groups (initgroups from the passwd entry), then setresgid, then setresuid; all
three uids are set, so root cannot be regained. Only JSON comes back through a pipe: the
root parent never unpickles or otherwise interprets data the child could have been tricked
into producing.
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import json
import os
import pwd
import select
import signal
import time
import traceback
from collections.abc import Callable, Mapping

from uctr_batch import errors, log
from uctr_batch.records import Frozen

_log = log.get("privdrop")

SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_CHILD_FAILED = 70


class Identity(Frozen):
    __slots__ = ("uid", "gid", "name", "home")  # name None: no passwd entry on this node

    @classmethod
    def of(cls, uid: int, gid: int | None = None) -> "Identity":
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            if gid is None:
                raise errors.ConfigError(f"user {uid} has no passwd entry on this node",
                                         "the user must resolve on this node (check "
                                         "nsswitch.conf, sssd or LDAP)")
            return cls(uid, gid, None, "/")
        return cls(uid, pw.pw_gid if gid is None else gid, pw.pw_name, pw.pw_dir)

    def environment(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """A clean environment for the user: nothing of root's leaks into the child."""
        env = {"PATH": SAFE_PATH, "HOME": self.home, "LANG": os.environ.get("LANG", "C.UTF-8")}
        if self.name:
            env.update(USER=self.name, LOGNAME=self.name)
        env.update(extra or {})
        return env


def drop_privileges(who: Identity) -> None:
    """Become WHO for good (groups, then gids, then uids) and prove root is gone."""
    if who.name is not None:
        os.initgroups(who.name, who.gid)
    else:
        os.setgroups([who.gid])
    os.setresgid(who.gid, who.gid, who.gid)
    os.setresuid(who.uid, who.uid, who.uid)
    if who.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - the kernel would have to be broken
            raise errors.InternalError("privileges could be regained after dropping them")
    if os.getresuid() != (who.uid,) * 3 or os.getresgid() != (who.gid,) * 3:
        raise errors.InternalError(f"could not drop privileges to uid {who.uid}")


def run_as(who: Identity, func: Callable[..., object], *args, timeout: float | None = None,
           env: Mapping[str, str] | None = None, **kwargs) -> object:
    """Return func(*args, **kwargs) computed as WHO in a forked child.

    The result must be JSON-serialisable. A UctrError raised in the child is raised again
    here with its class, message and hint; anything else becomes InternalError with the
    child's traceback. After TIMEOUT seconds the child's process group is killed and a
    UctrError raised.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        os.close(read_fd)
        _child(who, func, args, kwargs, env, write_fd)
    os.close(write_fd)
    try:
        data = _read_all(read_fd, pid, timeout)
    finally:
        os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    return _decode(data, status, who)


def _child(who, func, args, kwargs, env, write_fd) -> None:
    code = 0
    try:
        os.setpgid(0, 0)  # a timeout kills everything the function started
        drop_privileges(who)
        os.environ.clear()
        os.environ.update(who.environment(env))
        try:
            os.chdir(who.home)
        except OSError:
            os.chdir("/")
        payload = {"result": func(*args, **kwargs)}
    except errors.UctrError as e:
        payload = {"error": type(e).__name__, "message": e.message, "hint": e.hint}
    except BaseException:  # noqa: BLE001 - reported to the parent as an internal error
        payload = {"internal": traceback.format_exc()}
        code = _CHILD_FAILED
    try:
        data = json.dumps(payload).encode()
    except (TypeError, ValueError):
        data = json.dumps({"internal": "result is not JSON-serialisable"}).encode()
    try:
        while data:
            data = data[os.write(write_fd, data):]
    finally:
        os._exit(code)


def _read_all(fd: int, pid: int, timeout: float | None) -> bytes:
    deadline = None if timeout is None else time.monotonic() + timeout
    chunks = []
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([fd], [], [], wait)
        if not ready:
            _kill_group(pid)
            os.waitpid(pid, 0)
            raise errors.UctrError(f"gave up after {timeout:.0f} s: the operation did not finish",
                                   "the registry may be slow or the image very large; "
                                   "the site can raise storage.stage_timeout in the policy")
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _kill_group(pid: int) -> None:
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
            return
        except ProcessLookupError:
            continue


def _decode(data: bytes, status: int, who: Identity) -> object:
    try:
        payload = json.loads(data.decode())
    except ValueError:
        raise errors.InternalError(
            f"child running as uid {who.uid} died without an answer (wait status {status})")
    if "result" in payload:
        return payload["result"]
    if "error" in payload:
        raise _error_class(payload["error"])(str(payload.get("message")), payload.get("hint"))
    raise errors.InternalError(f"failed as uid {who.uid}:\n{payload.get('internal', '')}")


def _error_class(name: str):
    cls = getattr(errors, str(name), None)
    if isinstance(cls, type) and issubclass(cls, errors.UctrError):
        return cls
    return errors.UctrError
