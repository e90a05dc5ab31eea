"""Hand the payload the signal dispositions and mask that the launcher itself received.

CPython ignores SIGPIPE and SIGXFSZ at start-up and keeps no record of what it inherited, so
a payload exec'd from Python would run with both ignored (`yes | head -1` would print
"Broken pipe" and exit 1). The /bin/sh launchers (launchers/uctr-exec) read what they
inherited from /proc/$$/status with shell builtins only, and the C front (launchers/c, where
it execs Python itself) asks sigaction and rt_sigprocmask; both export it as

    UCTR_SIGSTATE=PID:SIGIGN:SIGBLK        (hex masks as /proc prints them)

PID is the launcher's own, which `exec python` keeps: a value inherited from anywhere else
(another process, a stale environment) does not match os.getpid() and is ignored.

restore() runs just before every execve of a mode (base.execve): each signal ignored in
SIGIGN is ignored, every other one is reset to default (handlers Python or uctr installed
are reset by exec anyway; this also undoes the SIG_IGN Python set), and the mask becomes
SIGBLK. Without a capture (the pip console scripts `uctr`, `uctr-exec`, python -m) only
what Python changed is undone: SIGPIPE and SIGXFSZ go back to default; the mask and any other
inherited SIG_IGN are what this process still has, which is what it received.

The variable never reaches the payload or a runtime: restore() removes it from both.
Only _signal is used: it is built in and already loaded, so this costs no import on the
per-rank path and works after N1's pivot_root has hidden the host's Python library.
"""

import os

import _signal

ENV = "UCTR_SIGSTATE"
PYTHON_IGNORES = (_signal.SIGPIPE, _signal.SIGXFSZ)  # what CPython sets to SIG_IGN itself
_UNTOUCHABLE = (_signal.SIGKILL, _signal.SIGSTOP)


def parse(text, pid: int):
    """(ignored, blocked) bit masks from a UCTR_SIGSTATE value captured by process pid, or
    None when it is malformed or was captured by another process."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or any(not p or len(p) > 16 for p in parts):
        return None
    try:
        owner, ignored, blocked = int(parts[0]), int(parts[1], 16), int(parts[2], 16)
    except ValueError:
        return None
    if owner != pid:
        return None
    return ignored, blocked


def signals_of(mask: int):
    """Signal numbers whose bit is set in a /proc SigIgn/SigBlk mask (bit N-1 is signal N)."""
    return [n for n in range(1, _signal.NSIG) if mask >> (n - 1) & 1]


def snapshot():
    """This process's dispositions and mask, for undo() when an execve fails."""
    handlers = {}
    for n in range(1, _signal.NSIG):
        try:
            handlers[n] = _signal.getsignal(n)
        except (OSError, ValueError):
            continue
    return handlers, _signal.pthread_sigmask(_signal.SIG_BLOCK, [])


def undo(saved) -> None:
    handlers, mask = saved
    for n, handler in handlers.items():
        if n in _UNTOUCHABLE or handler is None:
            continue
        try:
            _signal.signal(n, handler)
        except (OSError, ValueError, TypeError):
            continue
    _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)


def restore(exec_env=None) -> None:
    """Give this process the launcher's signal state (just before execve); drop ENV from
    os.environ and from exec_env (the environment the exec will get)."""
    if exec_env is not None:
        exec_env.pop(ENV, None)
    state = parse(os.environ.pop(ENV, None), os.getpid())
    try:
        if state is None:
            for n in PYTHON_IGNORES:
                _signal.signal(n, _signal.SIG_DFL)
            return
        ignored, blocked = state
        for n in range(1, _signal.NSIG):
            if n in _UNTOUCHABLE:
                continue
            try:
                _signal.signal(n, _signal.SIG_IGN if ignored >> (n - 1) & 1 else _signal.SIG_DFL)
            except (OSError, ValueError):  # glibc's reserved real-time signals (32, 33)
                continue
        _signal.pthread_sigmask(_signal.SIG_SETMASK, signals_of(blocked))
    except ValueError:  # not the main thread: signal.signal() is refused there
        return
