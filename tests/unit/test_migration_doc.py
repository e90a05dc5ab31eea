"""docs/migration.md keeps up with the SPANK plugin: a row for every option the plugin
registers, pyxis's whole option list among them, and a row for every pyxis plugstack key."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = (REPO / "docs" / "migration.md").read_text()
PLUGIN = (REPO / "spank" / "uctr_args.c").read_text()

# pyxis's options (NVIDIA/pyxis args.c, v0.24); `--no-X` forms share X's row
PYXIS_OPTIONS = ("container-image", "container-mounts", "container-workdir", "container-name",
                 "container-save", "container-mount-home", "no-container-mount-home",
                 "container-remap-root", "no-container-remap-root", "container-entrypoint",
                 "no-container-entrypoint", "container-entrypoint-log", "container-writable",
                 "container-readonly", "container-env", "container-unshare")
PYXIS_KEYS = ("runtime_path", "execute_entrypoint", "container_scope", "sbatch_support",
              "use_enroot_load", "use_squashfuse", "importer")


def registered():
    start = PLUGIN.index("static struct spank_option options[]")
    table = PLUGIN[start:PLUGIN.index("SPANK_OPTIONS_TABLE_END", start)]
    return set(re.findall(r'\{\s*"([a-z-]+)",', table))


def option_rows():
    rows = set()
    for line in DOC.splitlines():
        if line.startswith("| `--"):
            rows |= set(re.findall(r"`--([a-z-]+)`", line.split("|")[1]))
    return rows


def test_every_registered_option_has_a_row():
    missing = sorted(registered() - option_rows())
    assert not missing, f"docs/migration.md has no row for: {missing}"


def test_every_pyxis_option_is_registered_and_has_a_row():
    assert not set(PYXIS_OPTIONS) - registered()
    assert not set(PYXIS_OPTIONS) - option_rows()


def test_slurm_owned_option_names_are_not_taken():
    assert not {"container", "runtime"} & registered()


def test_every_pyxis_plugstack_key_has_a_row():
    rows = [line for line in DOC.splitlines() if line.startswith("| `")]
    missing = [k for k in PYXIS_KEYS if not any(f"`{k}`" in row.split("|")[1] for row in rows)]
    assert not missing, missing
