"""The SPANK plugin must not register an option name that Slurm itself owns.

Slurm disables a plugin option that duplicates a built-in one (`--container` since 21.08,
`--runtime` in 26.05's successor and `--container-type` in 26.05), so such an option would
silently never reach the plugin. The table is read from the C source, as the plugin is built.
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLURM_OWNED = {"container", "container-id", "container-type", "runtime"}


def registered_options():
    source = (REPO / "spank" / "uctr_args.c").read_text()
    table = source[source.index("struct spank_option options[]"):]
    table = table[:table.index("SPANK_OPTIONS_TABLE_END")]
    return re.findall(r'\{\s*"([^"]+)"', table)


def test_the_option_table_is_found():
    names = registered_options()
    assert "container-image" in names and len(names) >= 5, names


def test_no_option_slurm_owns():
    assert not set(registered_options()) & SLURM_OWNED
