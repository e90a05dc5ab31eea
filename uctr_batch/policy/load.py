"""Read the site policy: YAML with line numbers, schema validation, drop-ins and trust.

The policy file is /etc/uctr/policy.yaml, or UCTR_POLICY; drop-ins are conf.d/*.yaml beside
it, merged in lexical order (merge_files). Every problem names file:line and key path.
yaml, jsonschema and hostlist are imported inside the functions: nothing on the per-rank
path imports this module's dependencies (uctr-exec reads a cached NodePolicy instead).
"""

from __future__ import annotations  # annotations unevaluated: no typing import (see inject/plan.py)

import errno
import functools
import json
import os
import re
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path

from uctr_batch import fsutil, log
from uctr_batch.errors import ConfigError
from uctr_batch.policy import paths
from uctr_batch.policy.model import PATH_VARIABLES, template_variables
from uctr_batch.records import Frozen, Record

_log = log.get("policy")

# Bounds on what a policy file may cost to read (docs/admin.md, "Security model"). A real
# policy is a few KiB, a few hundred YAML nodes and about 6 levels deep.
MAX_FILE_BYTES = 1 << 20  # per file: the main policy and each drop-in
MAX_DROPINS = paths.MAX_DROPINS  # conf.d/*.yaml files
MAX_DEPTH = 64  # nesting of mappings and lists, aliases expanded
MAX_NODES = 50_000  # YAML nodes per file, every alias (and `<<:` merge) expanded

TRUST_HINT = ("the policy must be owned by root and not writable by group or others, "
              "nor may any directory above it: chown root: FILE && chmod go-w FILE")

KeyPath = tuple[object, ...]  # e.g. ("classes", 1, "modes", 0)


class Problem(Frozen):
    """One thing wrong with a policy file, located by line and key path."""
    __slots__ = ("file", "line", "path", "message", "hint")
    # path: e.g. "classes[1].modes[0]"; "" for the whole document
    _DEFAULTS = {"hint": None}

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        return where + (f"{self.path}: " if self.path else "") + self.message


class PolicyInvalid(ConfigError):
    """A policy that does not validate; .problems holds every problem found."""

    def __init__(self, problems: Sequence[Problem]):
        first = problems[0]
        hint = first.hint
        if len(problems) > 1:
            more = f"{len(problems) - 1} more problem(s): run `uctr policy check {first.file}`"
            hint = f"{hint}; {more}" if hint else more
        super().__init__(str(first), hint)
        self.problems = list(problems)


class Policy(Record):
    """The merged site policy (or the built-in one) and where it came from."""
    __slots__ = ("path", "defaults", "classes", "mpi_profiles", "sources", "fingerprint",
                 "builtin", "notes")
    # classes: in match order; notes: why built-in defaults apply, files ignored, ...
    _DEFAULTS = {"defaults": dict, "classes": list, "mpi_profiles": dict, "sources": (),
                 "fingerprint": "", "builtin": False, "notes": ()}


class PolicyFile(Record):
    """One parsed file: its data and the line of every key path in it."""
    __slots__ = ("path", "data", "lines")  # lines: key path -> line

    def line(self, key_path: Sequence) -> int:
        """Line of key_path, or of its nearest ancestor that has one."""
        key_path = tuple(key_path)
        while key_path and key_path not in self.lines:
            key_path = key_path[:-1]
        return self.lines.get(key_path, 1)

    def problem(self, key_path: Sequence, message: str, hint: str | None = None) -> Problem:
        return Problem(self.path, self.line(key_path), format_path(key_path), message, hint)


def format_path(key_path: Sequence) -> str:
    """("classes", 1, "modes", 0) -> "classes[1].modes[0]"."""
    out = ""
    for k in key_path:
        if isinstance(k, int):
            out += f"[{k}]"
        elif re.match(r"^[A-Za-z_][A-Za-z0-9_-]*$", str(k)):
            out += ("." if out else "") + str(k)
        else:
            out += f"[{json.dumps(str(k))}]"
    return out


# --- parsing ---------------------------------------------------------------------------

def parse_text(path: str, text: str) -> PolicyFile:
    """YAML -> PolicyFile; syntax errors, duplicate keys and documents beyond the bounds
    (MAX_DEPTH, MAX_NODES: an alias bomb, a cyclic alias) raise PolicyInvalid."""
    import yaml

    loader = None
    node = None
    try:
        loader = _bounded_loader()(text)  # the reader rejects control characters here
        node = loader.get_single_node()
        if node is not None:
            _check_expansion(path, node)
        data = loader.construct_document(node) if node is not None else None
    except PolicyInvalid:
        raise
    except _TooDeep as e:
        what = (f"more than {MAX_NODES} values" if e.too_many
                else f"nested more than {MAX_DEPTH} levels deep")
        raise PolicyInvalid([Problem(path, e.line, "", what, _BOUNDS_HINT)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 1
        what = e.problem or str(e)
        if e.context and e.context_mark and e.context_mark.line + 1 != line:
            what += f" ({e.context} started at line {e.context_mark.line + 1})"
        hint = ("check the indentation and the ':' after each key; "
                "quote values that contain ${...}, '{', ': ' or ' #'")
        raise PolicyInvalid([Problem(path, line, "", f"invalid YAML: {what}", hint)]) from e
    except yaml.YAMLError as e:
        what = " ".join(str(e).split())  # ReaderError spans lines
        raise PolicyInvalid([Problem(path, 1, "", f"invalid YAML: {what}",
                                     "save the policy as UTF-8 text without control characters")
                             ]) from e
    except (ValueError, TypeError, OverflowError) as e:
        # a typed scalar that does not convert, e.g. `!!timestamp 2001-02-30` or `!!int x`
        raise PolicyInvalid([Problem(path, 1, "", f"invalid YAML value: {e}",
                                     "remove the explicit !!tag, or quote the value")]) from e
    finally:
        if loader is not None:
            loader.dispose()
    pf = PolicyFile(path, data, {})
    duplicates: list[Problem] = []
    if node is not None:
        pf.lines[()] = node.start_mark.line + 1
        _index_lines(node, (), pf, duplicates)
    if duplicates:
        raise PolicyInvalid(duplicates)
    return pf


_BOUNDS_HINT = (f"a policy may nest at most {MAX_DEPTH} levels and expand to at most "
                f"{MAX_NODES} values with its aliases (&name, *name, <<: *name) expanded; "
                "write the repeated parts out, or use fewer aliases")


class _TooDeep(Exception):
    """Raised by the composer: too deep, or (too_many) too many nodes."""

    def __init__(self, line: int, too_many: bool = False):
        super().__init__(line)
        self.line, self.too_many = line, too_many


@functools.lru_cache(maxsize=None)  # one class, built on first use: yaml is imported lazily
def _bounded_loader():
    """yaml.SafeLoader whose composer stops at MAX_DEPTH levels, before recursing deeper
    (Python's recursion limit is never what stops a deep document), and after MAX_NODES
    nodes (aliases count once here; _check_expansion counts them expanded)."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        _depth = 0  # per instance once assigned
        _nodes = 0

        def compose_node(self, parent, index):
            self._nodes += 1
            if self._depth >= MAX_DEPTH or self._nodes > MAX_NODES:
                raise _TooDeep(self.peek_event().start_mark.line + 1, self._nodes > MAX_NODES)
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return BoundedLoader


def _check_expansion(path: str, root) -> None:
    """Reject a node graph whose alias-expanded size or depth is beyond the bounds, or
    that is cyclic (`&a [*a]`), before anything walks it expanded (constructor merges,
    line index, schema). Linear in the composed graph: each node's expanded (size, height)
    is computed once. An alias points to a node composed earlier, so the recursion goes no
    deeper than the composed document (MAX_DEPTH)."""
    import yaml

    done: dict[int, tuple[int, int]] = {}
    active = set()

    def measure(node) -> tuple[int, int]:
        key = id(node)
        if key in done:
            return done[key]
        if key in active:
            raise PolicyInvalid([Problem(path, node.start_mark.line + 1, "",
                                         "an alias refers to a node that contains it",
                                         "a policy cannot be recursive: remove the alias")])
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            done[key] = (1, 0)
            return done[key]
        active.add(key)
        size, height = 1, 0
        for child in children:
            s, h = measure(child)
            size, height = size + s, max(height, h + 1)
        active.discard(key)
        if size > MAX_NODES or height > MAX_DEPTH:
            what = (f"expands to more than {MAX_NODES} values" if size > MAX_NODES
                    else f"nests more than {MAX_DEPTH} levels deep")
            raise PolicyInvalid([Problem(path, node.start_mark.line + 1, "",
                                         f"with its aliases expanded, this part {what}",
                                         _BOUNDS_HINT)])
        done[key] = (size, height)
        return done[key]

    measure(root)


def _index_lines(node, key_path: KeyPath, pf: PolicyFile, duplicates: list[Problem]) -> None:
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen = set()
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": its keys keep the anchor's lines
            key = key_node.value
            kp = key_path + (key,)
            if key in seen:
                duplicates.append(Problem(pf.path, key_node.start_mark.line + 1, format_path(kp),
                                      f"duplicate key {key!r}", "remove one of the two entries"))
            seen.add(key)
            pf.lines[kp] = key_node.start_mark.line + 1
            _index_lines(value_node, kp, pf, duplicates)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            pf.lines[key_path + (i,)] = item.start_mark.line + 1
            _index_lines(item, key_path + (i,), pf, duplicates)


_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def read_file(path: Path, require_trusted: bool) -> tuple[str, str | None]:
    """(text, why untrusted or None). Reads the resolved path and checks the opened file:
    only a regular file of at most MAX_FILE_BYTES is read. The last component is opened
    with O_NOFOLLOW (a symlink swapped in after realpath is refused, not followed) and
    O_NONBLOCK (a FIFO cannot hang the open); trust is judged on the fstat of that fd."""
    real = os.path.realpath(path)
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW
    try:
        fd = os.open(real, flags)
    except FileNotFoundError as e:
        raise ConfigError(f"policy file not found: {path}",
                          "check the path, or unset UCTR_POLICY") from e
    except OSError as e:
        raise ConfigError(f"cannot read policy file: {path}: {e.strerror}", _open_hint(e)) from e
    try:
        st = os.fstat(fd)
        kind = next((word for test, word in _NOT_REGULAR if test(st.st_mode)), None)
        if kind or not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"policy file is {kind or 'not a regular file'}: {path}",
                              "UCTR_POLICY and conf.d/*.yaml must name regular files")
        if st.st_size > MAX_FILE_BYTES:
            raise _too_big(path)
        reason = paths.untrusted_reason(Path(real), st) if require_trusted else None
        raw = fsutil.read_at_most(fd, MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read policy file: {path}: {e.strerror}", _open_hint(e)) from e
    finally:
        os.close(fd)
    if len(raw) > MAX_FILE_BYTES:  # it grew after the fstat
        raise _too_big(path)
    try:
        return raw.decode("utf-8"), reason
    except UnicodeDecodeError as e:
        problem = Problem(str(path), 1, "", "not UTF-8 text", "save the file as UTF-8")
        raise PolicyInvalid([problem]) from e


def _too_big(path) -> ConfigError:
    return ConfigError(f"policy file is larger than {MAX_FILE_BYTES // 1024} KiB: {path}",
                       "a policy is a few KiB of YAML: check that UCTR_POLICY names the policy")


def _open_hint(e: OSError) -> str:
    if e.errno == errno.ELOOP:
        return "the path is a symbolic link loop, or was replaced by a link: fix the link"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "the policy must be readable by every user (mode 0644)"
    if e.errno == errno.ENOTDIR:
        return "a directory in the path is a file: check the path"
    return "check the path, or unset UCTR_POLICY"


# --- validation ------------------------------------------------------------------------

def schema() -> dict:
    """The JSON Schema shipped as uctr_batch/policy/schema.json."""
    with open(Path(__file__).with_name("schema.json"), encoding="utf-8") as f:
        return json.load(f)


_TYPE_WORDS = {"array": "a list", "object": "a mapping", "string": "a string",
               "integer": "an integer", "number": "a number", "boolean": "true or false",
               "null": "nothing"}


def _type_word(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    for word, types in (("a mapping", dict), ("a list", list), ("a string", str),
                        ("an integer", int), ("a number", float)):
        if isinstance(value, types):
            return word
    return type(value).__name__


def schema_problems(pf: PolicyFile) -> list[Problem]:
    """Every schema violation in pf, in line order."""
    import jsonschema

    if pf.data is None:
        return [Problem(pf.path, 1, "", "the policy is empty", "a policy starts with 'version: 1'")]
    validator = jsonschema.Draft7Validator(schema())
    found: list[Problem] = []
    for err in validator.iter_errors(pf.data):
        found.extend(_describe(err, pf))
    unique = {(p.line, p.path, p.message): p for p in found}
    return sorted(unique.values(), key=lambda p: (p.line, p.path))


def _describe(err, pf: PolicyFile) -> list[Problem]:
    kp = tuple(err.absolute_path)
    inst, kind, value = err.instance, err.validator, err.validator_value
    hint = err.schema.get("x-hint") if isinstance(err.schema, dict) else None
    if "propertyNames" in err.absolute_schema_path:  # the key itself is bad; inst is the key
        return [pf.problem(kp + (inst,), f"invalid name {inst!r}", hint)]
    if kind == "additionalProperties" and value is False:
        known = sorted(err.schema.get("properties", {}))
        return [pf.problem(kp + (k,), f"unknown key {k!r}", _did_you_mean(str(k), known))
                for k in inst if k not in err.schema.get("properties", {})]
    if kind == "required":
        m = re.match(r"^'(.+)' is a required property$", err.message)
        name = m.group(1) if m else str(value)
        return [pf.problem(kp, f"missing required key {name!r}", hint)]
    if kind == "enum":
        choices = ", ".join(str(v) for v in value)
        if isinstance(inst, bool):  # YAML 1.1 reads unquoted off/no/yes/on as booleans
            hint = f"YAML reads an unquoted yes/no/on/off as {str(inst).lower()}: quote the value"
        return [pf.problem(kp, f"{inst!r} is not one of {choices}", hint)]
    if kind == "const":
        return [pf.problem(kp, f"{inst!r} is not {value!r}", hint)]
    if kind == "type":
        types = [value] if isinstance(value, str) else value
        wanted = " or ".join(_TYPE_WORDS.get(t, t) for t in types)
        return [pf.problem(kp, f"expected {wanted}, got {_type_word(inst)}", hint)]
    if kind == "pattern":
        return [pf.problem(kp, f"invalid value {inst!r}", hint)]
    if kind in ("minItems", "minProperties", "minLength"):
        return [pf.problem(kp, "must not be empty", hint)]
    if kind == "uniqueItems":
        return [pf.problem(kp, "lists the same entry twice", "remove the repeated entry")]
    if kind == "exclusiveMinimum":
        return [pf.problem(kp, f"{inst!r} is too small (must be more than {value})", hint)]
    if kind == "maximum":
        return [pf.problem(kp, f"{inst!r} is too large (maximum {value})", hint)]
    if kind == "minimum":
        return [pf.problem(kp, f"{inst!r} is too small (minimum {value})", hint)]
    return [pf.problem(kp, err.message, hint)]


def _did_you_mean(key: str, known: Sequence[str]) -> str:
    import difflib  # only when there is a typo to explain

    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"did you mean {close[0]!r}?"
    return "valid keys here: " + ", ".join(known)


def semantic_problems(pf: PolicyFile) -> list[Problem]:
    """What the schema cannot say: unique class names, regexes and hostlists that parse,
    known ${VARIABLES}. Only called on data that passed the schema."""
    data = pf.data
    found: list[Problem] = []
    seen: dict[str, int] = {}
    for i, cls in enumerate(data.get("classes", [])):
        name = cls["name"]
        if name in seen:
            first = f"classes[{seen[name]}]"
            found.append(pf.problem(("classes", i, "name"), f"class {name!r} is defined twice",
                                    f"the first one is {first}; give each class its own name"))
        seen.setdefault(name, i)
        found.extend(_match_problems(pf, ("classes", i, "match"), cls["match"]))
    for kp, body in _bodies(data):
        found.extend(_template_problems(pf, kp, body))
    return found


def _bodies(data: Mapping):
    """(key path, mapping) of every body-like mapping that may hold paths."""
    if "defaults" in data:
        yield ("defaults",), data["defaults"]
    for i, cls in enumerate(data.get("classes", [])):
        yield ("classes", i), cls
    for name, profile in data.get("mpi_profiles", {}).items():
        yield ("mpi_profiles", name), profile


def _match_problems(pf: PolicyFile, kp: KeyPath, match: Mapping) -> list[Problem]:
    found = []
    if "regex" in match:
        try:
            re.compile(match["regex"])
        except re.error as e:
            hint = "the regex must match the whole short host name, e.g. 'login[0-9]+'"
            found.append(pf.problem(kp + ("regex",), f"invalid regular expression: {e}", hint))
    if "hostlist" in match:
        import hostlist

        try:
            hostlist.expand_hostlist(match["hostlist"])
        except hostlist.BadHostlist as e:
            found.append(pf.problem(kp + ("hostlist",),
                                    f"invalid hostlist {match['hostlist']!r}: {e}",
                                    "use Slurm syntax, e.g. gpu[001-128],login[1-2]"))
    return found


def _template_problems(pf: PolicyFile, kp: KeyPath, body: Mapping) -> list[Problem]:
    places = [(("storage", k), body.get("storage", {}).get(k)) for k in ("cache_dir", "local_dir")]
    for i, b in enumerate(body.get("binds", [])):
        places += [(("binds", i, "src"), b.get("src")), (("binds", i, "dst"), b.get("dst"))]
    found = []
    for sub, value in places:
        for name in template_variables(value or ""):
            if name not in PATH_VARIABLES:
                found.append(pf.problem(kp + sub, f"unknown variable ${{{name}}}",
                                        "paths may use ${" + "}, ${".join(PATH_VARIABLES) + "}"))
    return found


def reference_problems(pf: PolicyFile, profiles: Sequence[str]) -> list[Problem]:
    """mpi.profile must name a profile from the merged policy, or auto/none."""
    found = []
    for kp, body in _bodies(pf.data):
        name = body.get("mpi", {}).get("profile") if kp[0] != "mpi_profiles" else None
        if name is not None and name not in ("auto", "none") and name not in profiles:
            known = ", ".join(sorted(profiles)) or "none are defined"
            hint = f"define it under mpi_profiles (defined: {known}), or use auto or none"
            found.append(pf.problem(kp + ("mpi", "profile"), f"unknown MPI profile {name!r}", hint))
    return found


# --- merging ---------------------------------------------------------------------------

def merge_files(files: Sequence[PolicyFile]) -> tuple[dict, list[dict], dict]:
    """(defaults, classes, mpi_profiles) of the main file followed by its drop-ins.

    defaults: mappings merge key by key, lists and scalars of a later file replace.
    classes: a class named like an earlier one replaces it in place; new classes of a
    drop-in go in front of all earlier ones (later files win, like reframe's prepending).
    mpi_profiles: a profile named like an earlier one is replaced whole.
    """
    defaults: dict = {}
    classes: list[dict] = []
    profiles: dict = {}
    for pf in files:
        data = pf.data or {}
        defaults = _override(defaults, data.get("defaults", {}))
        new = []
        for cls in data.get("classes", []):
            at = next((i for i, c in enumerate(classes) if c["name"] == cls["name"]), None)
            if at is None:
                new.append(cls)
            else:
                classes[at] = cls
        classes = new + classes
        profiles.update(data.get("mpi_profiles", {}))
    return defaults, classes, profiles


def _override(base: Mapping, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        both_maps = isinstance(v, Mapping) and isinstance(out.get(k), Mapping)
        out[k] = _override(out[k], v) if both_maps else v
    return out


def validate_files(files: Sequence[PolicyFile], check_refs: bool = True) -> list[Problem]:
    """Schema, semantic and (across files) MPI-profile reference problems."""
    problems: list[Problem] = []
    valid = []
    for pf in files:
        found = schema_problems(pf) or sorted(semantic_problems(pf), key=lambda p: p.line)
        problems += found
        if not found:
            valid.append(pf)
    if check_refs and len(valid) == len(files):
        names = set()
        for pf in files:
            names.update(pf.data.get("mpi_profiles", {}))
        for pf in files:
            problems += reference_problems(pf, sorted(names))
    return problems


# --- loading ---------------------------------------------------------------------------

def builtin_policy(path: Path, fingerprint: str = "", note: str = "") -> Policy:
    """No (usable) policy file: every mode in the ladder, every mode selectable."""
    return Policy(path=Path(path), fingerprint=fingerprint, builtin=True,
                  notes=(note,) if note else ())


def load_policy(path: Path | None = None, *, require_trusted: bool = True,
                euid: int | None = None, env: Mapping[str, str] | None = None,
                validated_dir: Path | None = None) -> Policy:
    """Load, check and merge the site policy and its drop-ins.

    Trust (require_trusted, always on in the CLI): as root (euid 0, prolog and hooks) an
    untrusted file is a ConfigError; as a user it is ignored with a warning and built-in
    defaults apply, so users cannot grant themselves settings. A missing file at the default
    path gives the built-in defaults; a missing UCTR_POLICY or explicit path is an error.
    Every file is opened, trust-checked and read every time; with VALIDATED_DIR (the batch
    hooks' node-local, root-only dir) bytes validated there before are not parsed again
    (policy/validated.py).
    """
    env = os.environ if env is None else env
    explicit = path is not None or bool(env.get("UCTR_POLICY"))
    path = Path(path) if path is not None else paths.policy_path(env)
    # Fingerprint before reading: a change while we read shows up as stale next time.
    fingerprint = paths.policy_fingerprint(paths.watched_paths(path))
    if not explicit and not path.exists():
        note = f"no policy file at {path}: built-in defaults apply"
        return builtin_policy(path, fingerprint, note)
    texts = []
    for p in [path] + paths.dropin_paths(path):
        text, reason = read_file(p, require_trusted)
        if reason:
            return _untrusted(p, reason, path, fingerprint, euid)
        texts.append((str(p), text))
    defaults, classes, profiles = _validated_merge(texts, validated_dir)
    return Policy(path, defaults, classes, profiles, tuple(p for p, _ in texts), fingerprint)


def _validated_merge(texts: Sequence[tuple[str, str]], validated_dir: Path | None):
    """merge_files() of the parsed TEXTS ((path, text) each), PolicyInvalid if they do not
    validate; from VALIDATED_DIR when these very bytes passed before."""
    from uctr_batch.policy import validated

    wanted = validated.key(texts) if validated_dir is not None else None
    merged = validated.read(validated_dir, wanted) if wanted else None
    if merged is not None:
        return merged
    files = [parse_text(p, text) for p, text in texts]
    problems = validate_files(files)
    if problems:
        raise PolicyInvalid(problems)
    merged = merge_files(files)
    if wanted:
        validated.store(validated_dir, wanted, merged)
    return merged


def _untrusted(p: Path, reason: str, path: Path, fingerprint: str, euid: int | None) -> Policy:
    euid = os.geteuid() if euid is None else euid
    if euid == 0:
        raise ConfigError(f"untrusted policy file: {p}: {reason}", TRUST_HINT)
    note = f"ignored untrusted policy file {p}: {reason}; built-in defaults apply"
    _log.warning("%s", note)
    return builtin_policy(path, fingerprint, note)


def check_file(path: Path) -> tuple[list[Problem], Policy | None, list[str]]:
    """For `uctr policy check`: validate without requiring trust.

    A main file is checked together with its drop-ins; a file inside a conf.d directory is
    checked alone (MPI profile references then are not checked: they may live elsewhere).
    Returns (problems, merged policy or None, notes such as trust warnings).
    """
    path = Path(path)
    is_dropin = path.parent.name == paths.DROPIN_DIR
    targets = [path] if is_dropin else [path] + paths.dropin_paths(path)  # ConfigError: > MAX
    notes, files, problems = [], [], []
    for p in targets:
        try:
            text, _ = read_file(p, require_trusted=False)
            files.append(parse_text(str(p), text))
        except PolicyInvalid as e:
            problems += e.problems
        except ConfigError as e:  # missing, not a regular file, too big, unreadable
            problems.append(Problem(str(p), 0, "", e.message.replace(f": {p}", ""), e.hint))
            continue
        reason = paths.untrusted_reason(p)
        if reason:
            notes.append(f"{p} is not trusted ({reason}): root would refuse it, users ignore it")
    problems += validate_files(files, check_refs=not is_dropin and not problems)
    if problems:
        return problems, None, notes
    defaults, classes, profiles = merge_files(files)
    return [], Policy(path, defaults, classes, profiles, tuple(pf.path for pf in files)), notes

