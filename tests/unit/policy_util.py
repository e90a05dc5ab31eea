"""Helpers shared by the test_policy_* modules: write policy files, switch their owner."""

import os
import pwd
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "site-config" / "policy.yaml"
TEST_USER = "uctrtest"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown policy files")


def write_policy(directory: Path, text: str, name: str = "policy.yaml") -> Path:
    """Write dedented YAML to directory/name (parents created) and return the path."""
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def user_ids():
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        pytest.skip(f"needs the user {TEST_USER} (run scripts/install.sh)")
    return entry.pw_uid, entry.pw_gid
