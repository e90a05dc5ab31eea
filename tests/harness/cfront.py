"""Build the C front of uctr-exec (launchers/c) for a test, into a directory of the test's
own (several engineers and test runs build at once): the release build, and the
AddressSanitizer+UBSan builds the tests run. Always with -Wall -Wextra -Werror (the
Makefile's flags): a warning fails the build, and so the test."""

import os
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "launchers" / "c"
PY_LAUNCHER = REPO / "launchers" / "uctr-exec"
TARGETS = ("uctr-exec", "uctr-exec-asan", "fastrec-tool", "fastrec-fuzz")


def compiler():
    return shutil.which(os.environ.get("CC", "cc"))


def build(out: Path, targets=TARGETS, python=None) -> dict:
    """make the TARGETS with their outputs in OUT (world-readable: the unprivileged test
    user runs them); name -> path. PYTHON: a front that hands ranks over to that Python
    directly (PY_PYTHON, as `uctr slurm install` builds it), not to the shim; give it an
    OUT of its own (make does not rebuild for other variables)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    for name in targets:
        subprocess.run(["make", "-s", "-C", str(SRC), "-f", "Makefile",
                        f"PY_LAUNCHER={PY_LAUNCHER}", *([f"PY_PYTHON={python}"] if python else []),
                        f"OUT={out}", str(out / name)], check=True, capture_output=True,
                       text=True)
    return {name: out / name for name in targets}


# ASan's leak checker needs ptrace-like access that fails inside user namespaces, and the
# payload is exec'd anyway: memory errors and UB still abort (halt_on_error).
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99",
           "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=99"}
