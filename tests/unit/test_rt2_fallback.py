"""Red-team regression (issue 10, second pass): the first jobs of several users on a node
with planted node-local dirs start at once; each prolog prepares that user's fallback. The
record of the uctr-fallback.* directory must be one for all of them: with one per racing
prolog, all but the last user found no directory of theirs under the recorded one, and
their jobs failed."""

import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from uctr_batch.batch import location

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="prepares fallbacks: root only")
PROLOGS = 6


def _prepare(args):
    base, env, uid, barrier = args
    barrier.wait()  # every prolog prepares at the same moment
    return uid, location.prepare_fallback(base, uid, uid, env)


def test_prologs_racing_to_prepare_fallbacks_agree_on_one(tmp_path):
    top = Path(tempfile.mkdtemp(prefix="uctr-rt2-"))
    try:
        top.chmod(0o755)
        base = top / "tmp"
        base.mkdir()
        base.chmod(0o1777)
        env = {"UCTR_RUN_DIR": str(top / "run")}
        ctx = multiprocessing.get_context("fork")
        with ctx.Manager() as manager:
            barrier = manager.Barrier(PROLOGS)
            with ctx.Pool(PROLOGS) as pool:
                made = pool.map(_prepare, [(str(base), env, 3000 + i, barrier)
                                           for i in range(PROLOGS)])
        for uid, mine in made:
            assert location.fallback_for(base / f"uctr-{uid}", env, uid=uid) == mine
        assert len([n for n in os.listdir(base) if n.startswith("uctr-fallback.")]) == 1
    finally:
        shutil.rmtree(top, ignore_errors=True)
