"""`uctr doctor`: what this node supports, and why a mode does not work here.

Checks the kernel features the modes rely on (unprivileged user namespaces: sysctls and a
real trial in a child; seccomp and ptrace restrictions; the cgroup layout crun cares about),
runs every mode's probe(), and shows the free space of the cache and node-local
directories. Exit status 0 when at least one mode of the node's ladder works, 3 otherwise.
"""

import json
import os
import platform
import sys
from typing import Dict, List

from uctr_batch import log
from uctr_batch.errors import EXIT_MODE, UctrError
from uctr_batch.modes import nsutil
from uctr_batch.modes.base import MODE_NAMES, get_mode

_log = log.get("doctor")

SYSCTLS = (
    "/proc/sys/user/max_user_namespaces",
    "/proc/sys/kernel/unprivileged_userns_clone",
    "/proc/sys/kernel/apparmor_restrict_unprivileged_userns",
    "/proc/sys/kernel/yama/ptrace_scope",
)


def _read(path: str):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def userns_report() -> Dict:
    problem = nsutil.userns_sysctl_problem() or nsutil.userns_trial_problem()
    return {
        "works": problem is None,
        "problem": problem,
        "sysctls": {p.replace("/proc/sys/", "").replace("/", "."): _read(p) for p in SYSCTLS},
    }


def process_status() -> Dict:
    """Seccomp mode and no_new_privs of this process (an outer container may filter)."""
    out = {"seccomp": None, "no_new_privs": None}
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key == "Seccomp":
            out["seccomp"] = {"0": "off", "1": "strict", "2": "filter"}.get(value.strip(), value.strip())
        elif key == "NoNewPrivs":
            out["no_new_privs"] = value.strip() == "1"
    return out


def modes_report() -> List[Dict]:
    rows = []
    for name in MODE_NAMES:
        mode = get_mode(name)
        try:
            result = mode.probe()
        except UctrError as e:
            rows.append({"mode": name, "ok": False, "reason": e.message, "version": None,
                         "summary": mode.summary})
            continue
        rows.append(dict(result.to_dict(), mode=name, summary=mode.summary))
    return rows


def storage_report() -> List[Dict]:
    from uctr_batch import settings

    rows = []
    for what, path in (("cache", settings.default_cache_dir()),
                       ("local", settings.default_local_dir())):
        probe = str(path)
        while probe and not os.path.exists(probe):
            probe = os.path.dirname(probe)
        try:
            st = os.statvfs(probe or "/")
            free = st.f_bavail * st.f_frsize
        except OSError:
            free = None
        rows.append({"what": what, "path": str(path), "exists": os.path.isdir(path),
                     "free_bytes": free, "fstype": fstype_of(probe or "/")})
    return rows


def fstype_of(path: str):
    """Filesystem type of the mount holding path (longest mount-point prefix)."""
    best, fstype = "", None
    for line in (_read("/proc/self/mountinfo") or "").splitlines():
        fields = line.split()
        if len(fields) < 7 or "-" not in fields:
            continue
        mnt = fields[4]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fstype = mnt, fields[fields.index("-") + 1]
    return fstype


def policy_report() -> Dict:
    try:
        from uctr_batch.run import node_policy

        policy = node_policy()
    except UctrError as e:
        return {"error": e.message}
    return {"reason": policy.reason, "ladder": list(policy.modes),
            "user_modes": list(policy.user_modes)}


def collect() -> Dict:
    from uctr_batch.modes.r1 import cgroup_mode

    return {
        "kernel": platform.release(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "user": {"uid": os.getuid(), "gid": os.getgid()},
        "userns": userns_report(),
        "process": process_status(),
        "cgroups": cgroup_mode(),
        "modes": modes_report(),
        "storage": storage_report(),
        "policy": policy_report(),
    }


def _size(n) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return "%.1f %s" % (n, unit) if unit != "B" else "%d B" % n
        n /= 1024.0
    return "?"


def render(report: Dict) -> str:
    u = report["userns"]
    lines = [
        "kernel       %s (%s), python %s" % (report["kernel"], report["machine"], report["python"]),
        "user         uid %d gid %d" % (report["user"]["uid"], report["user"]["gid"]),
        "userns       %s" % ("works" if u["works"] else "NOT usable: " + u["problem"]),
    ]
    for key, value in u["sysctls"].items():
        if value is not None:
            lines.append("  %-45s %s" % (key, value))
    p = report["process"]
    lines.append("seccomp      %s, no_new_privs %s" % (p["seccomp"], p["no_new_privs"]))
    lines.append("cgroups      %s" % report["cgroups"])
    pol = report["policy"]
    if "error" in pol:
        lines.append("policy       error: %s" % pol["error"])
    else:
        lines.append("policy       %s; ladder %s; --mode allows %s" % (
            pol["reason"], ",".join(pol["ladder"]) or "-", ",".join(pol["user_modes"]) or "-"))
    lines.append("modes")
    for m in report["modes"]:
        state = "ok " if m["ok"] else "NO "
        detail = m["reason"] + (" [%s]" % m["version"] if m.get("version") else "")
        lines.append("  %s %s  %s" % (m["mode"], state, detail))
    lines.append("storage")
    for s in report["storage"]:
        lines.append("  %-5s %s (%s, %s free%s)" % (s["what"], s["path"], s["fstype"] or "?",
                                                   _size(s["free_bytes"]),
                                                   "" if s["exists"] else ", not created yet"))
    return "\n".join(lines) + "\n"


def cmd_doctor(args) -> int:
    report = collect()
    if getattr(args, "json", False):
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    ladder = report["policy"].get("ladder") or list(MODE_NAMES)
    working = [m["mode"] for m in report["modes"] if m["ok"] and m["mode"] in ladder]
    if not working:
        _log.error("no mode of this node's ladder works here")
        return EXIT_MODE
    return 0
