"""Build and install the C front of uctr-exec (launchers/c, docs/launcher.md "Two paths")
for `uctr slurm install` and `uctr pbs install`.

The front joins a step's running container from C and hands everything else to the Python
launcher it was built for (an absolute path compiled in, with the variables that launcher's
wrapper exports: the record's checks must see the environment the Python launcher sees).
Built in a scratch copy (the source tree may be read-only), with the Makefile's
-Wall -Wextra -Werror; never installed set-uid.
"""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Tuple

from uctr_batch import log, proc

_log = log.get("batch.cfront")


def compiler() -> Optional[str]:
    """The C compiler the Makefile would use, when make is there too."""
    if shutil.which("make") is None:
        return None
    return shutil.which(os.environ.get("CC") or "cc")


def c_string(text: str) -> str:
    """A C string literal for any text (paths may hold quotes or backslashes)."""
    out = []
    for b in text.encode():
        ch = chr(b)
        out.append(ch if 0x20 <= b < 0x7f and ch not in '"\\?' else "\\%03o" % b)
    return '"' + "".join(out) + '"'


def front_config(py_launcher: str, env: Sequence[Tuple[str, str]],
                 direct: Optional[Tuple[str, str]] = None) -> str:
    """front_config.h. DIRECT, (python, package directory): what PY_LAUNCHER runs in the
    end (launchers/uctr-exec of a checkout, on that Python), which the front then execs
    itself, as the shim would (python -S -c, PYTHONPATH, UCTR_SIGSTATE): two sh fewer on
    the path of every rank it hands over (a step's creator waits for them)."""
    pairs = "".join("%s, %s, " % (c_string(k), c_string(v)) for k, v in env)
    text = ("/* written by uctr-batch's installer: the Python launcher and its exports */\n"
            "#define UCTR_PY_LAUNCHER %s\n#define UCTR_FRONT_ENV %s\n"
            % (c_string(py_launcher), pairs))
    if direct:
        text += ("#define UCTR_PY_PYTHON %s\n#define UCTR_PY_PACKAGE %s\n"
                 % (c_string(direct[0]), c_string(direct[1])))
    return text


def build_front(source: Path, py_launcher: str, env: Sequence[Tuple[str, str]],
                direct: Optional[Tuple[str, str]] = None) -> bytes:
    """The front's executable, built for PY_LAUNCHER and ENV (and DIRECT: front_config)."""
    with tempfile.TemporaryDirectory(prefix="uctr-front-") as scratch:
        build = Path(scratch) / "c"
        shutil.copytree(Path(source) / "launchers" / "c", build,
                        ignore=shutil.ignore_patterns("uctr-exec", "*-asan", "fastrec-*"))
        (build / "front_config.h").write_text(front_config(py_launcher, env, direct))
        proc.run(["make", "-s", "-C", str(build), "FRONT_CONFIG=1", "OUT=."],
                 error="building the uctr-exec C front failed",
                 hint="it needs make and a C compiler; without them the Python uctr-exec is "
                      "installed alone (slower per rank)")
        return (build / "uctr-exec").read_bytes()
