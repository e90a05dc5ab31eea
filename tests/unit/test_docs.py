"""The documentation against the code: README.md, docs/*.md and the site-config examples.

Docs are part of done, so they are held to what the code really does:
  * the README's exit-code table is errors.EXIT_CODES;
  * every `uctr COMMAND [ACTION] --option` and `uctr-exec --option` written in code spans or
    blocks is one the parsers accept, and every `--container-*` option is one the SPANK
    plugin registers;
  * every UCTR_* name the docs mention exists in the code, and every UCTR_* variable the
    product reads is documented somewhere;
  * every relative link (and #anchor) points at something that exists;
  * complete policy documents shown in the docs, and every site-config/*.yaml, validate with
    the real policy loader; the Slurm lines shown are the ones `uctr slurm install` prints.

(site-config/policy.yaml's content is asserted in test_policy_*; the PBS hook config
example in tests/pbs.)
"""

import argparse
import re
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest

from uctr_batch import cli, errors
from uctr_batch.launch import options as exec_options

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MARKDOWN = [README] + DOCS + sorted((REPO / "site-config").rglob("*.md"))
# The product's code: every UCTR_* variable it reads must be documented.
PRODUCT_DIRS = ("uctr_batch", "launchers", "hooks", "spank")
# Where a documented UCTR_* name may live: the product, its install/test scripts and the
# test harness (the README documents the harness's variables too).
CODE_PATHS = PRODUCT_DIRS + ("scripts", "tests/harness", "tests/conftest.py")
BINARY_SUFFIXES = {".o", ".so", ".pyc", ".png", ".gz", ".tar"}
UCTR_NAME = re.compile(r"(?<![A-Za-z0-9_])UCTR_[A-Z0-9_]+")


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# -- markdown -------------------------------------------------------------------------------

def split_markdown(text: str) -> Tuple[List[str], List[List[str]]]:
    """(prose lines, fenced code blocks as lists of lines)."""
    prose: List[str] = []
    blocks: List[List[str]] = []
    block = None
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            if block is None:
                block = []
            else:
                blocks.append(block)
                block = None
            continue
        (prose if block is None else block).append(line)
    return prose, blocks


def code_lines(path: Path) -> Iterator[str]:
    """Every line of code in a markdown file: fenced blocks (continuation lines joined) and
    inline `code` spans."""
    prose, blocks = split_markdown(path.read_text())
    for block in blocks:
        yield from "\n".join(block).replace("\\\n", " ").splitlines()
    for paragraph in "\n".join(prose).split("\n\n"):  # a code span may wrap a line
        yield from re.findall(r"`([^`]+)`", paragraph.replace("\n", " "))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    prose, _ = split_markdown(path.read_text())
    seen: Dict[str, int] = {}
    found = set()
    for line in prose:
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def table_rows(lines: List[str]) -> List[List[str]]:
    """The body rows of the first markdown table in lines (header and rule dropped)."""
    rows = [line for line in lines if line.strip().startswith("|")]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    return cells[2:]


def section(text: str, heading: str) -> List[str]:
    lines = text.splitlines()
    start = lines.index(f"## {heading}")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
               len(lines))
    return lines[start + 1:end]


# -- (1) exit codes -------------------------------------------------------------------------

def test_readme_exit_code_table_is_the_code_table():
    body = section(README.read_text(), "Exit codes")
    table = {int(code): meaning for code, meaning in table_rows(body)}
    assert table == errors.EXIT_CODES
    text = " ".join(body)
    assert "128+N" in text and "127" in text, "the README must say how payload statuses pass"


# -- (2) commands and options ---------------------------------------------------------------

def _token(word: str) -> str:
    """A shell word as docs write it, without synopsis brackets, ellipses and quotes."""
    word = word.strip("\"'`,;")
    word = word.lstrip("[(")
    while word.endswith(("...", "]", ")")):
        word = word[:-3] if word.endswith("...") else word[:-1]
    return word


def _words_after(line: str, program: str) -> Iterator[List[str]]:
    """For each `program` invocation in a line of code, the words after it, up to a shell
    comment or operator."""
    # (not "hook uctr": the PBS hook is named uctr in qmgr lines)
    for m in re.finditer(r"(?<![\w/.=-])(?<!hook )" + re.escape(program) + r"(?=\s|$)", line):
        words = []
        for raw in line[m.end():].split():
            if raw.startswith("#") or raw in ("|", "||", "&&", ";", ">", "2>", "<") \
                    or raw.startswith(("2>", ">")):
                break
            words.append(_token(raw))
        yield words


def _is_placeholder(word: str) -> bool:
    return word.isupper() or not word


def _subparser(parser: argparse.ArgumentParser, name: str):
    for action in parser._actions:  # argparse keeps no public handle on its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name), action.choices
    return None, {}


def _option_strings(parser: argparse.ArgumentParser) -> set:
    return {s for action in parser._actions for s in action.option_strings}


def _uctr_invocations() -> Iterator[Tuple[str, List[str]]]:
    for path in MARKDOWN:
        for line in code_lines(path):
            for words in _words_after(line, "uctr"):
                yield f"{rel(path)}: {line.strip()}", words


def _check_uctr(words: List[str]) -> List[str]:
    """Problems with one `uctr ...` invocation as written in the docs."""
    while words and words[0].startswith("-"):  # options of `uctr` itself
        if words[0] not in ("-v", "-vv", "-q", "--version", "-h", "--help"):
            return [f"unknown option of uctr: {words[0]}"]
        words = words[1:]
    if not words or _is_placeholder(words[0]):
        return []
    command, rest = words[0], words[1:]
    if command not in cli.COMMANDS:
        return [f"no such command: uctr {command}"]
    parser, _ = _subparser(cli.build_parser([command]), command)
    known = _option_strings(parser)
    action_parser, actions = _subparser(parser, "")
    if actions:  # uctr policy check|explain, uctr slurm install, uctr pbs install|uninstall
        positional = [w for w in rest if not w.startswith("-")]
        if positional and not _is_placeholder(positional[0]):
            if positional[0] not in actions:
                return [f"no such action: uctr {command} {positional[0]}"]
            known |= _option_strings(actions[positional[0]])
    problems = []
    for word in rest:
        if word == "--":
            break
        if word.startswith("-") and len(word) > 1:
            option = word.split("=", 1)[0]
            if option not in known and not re.fullmatch(r"-(v+|q+)", option):
                problems.append(f"uctr {command} has no option {option}")
    return problems


def test_uctr_commands_and_options_in_the_docs_exist():
    problems, seen = [], set()
    for where, words in _uctr_invocations():
        for problem in _check_uctr(words):
            problems.append(f"{where}\n    {problem}")
        if words and words[0] in cli.COMMANDS:
            seen.add(words[0])
    assert not problems, "\n".join(problems)
    # the README's command table names every command
    table = " ".join(row[0] for row in table_rows(section(README.read_text(), "Commands")))
    missing = [c for c in cli.COMMANDS if f"uctr {c}" not in table]
    assert not missing, f"README's command table lacks: {missing}"
    assert set(cli.COMMANDS) <= seen


def test_uctr_exec_options_in_the_docs_exist():
    problems = []
    for path in MARKDOWN:
        for line in code_lines(path):
            for words in _words_after(line, "uctr-exec"):
                options = []
                for word in words:  # options end at IMAGE, as in uctr-exec itself
                    if word == "--" or not word.startswith("-"):
                        if options and options[-1] in exec_options._WITH_VALUE:
                            options.append("x")  # the option's value
                            continue
                        break
                    options.append(word)
                for option in options:
                    if option.startswith("-") and option.split("=")[0] not in (
                            set(exec_options._WITH_VALUE) | set(exec_options._FLAGS)
                            | {"--verbose", "-h", "--help"}):
                        problems.append(f"{rel(path)}: {line.strip()}\n    no option {option}")
    assert not problems, "\n".join(problems)


def test_uctr_exec_flags_listed_here_are_the_real_ones():
    """The flag list above must not drift from uctr-exec's parser: each one parses, and an
    invented one does not."""
    for flag in ("--verbose", *exec_options._FLAGS):
        exec_options.parse([flag, "img", "true"], {})
    with pytest.raises(errors.UsageError, match="unknown option"):
        exec_options.parse(["--no-such-flag", "img", "true"], {})


def test_container_options_in_the_docs_are_registered_by_the_plugin():
    source = (REPO / "spank" / "uctr_args.c").read_text()
    registered = set(re.findall(r'\{\s*"([a-z-]+)",', source))
    assert "container-image" in registered
    problems = []
    for path in MARKDOWN:
        for name in set(re.findall(r"--((?:no-)?container-[a-z][a-z-]*[a-z])", path.read_text())):
            if name not in registered:
                problems.append(f"{rel(path)}: --{name} is not a SPANK option")
    assert not problems, "\n".join(problems)


# -- (3) environment variables --------------------------------------------------------------

def _code_files(names) -> Iterator[Path]:
    for name in names:
        path = REPO / name
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix not in BINARY_SUFFIXES and "__pycache__" not in f.parts:
                yield f


def _names_in(files) -> Dict[str, Path]:
    found: Dict[str, Path] = {}
    for f in files:
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        for name in UCTR_NAME.findall(text):
            found.setdefault(name, f)
    return found


def _c_macros() -> set:
    text = "\n".join(f.read_text() for f in _code_files(["spank"]) if f.suffix in (".c", ".h"))
    return set(re.findall(r"#\s*(?:define|ifndef)\s+(UCTR_[A-Z0-9_]+)", text))


def _documented(name: str, names: set) -> bool:
    """A name ending in _ is a prefix (UCTR_CONTAINER_* in the docs)."""
    return name in names or any(name.startswith(n) for n in names if n.endswith("_"))


def test_every_uctr_variable_in_the_docs_exists_in_the_code():
    in_code = set(_names_in(_code_files(CODE_PATHS)))
    problems = []
    for path in MARKDOWN:
        for name in sorted(set(UCTR_NAME.findall(path.read_text()))):
            ok = (any(c.startswith(name) for c in in_code) if name.endswith("_")
                  else name in in_code)
            if not ok:
                problems.append(f"{rel(path)}: {name} appears nowhere in the code")
    assert not problems, "\n".join(problems)


def test_every_uctr_variable_the_product_reads_is_documented():
    in_docs = set()
    for path in MARKDOWN:
        in_docs |= set(UCTR_NAME.findall(path.read_text()))
    macros = _c_macros()
    undocumented = sorted(
        f"{name} (first in {rel(where)})"
        for name, where in _names_in(_code_files(PRODUCT_DIRS)).items()
        if name not in macros and not name.endswith("_") and not _documented(name, in_docs))
    assert not undocumented, "document these in README.md or docs/: " + ", ".join(undocumented)


def test_readme_documents_the_general_variables():
    body = "\n".join(section(README.read_text(), "Environment variables"))
    for name in ("UCTR_CACHE", "UCTR_LOCAL_DIR", "UCTR_CONFIG_DIR", "UCTR_POLICY",
                 "UCTR_INSECURE_REGISTRIES", "UCTR_REGISTRY_MIRRORS", "UCTR_TLS_CA",
                 "UCTR_PARALLEL", "UCTR_STALL_TIMEOUT", "UCTR_RETRIES", "UCTR_VERBOSE",
                 "UCTR_STAGE_TIMEOUT"):
        assert f"`{name}`" in body, name


# -- (4) links ------------------------------------------------------------------------------

def _links(path: Path) -> Iterator[str]:
    prose, _ = split_markdown(path.read_text())
    for line in prose:
        line = re.sub(r"`[^`]*`", "", line)  # a link inside a code span is not a link
        yield from re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", line)


def test_relative_links_point_at_existing_files_and_anchors():
    problems = []
    for path in MARKDOWN:
        for link in _links(path):
            if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
                continue
            target, _, anchor = link.partition("#")
            dest = (path.parent / target).resolve() if target else path
            if not dest.exists():
                problems.append(f"{rel(path)}: ({link}): {target} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{rel(path)}: ({link}): no heading #{anchor} in {rel(dest)}")
    assert not problems, "\n".join(problems)


# -- (5) example policies and Slurm lines ---------------------------------------------------

def _policy_problems(path: Path) -> List[str]:
    from uctr_batch.policy import check_file

    problems, _policy, _notes = check_file(path)
    return [str(p) for p in problems]


@pytest.mark.parametrize("path", sorted((REPO / "site-config").rglob("*.yaml")), ids=rel)
def test_site_config_yaml_validates(path):
    assert _policy_problems(path) == []


def _policy_blocks() -> Iterator[Tuple[str, str]]:
    for path in MARKDOWN:
        _, blocks = split_markdown(path.read_text())
        for block in blocks:
            if block and block[0].strip() == "version: 1":
                yield rel(path), "\n".join(block) + "\n"


def test_complete_policies_shown_in_the_docs_validate(tmp_path):
    blocks = list(_policy_blocks())
    assert any(where == "docs/admin-guide.md" for where, _ in blocks)
    for index, (where, text) in enumerate(blocks):
        path = tmp_path / str(index) / "policy.yaml"
        path.parent.mkdir()
        path.write_text(text)
        assert _policy_problems(path) == [], f"the policy shown in {where} is invalid"


def test_slurm_lines_shown_are_the_installers():
    from uctr_batch.batch import slurm

    plan = slurm.install_plan(Path("/opt/uctr"), "/etc/uctr/policy.yaml")
    lines = [ln for ln in plan.snippets().splitlines() if ln and not ln.startswith("#")]
    assert any(ln.startswith("required ") for ln in lines) and "PrologFlags=Alloc" in lines
    examples = "".join((REPO / "site-config" / "slurm" / name).read_text()
                       for name in ("plugstack.conf", "slurm.conf"))
    for where, text in (("site-config/slurm", examples),
                        ("docs/admin-guide.md", (REPO / "docs" / "admin-guide.md").read_text())):
        shown = set(text.splitlines())
        assert [ln for ln in lines if ln not in shown] == [], where
