"""The fast-join record is one format on both sides (launchers/c/record.md): the Python
writer and reference parser (uctr_batch.launch.fastrec) and the C parser of the uctr-exec
front (launchers/c/fastrec.c). These tests fail when they drift:

  * the C field table, the Python FIELDS and the table of record.md list the same fields
    with the same arity and multiplicity, in the same order;
  * the C parser, run on records the Python side writes (every field, hostile bytes,
    empty strings), reads exactly what the Python parser reads;
  * the environment program gives, in Python and in C, what the Python launcher computes
    for a joining rank (procspec.finish_env over procspec.base_env);
  * the C front finds the step of a rank as rank.detect does, over the launchers'
    variables;
  * the argv split (options vs command) agrees with options.parse.
The C side is the ASan+UBSan build of launchers/c/fastrec_tool.c (harness.cfront)."""

import functools
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.harness import cfront
from uctr_batch.errors import UctrError
from uctr_batch.launch import (fastrec, nodelock, options, policy_cache, procspec, rank,
                               sharedns, staged)
from uctr_batch.launch.main import Diag

REPO = Path(__file__).resolve().parents[2]
needs_cc = pytest.mark.skipif(cfront.compiler() is None, reason="no C compiler")


@pytest.fixture(scope="module")
def tool(tmp_path_factory):
    out = tmp_path_factory.mktemp("cfront")
    return cfront.build(out, ("fastrec-tool",))["fastrec-tool"]


def run_tool(tool, *args, env=None):
    proc = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True,
                          env=dict(cfront.SAN_ENV, **(env if env is not None else {})))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def unhex(token: str) -> str:
    return "" if token == "-" else bytes.fromhex(token).decode("utf-8", "surrogateescape")


def c_parse(tool, path):
    out = run_tool(tool, "parse", path).splitlines()
    if out[0].startswith("refused"):
        return None
    return [(ln.split(" ")[0], [unhex(t) for t in ln.split(" ")[1:]]) for ln in out[1:-1]]


# -- one list of fields --------------------------------------------------------------------

def c_fields():
    source = (REPO / "launchers" / "c" / "fastrec.c").read_text()
    rows = re.findall(r'FIELD\("([^"]+)", (\d+), (\d+), (ONCE|OPT|MANY|CONT)\)', source)
    return [(n, int(lo), int(hi), how.lower()) for n, lo, hi, how in rows]


def spec_fields():
    text = (REPO / "launchers" / "c" / "record.md").read_text()
    rows = re.findall(r"^\| `([a-z_-]+)` \| (\d+)(?:-(\d+))? \| (once|opt|many|cont) \|", text, re.M)
    return [(n, int(lo), int(hi or lo), how) for n, lo, hi, how in rows]


def test_c_table_python_table_and_spec_list_the_same_fields():
    python = [tuple(f) for f in fastrec.FIELDS]
    assert len(python) > 30
    assert c_fields() == python
    assert spec_fields() == python


# -- records written by Python, read by C ---------------------------------------------------

class Spec:
    rootfs = "/local/bundles/ab cd/rootfs"
    binds = [("/home/u", "/home/u", False), ("/etc/hosts", "/etc/hosts", True)]


HOSTILE = "tab\there nl\nthere 100% sp ace é \x7f end"
EXTRAS = {
    "passthrough_prefixes": ["PMI_", "PMIX_", "SLURM_"],
    "passthrough_names": ["PMI_FD", "ODD"],
    "ops": {"env_unset": ["DROP"], "env_defaults": {"DEF": "d", "KEEP": "no"},
            "env": {"OPX": "x", "EMPTY": ""}, "env_prepend": {"PRE_LOAD": "/a.so"},
            "env_append": {"APP": "tail"}, "ld_library_path": ["/inj/lib", "/usr/lib"],
            "path_prefix": ["/inj/bin"]},
    "gpu_vendor": None,
}
CONFIG = {"Env": ["PATH=/usr/bin:/bin", "KEEP=image", "LD_LIBRARY_PATH=/usr/lib:/x::/x",
                  "APP=", "DROP=1", "H=" + HOSTILE],
          "Entrypoint": ["/entry", "--flag"], "Cmd": ["default", ""]}
POLICY = {"env": {"set": {"SITE": "1"}, "prepend": {"PATH": "/site/bin"},
                  "append": {"MANPATH": "/m"}, "unset": ["DROP"],
                  "passthrough": ["TERM", "MY_*", "A*Z"]}}
USER_ENV = ["U1=one", "COPYME", "GONE", "EQ=a=b"]


def record_lines(**overrides):
    args = dict(step_key="77.3", prefix=["--writable", "-e", "U1=one", "img:1", "--"],
                complete=True, handover=False, config=CONFIG, policy=POLICY,
                user_env=USER_ENV, extras=EXTRAS,
                env={"HOME": "/home/u", "PATH": "/usr/bin", "UCTR_IMAGE": "img:1",
                     "UCTR_SIGSTATE": "1:0:0", "PMIX_DSTORE_21": "/x", "SLURM_JOB_ID": "77"},
                host_cwd="/home/u/w", cwd="/home/u/w", launch_dir="/l/launch",
                stem="step-77.3-abc", record={"generation": 2, "user": 11, "mnt": 12,
                                              "members": [(10, "555"), (11, None)]},
                inuse="/l/inuse/ff", spec=Spec, verbosity=0)
    args.update(overrides)
    return fastrec.build(**args)


def write(tmp_path, lines, name="r.rec"):
    path = tmp_path / name
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fastrec.write(fd, name, lines)
    finally:
        os.close(fd)
    return path


def outcome_lines(**overrides):
    args = dict(step_key="77.3", prefix=["--writable", "-e", "U1=one", "img:1", "--"],
                complete=True, handover=False,
                env={"HOME": "/home/u", "PATH": "/usr/bin", "UCTR_IMAGE": "img:1",
                     "SLURM_JOB_ID": "77"},
                host_cwd="/home/u/w", parent=(os.getpid(), sharedns.start_time(os.getpid())),
                error=Failure(HOSTILE + "\nsecond line", "a hint " + HOSTILE), command="cmd")
    args.update(overrides)
    return fastrec.outcome(**args)


# every replay_* field, as launch.replay writes them (their meaning: test_replay.py)
REPLAY_SAMPLE = [
    ("replay_key", "0123456789abcdef"), ("replay_until", "1900000000"),
    ("replay_limit", "600"), ("replay_python", "3", "11"),
    ("replay_stat", "/etc/ld.so.cache", "1", "2", "3", "4"), ("replay_stat", HOSTILE),
    ("replay_marker", "/b/.uctr-complete", "sha256:ab"), ("replay_vary", "SLURM_STEP_ID"),
    ("replay_absent_dir", "/tmp/spmix_appdir_\x01J.\x01S"),
    ("replay_op", "userns", "1000", "1000"), ("replay_op", "ro", HOSTILE),
    ("replay_op", "tmpfs", "/r/dev", "6", "mode=0755"),
    ("replay_nskey", "(2, ('SLURM_JOBID', '\\x01J'))"), ("replay_extras", "7b30"),
    ("replay_manifest", "/b/rootfs.injection.json", "7b7d0a"), ("replay_warning", HOSTILE),
    ("replay_command", HOSTILE),
]


class Failure(UctrError):
    exit_code = 4


@needs_cc
def test_c_reads_every_field_python_writes(tool, tmp_path):
    seen = set()
    for name, lines in (("r.rec", record_lines() + [("fallback", HOSTILE)]),
                        ("failed.rec", outcome_lines()),
                        ("none.rec", outcome_lines(error=None, reason=HOSTILE)),
                        ("tpl.rec", record_lines() + REPLAY_SAMPLE)):
        path = write(tmp_path, lines, name)
        python = [(n, list(a)) for n, a in fastrec.parse(path.read_bytes())]
        seen |= {n for n, _ in python}
        assert c_parse(tool, path) == python
        assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert seen == set(fastrec.FIELD_NAMES)  # every field is exercised


RECORD_DAMAGE = [
    lambda d: d[:-1],                                   # no final newline
    lambda d: d.replace(b"\nend\n", b"\n"),             # truncated
    lambda d: d + b"end\n",                             # line after end
    lambda d: d.replace(b"uid ", b"uid 1 "),            # too many arguments
    lambda d: d.replace(b"\nstep ", b"\nstep  "),       # an empty token
    lambda d: d.replace(b"%09", b"%0"),                 # a broken escape
    lambda d: d.replace(b"%09", b"%00"),                # NUL
    lambda d: d.replace(b"%09", b"\t"),                 # a raw control byte
    lambda d: d.replace(b"record 1", b"record 2"),      # another version
    lambda d: d.replace(b"\nmode N1\n", b"\nmode N1\nmode N1\n"),  # once, twice
    lambda d: d.replace(b"\ngid", b"\nnosuch 1\ngid"),  # an unknown field
    lambda d: b"step 1\n" + d,                          # no header first
    lambda d: d.replace(b"%09", b"%+9"),                # int("+9", 16) would take it
]
OUTCOME_DAMAGE = [
    lambda d: d.replace(b"\nparent ", b"\nmode N1\nparent "),      # a container field
    lambda d: d.replace(b"\nparent ", b"\nno_container x\nparent "),  # two outcomes
    lambda d: d.replace(b"failed 4 ", b"failed 0 "),                # exit codes 1..255
    lambda d: d.replace(b"failed 4 ", b"failed 256 "),
    lambda d: d.replace(b"failed 4 ", b"failed 04 "),
    lambda d: d.replace(b"failed 4 ", b"failed -4 "),
    lambda d: d.replace(b"failed 4 ", b"failed x "),
    lambda d: d.replace(b"failed 4 ", b"no_container "),            # failed_* alone
]


@needs_cc
@pytest.mark.parametrize("lines, damage", [(record_lines, d) for d in RECORD_DAMAGE]
                         + [(outcome_lines, d) for d in OUTCOME_DAMAGE])
def test_c_and_python_refuse_the_same_damaged_records(tool, tmp_path, lines, damage):
    data = damage(write(tmp_path, lines()).read_bytes())
    (tmp_path / "bad.rec").write_bytes(data)
    with pytest.raises(ValueError):
        fastrec.parse(data)
    assert c_parse(tool, tmp_path / "bad.rec") is None


def test_a_container_record_without_a_container_field_is_refused(tmp_path):
    data = write(tmp_path, record_lines()).read_bytes().replace(b"\nmode N1\n", b"\n")
    with pytest.raises(ValueError):
        fastrec.parse(data)


# -- the environment program ----------------------------------------------------------------

HOSTS = [
    {},
    {"PATH": "/h/bin", "TERM": "xterm", "MY_A": "1", "AxyZ": "2", "COPYME": "c", "GONE": "",
     "PMI_FD": "9", "PMIX_RANK": "3", "SLURM_X": "s", "ODD": HOSTILE, "LD_LIBRARY_PATH": "/h",
     "APP": "hostapp", "UCTR_SIGSTATE": "1:0:0", "UCTR_ARGV0": "x", "DEF": "host"},
    {"SLURM_JOB_ID": "7", "KEEP": "host", "DEF": "", "PRE_LOAD": "/a.so:/b.so:/a.so",
     "PMIX_DSTORE_X": "y", "MY_": "", "U1": "host"},
    # a Slurm task's size: the C side sorts the names it looks up per variable
    dict({"SLURM_V%03d" % i: str(i) for i in range(150)},
         **{"PMIX_V%02d" % i: "p" for i in range(40)}, UCTR_ARGV0="x", TERM="t", ZZ="z"),
]


def python_launcher_env(host):
    """What launch.main.Launch.rank_spec gives a joining rank (host env without the
    per-process UCTR_SIGSTATE and UCTR_ARGV0, as main() removes them)."""
    host = {k: v for k, v in host.items() if k not in fastrec.IGNORED}
    base = procspec.base_env(CONFIG, POLICY, host, USER_ENV)
    return procspec.finish_env(base, host, EXTRAS, {}, USER_ENV)


@pytest.mark.parametrize("host", HOSTS, ids=range(len(HOSTS)))
def test_env_program_is_the_python_launchers_env(host):
    program = fastrec.env_program(CONFIG, POLICY, USER_ENV, EXTRAS)
    clean = {k: v for k, v in host.items() if k not in fastrec.IGNORED}
    assert fastrec.run_program(program, clean) == python_launcher_env(host)


@needs_cc
@pytest.mark.parametrize("host", HOSTS, ids=range(len(HOSTS)))
def test_c_env_program_is_the_python_launchers_env(tool, tmp_path, host):
    path = write(tmp_path, record_lines())
    out = run_tool(tool, "env", path, env=dict(host))
    got = dict(unhex(ln.split(" ")[1]).split("=", 1) for ln in out.splitlines())
    for key in cfront.SAN_ENV:
        got.pop(key, None)
    assert got == python_launcher_env(host)


def test_what_the_c_front_cannot_reproduce_goes_to_python():
    lines = record_lines(extras=dict(EXTRAS, gpu_vendor="nvidia"))
    assert ("fallback", "per-rank GPU visibility") in lines
    lines = record_lines(policy={"env": {"passthrough": ["X[AB]"]}})
    assert any(n == "fallback" for n, *_ in lines)
    assert any(n == "fallback" for n, *_ in record_lines(verbosity=2))


# -- the step ----------------------------------------------------------------------------

STEP_ENVS = [
    {},
    {"SLURM_JOB_ID": "12", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "8"},
    {"SLURM_JOBID": "12", "SLURM_STEPID": "4", "SLURM_PROCID": " 1 "},
    {"SLURM_JOB_ID": "", "SLURM_JOBID": "9", "SLURM_STEP_ID": "1", "SLURM_PROCID": "0"},
    {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4", "PMIX_NAMESPACE": "prte-x@1/z"},
    {"OMPI_COMM_WORLD_RANK": "2", "SLURM_JOB_ID": "5", "SLURM_STEP_ID": "2"},
    {"PMI_RANK": "1", "MPI_LOCALRANKID": "1", "PMI_SIZE": "2", "PBS_JOBID": "44.srv"},
    {"PMIX_RANK": "0", "PMIX_NAMESPACE": "slurm.pmix.3.0"},
    {"PALS_RANKID": "5", "PMI_SIZE": "8"},
    {"PMI_RANK": "-1", "PMI_SIZE": "x"},
    {"PBS_JOBID": "1.s", "PBS_TASKNUM": "3"},
    {"PBS_JOBID": "1.s"},
    {"SLURM_PROCID": "zz", "SLURM_STEP_ID": "1", "PMIX_RANK": "1", "PMIX_NAMESPACE": ""},
]


@needs_cc
@pytest.mark.parametrize("env", STEP_ENVS, ids=range(len(STEP_ENVS)))
def test_c_finds_the_step_rank_detect_finds(tool, env):
    ppid = 4242
    ctx = rank.detect(env)
    out = run_tool(tool, "step", ppid, env=dict(env)).split()
    assert out[0] != "doubt"
    expected = ctx.step_key if not ctx.step_key.startswith("pid") else "pid%d" % ppid
    assert out[:2] == [expected, fastrec.record_name(expected)]
    assert (int(out[2]), int(out[3])) == (ctx.rank, ctx.size)


@needs_cc
@pytest.mark.parametrize("env", [{"SLURM_JOB_ID": "ü", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0"},
                                 {"PMI_RANK": "--5"}, {"OMPI_COMM_WORLD_RANK": "\x1c1"}])
def test_c_leaves_what_python_might_read_otherwise_to_python(tool, env):
    assert run_tool(tool, "step", 1, env=env).strip() == "doubt"


# -- options and command --------------------------------------------------------------------

CASES = [
    # (creator args, UCTR env, joiner args)
    (["img", "a"], {}, ["img", "b", "c"]),
    (["--writable", "img", "--", "a"], {}, ["--writable", "img", "--", "-x"]),
    (["-e", "K=V", "img"], {}, ["-e", "K=V", "img"]),
    (["img"], {}, ["img", "--", "x"]),                # the joiner's -- would be dropped
    (["-w", "/w"], {"UCTR_IMAGE": "img"}, ["-w", "/w", "cmd"]),  # cmd would be the image
    (["--", "a"], {"UCTR_IMAGE": "img"}, ["--", "b"]),
    (["img", "a"], {}, ["--writable", "img", "a"]),
]


@needs_cc
@pytest.mark.parametrize("creator,uenv,joiner", CASES, ids=range(len(CASES)))
def test_c_splits_argv_as_options_parse_does(tool, tmp_path, creator, uenv, joiner):
    env = dict(uenv, HOME="/h")
    opts = options.parse(creator, env)
    prefix = creator[:len(creator) - len(opts.command)]
    complete = options.parse(prefix + ["x"], env).command == ["x"]
    lines = record_lines(prefix=prefix, complete=complete, env=env, user_env=opts.env)
    path = write(tmp_path, lines)
    out = run_tool(tool, "match", path, "/home/u/w", os.getuid(), os.getgid(), *joiner,
                   env=env).split()
    try:
        theirs = options.parse(joiner, env)
        same = theirs.image == opts.image and theirs.env == opts.env and \
            theirs.writable == opts.writable and theirs.workdir == opts.workdir
    except Exception:  # noqa: BLE001 - Python refuses: C must not take it either
        same = False
    if out[0] == "argv":
        assert same
        expected = CONFIG["Entrypoint"] + (theirs.command or CONFIG["Cmd"])
        assert [unhex(t) for t in out[1:]] == expected
    else:
        assert out[0] == "no:"
        assert not same or joiner[len(prefix):][:1] == ["--"] or not complete


@needs_cc
def test_c_refuses_another_uid_cwd_or_setting(tool, tmp_path):
    env = {"HOME": "/home/u", "PATH": "/usr/bin", "UCTR_IMAGE": "img:1", "PMIX_DSTORE_21": "/x",
           "SLURM_JOB_ID": "77"}
    path = write(tmp_path, record_lines(env=env))
    args = ["--writable", "-e", "U1=one", "img:1", "--", "cmd"]
    ok = run_tool(tool, "match", path, "/home/u/w", os.getuid(), os.getgid(), *args, env=env)
    assert ok.startswith("argv")
    for cwd, uid, changed in [("/elsewhere", os.getuid(), {}), ("/home/u/w", os.getuid() + 1, {}),
                              ("/home/u/w", os.getuid(), {"UCTR_MOUNTS": "/a"}),
                              ("/home/u/w", os.getuid(), {"HOME": "/other"}),
                              ("/home/u/w", os.getuid(), {"CUDA_VISIBLE_DEVICES": "1"}),
                              ("/home/u/w", os.getuid(), {"PMIX_DSTORE_9": "z"}),
                              # a name that only starts like an ignored one counts
                              ("/home/u/w", os.getuid(), {"UCTR_SIGSTATE_X": "1"}),
                              ("/home/u/w", os.getuid(), {"UCTR_ARGV": "1"})]:
        out = run_tool(tool, "match", path, cwd, uid, os.getgid(), *args, env=dict(env, **changed))
        assert out.startswith("no:"), (cwd, uid, changed)
    # per-process variables do not count
    out = run_tool(tool, "match", path, "/home/u/w", os.getuid(), os.getgid(), *args,
                   env=dict(env, UCTR_SIGSTATE="5:0:0"))
    assert out.startswith("argv")


def age(path, days=2):
    then = path.stat().st_mtime - days * 86400
    os.utime(path, (then, then))


def test_records_of_finished_steps_are_removed_once_an_hour(tmp_path):
    """A day after their step, at the first write after the last collection is an hour
    old: a node that ran thousands of steps today is not listed by every step's creator."""
    old = write(tmp_path, record_lines(), fastrec.record_name("1.0"))  # collects: the first
    age(old)
    recent = write(tmp_path, record_lines(), fastrec.record_name("2.0"))
    assert old.exists()  # collected less than an hour ago
    then = time.time() - sharedns.GC_EVERY - 5
    os.utime(tmp_path / fastrec.COLLECTED, (then, then))
    write(tmp_path, record_lines(), fastrec.record_name("3.0"))
    assert not old.exists() and recent.exists()
    assert time.time() - (tmp_path / fastrec.COLLECTED).stat().st_mtime < 60
    assert time.time() - (tmp_path / fastrec.SEEN).stat().st_mtime < 60


def test_due_says_yes_once_per_period(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert nodelock.due(fd, "m", 3600) and not nodelock.due(fd, "m", 3600)
        then = time.time() - 3601
        os.utime(tmp_path / "m", (then, then))
        assert nodelock.due(fd, "m", 3600) and not nodelock.due(fd, "m", 3600)
        (tmp_path / "m").unlink()
        os.symlink(tmp_path / "elsewhere", tmp_path / "m")  # never followed
        os.utime(tmp_path / "m", (then, then), follow_symlinks=False)
        assert nodelock.due(fd, "m", 3600) and not nodelock.due(fd, "m", 3600)
        assert not (tmp_path / "elsewhere").exists()
    finally:
        os.close(fd)


def test_c_reads_the_marker_python_writes():
    """fast-seen and its age: one name and one number on both sides."""
    source = (REPO / "launchers" / "c" / "fastjoin.c").read_text()
    assert re.search(r'#define RECORD_SEEN "%s"' % re.escape(fastrec.SEEN), source)
    hours = re.search(r"#define RECORD_SEEN_AGE \((\d+)L \* 3600\)", source)
    assert hours and int(hours.group(1)) * 3600 == sharedns.GC_AGE


# -- where: the record lives in the launch directory, beside the rendezvous files -----------

def test_the_record_directory_is_the_launch_directory_of_the_environments_base(tmp_path):
    for env in ({"UCTR_LOCAL_DIR": str(tmp_path)}, {"UCTR_LOCAL_DIR": str(tmp_path) + "/"}, {}):
        assert fastrec.fast_dir(env) == staged.launch_dir(policy_cache.local_base(env))
    assert fastrec.RECORD_DIR == staged.LAUNCH_DIR
    assert fastrec.record_name("5.0") == "fast-step-5.0.rec"


def test_neither_garbage_collection_removes_the_others_files(tmp_path):
    """One directory, two collectors: fastrec takes only fast-step-*, sharedns only the
    step-* rendezvous files of idle, unlocked steps; recipes and index entries are neither's."""
    launch = tmp_path / "launch"
    fd = nodelock.open_private_dir(str(launch))
    try:
        theirs = [launch / n for n in ("step-1.0-k.lock", "step-1.0-k.ns", "step-1.0-k.g1.members",
                                        "img-x.idx", "ctr-y.rcp", sharedns.GC_MARKER)]
        for path in theirs:
            path.write_bytes(b"x")
            age(path)
        old = write(launch, record_lines(), fastrec.record_name("1.0"))
        age(old)
        (launch / fastrec.COLLECTED).unlink()  # the last collection: long ago
        fastrec.write(fd, fastrec.record_name("2.0"), record_lines())
        assert not old.exists() and all(p.exists() for p in theirs)
        theirs += [launch / fastrec.SEEN, launch / fastrec.COLLECTED]
        old = write(launch, record_lines(), fastrec.record_name("1.0"))
        age(old)
        rdv = sharedns.Rendezvous(str(launch), "2.0", "k", 1.0)
        rdv.dir_fd = fd
        rdv._collect_garbage()
        assert old.exists() and (launch / fastrec.record_name("2.0")).exists()
        assert [p.exists() for p in theirs] == [False, False, False, True, True, True, True, True]
    finally:
        os.close(fd)


# -- the join (launchers/c/fastjoin.c, as uctr-exec and SPANK's task_init run it) ------------

JOIN_ARGS = ["--writable", "-e", "U1=one", "img:1", "--", "cmd"]


def join_env(local):
    return {"HOME": "/home/u", "PATH": "/usr/bin", "UCTR_IMAGE": "img:1", "UCTR_LOCAL_DIR": local,
            "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "3", "SLURM_PROCID": "1"}


def live_record(env, cwd, launch_dir):
    """A record whose only member is this process, in our own namespaces: the join goes all
    the way (the tool does no setns)."""
    me = os.getpid()
    return record_lines(env=env, host_cwd=str(cwd), launch_dir=launch_dir,
                        record={"generation": 1, "user": os.stat("/proc/self/ns/user").st_ino,
                                "mnt": os.stat("/proc/self/ns/mnt").st_ino,
                                "members": [(me, sharedns.start_time(me))]})


def c_join(tool, env, cwd, trace=None):
    """fastrec-tool join, under strace when TRACE is a path: (output, directories opened)."""
    argv = [str(tool), "join", *JOIN_ARGS]
    if trace:
        argv = ["strace", "-f", "-qq", "-o", str(trace), "-e", "trace=open,openat", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(cwd),
                          env=dict(cfront.SAN_ENV, **env))
    assert proc.returncode == 0, proc.stderr
    opened = [ln for ln in trace.read_text().splitlines() if "O_DIRECTORY" in ln] if trace else []
    return proc.stdout.strip(), opened


def write_live_record(env, tmp_path, launch_dir):
    """Step 77.3's live record in ENV's record directory, naming LAUNCH_DIR."""
    fd = nodelock.open_private_dir(fastrec.fast_dir(env))
    try:
        fastrec.write(fd, fastrec.record_name("77.3"), live_record(env, tmp_path, launch_dir))
    finally:
        os.close(fd)


@needs_cc
@pytest.mark.parametrize("slash", ["", "/"])
def test_c_join_opens_and_checks_the_launch_directory_once(tool, tmp_path, slash):
    """The usual case: the record in <local>/launch, the step's rendezvous directory; the
    join opens that directory once, for the record, the lock and the members file."""
    local = tmp_path / "local"
    env = join_env(str(local) + slash)
    launch = fastrec.fast_dir(env)
    assert launch == staged.launch_dir(str(local))
    write_live_record(env, tmp_path, launch)
    trace = tmp_path / "trace" if shutil.which("strace") else None
    out, opened = c_join(tool, env, tmp_path, trace)
    assert out == "joined"
    assert (local / "launch" / "step-77.3-abc.lock").exists()
    members = (local / "launch" / "step-77.3-abc.g1.members").read_text().split()
    assert members[1] == "1" and int(members[0]) > 0
    if trace:
        assert [ln for ln in opened if '"%s"' % launch in ln] == opened and len(opened) == 1, \
            opened
    # the checks still hold on that one open: a directory others may write is refused
    os.chmod(local / "launch", 0o770)
    assert c_join(tool, env, tmp_path)[0] == "no: no private record directory"


@needs_cc
def test_c_join_opens_a_launch_directory_elsewhere_with_the_same_checks(tool, tmp_path):
    """The policy's local dir is not the environment's base: the record stays in
    <env base>/launch and names the rendezvous directory, which the join opens and checks
    on its own."""
    env = join_env(str(tmp_path / "env-local"))
    elsewhere = str(tmp_path / "policy-local" / "launch")
    os.close(nodelock.open_private_dir(elsewhere))
    write_live_record(env, tmp_path, elsewhere)
    trace = tmp_path / "trace" if shutil.which("strace") else None
    out, opened = c_join(tool, env, tmp_path, trace)
    assert out == "joined"
    assert (Path(elsewhere) / "step-77.3-abc.g1.members").exists()
    assert not (Path(fastrec.fast_dir(env)) / "step-77.3-abc.lock").exists()
    if trace:
        assert len(opened) == 2 and '"%s"' % elsewhere in opened[1], opened
    os.chmod(elsewhere, 0o770)
    assert c_join(tool, env, tmp_path)[0] == "no: the rendezvous directory is not private"


@needs_cc
def test_c_join_without_a_record_says_whether_n1_steps_ran_here(tool, tmp_path):
    """launch/ exists wherever uctr-exec ran, in any mode: only a record of some step tells
    the SPANK plugin's tasks that their creator's record is worth waiting for
    (spank/uctr_join.c not_yet)."""
    env = join_env(str(tmp_path / "local"))
    fd = nodelock.open_private_dir(fastrec.fast_dir(env))
    try:
        assert c_join(tool, env, tmp_path)[0] == \
            "no: no record on this node (no N1 step ran here lately)"
        fastrec.write(fd, fastrec.record_name("76.0"), record_lines(step_key="76.0"))
        assert c_join(tool, env, tmp_path)[0] == "no: no record for this step"
        seen = Path(fastrec.fast_dir(env)) / fastrec.SEEN
        age(seen)  # no record written for a day: collected, or about to be
        assert c_join(tool, env, tmp_path)[0] == \
            "no: no record on this node (no N1 step ran here lately)"
        seen.unlink()  # a directory of an older version: listed
        assert c_join(tool, env, tmp_path)[0] == "no: no record for this step"
    finally:
        os.close(fd)


@needs_cc
def test_a_waiting_task_wakes_for_its_own_record_only(tool, tmp_path):
    """spank/uctr_join.c's wait: the creator's other files (written and renamed in the same
    directory) and other steps' records do not wake it; its own record does, at once."""
    env = join_env(str(tmp_path / "local"))
    fd = nodelock.open_private_dir(fastrec.fast_dir(env))
    waiter = subprocess.Popen([str(tool), "wait", "3000"], stdout=subprocess.PIPE, text=True,
                              env=dict(cfront.SAN_ENV, **env))
    try:
        assert waiter.stdout.readline().strip() == "watching"
        nodelock.write_marshal(fd, "step-77.3-abc.ns", {"x": 1})  # renamed into place too
        fastrec.write(fd, fastrec.record_name("77.4"), record_lines(step_key="77.4"))
        assert waiter.stdout.readline().strip() in ("0", "-1")
        time.sleep(0.3)  # a quiet directory: the 100 ms timeouts, nothing else
        fastrec.write(fd, fastrec.record_name("77.3"), record_lines(step_key="77.3"))
        answers = waiter.stdout.read().split()
        assert "1" in answers, answers
        assert answers.count("-1") >= 2 and "0" not in answers[answers.index("1"):], answers
    finally:
        waiter.kill()
        waiter.wait()
        os.close(fd)


# -- outcome records: the first rank made no container ---------------------------------------

def write_outcome(env, lines) -> bool:
    fd = nodelock.open_private_dir(fastrec.fast_dir(env))
    try:
        return fastrec.write_outcome(fd, fastrec.record_name("77.3"), lines)
    finally:
        os.close(fd)


def join_outcome(tool, env, cwd):
    return subprocess.run([str(tool), "join", *JOIN_ARGS], capture_output=True, text=True,
                          cwd=str(cwd), env=dict(cfront.SAN_ENV, **env))


@needs_cc
@pytest.mark.parametrize("ntasks", [None, "4"])
def test_c_fails_as_the_first_rank_did(tool, tmp_path, capfd, ntasks):
    """Same request, same run of the step: the error, hint and exit code of the first rank,
    in the lines and with the rank prefix the Python launcher prints (launch.main.Diag)."""
    env = join_env(str(tmp_path / "local"))
    if ntasks:
        env["SLURM_NTASKS"] = ntasks
    error = Failure("cannot stage img:1\nregistry said: no", "check the registry")
    assert write_outcome(env, outcome_lines(env=env, host_cwd=str(tmp_path), error=error))
    proc = join_outcome(tool, env, tmp_path)
    assert proc.returncode == 4 and proc.stdout == ""
    Diag(rank.detect(env)).error(error)
    assert proc.stderr == capfd.readouterr().err
    assert ("uctr[rank 1]: error: cannot stage" in proc.stderr) == bool(ntasks)


@needs_cc
def test_an_outcome_applies_to_its_own_run_request_and_command_only(tool, tmp_path):
    env = join_env(str(tmp_path / "local"))
    lines = functools.partial(outcome_lines, env=env, host_cwd=str(tmp_path))
    cases = [
        (lines(parent=(1, sharedns.start_time(1))),          # a requeued job's earlier run
         "no: an outcome record of another run of this step"),
        (lines(parent=(os.getpid(), "1")), "no: an outcome record of another run of this step"),
        (lines(command="other"), "no: the step's first rank failed for another command"),
        (lines(error=None, reason="mode P1 runs one container per rank"),
         "no: the step's first rank runs no shared container"),
        (lines(host_cwd="/elsewhere"), "no: another working directory"),
        (lines(env=dict(env, UCTR_IMAGE="img:2")), None),      # another request
    ]
    record = Path(fastrec.fast_dir(env)) / fastrec.record_name("77.3")
    for outcome, expected in cases:
        record.unlink(missing_ok=True)
        assert write_outcome(env, outcome)
        proc = join_outcome(tool, env, tmp_path)
        assert proc.returncode == 0, proc.stderr
        if expected:
            assert proc.stdout.strip() == expected
        else:
            assert proc.stdout.startswith("no: ") and "first rank" not in proc.stdout
    record.unlink()
    assert write_outcome(env, lines(command="cmd"))  # our command: we fail too
    assert join_outcome(tool, env, tmp_path).returncode == 4


def test_an_outcome_never_replaces_a_record(tmp_path):
    """A container record (or another rank's outcome) stays; a container record written
    later replaces an outcome, as any newer record does."""
    env = join_env(str(tmp_path / "local"))
    record = Path(fastrec.fast_dir(env)) / fastrec.record_name("77.3")
    write_live_record(env, tmp_path, fastrec.fast_dir(env))
    live = record.read_bytes()
    assert not write_outcome(env, outcome_lines(env=env))
    assert record.read_bytes() == live
    record.unlink()
    assert write_outcome(env, outcome_lines(env=env))
    assert not write_outcome(env, outcome_lines(env=env, error=None, reason="another"))
    assert b"failed 4 " in record.read_bytes()
    write_live_record(env, tmp_path, fastrec.fast_dir(env))
    assert record.read_bytes() == live
    assert [p.name for p in record.parent.iterdir() if p.name.endswith(".tmp")] == []


@needs_cc
def test_a_waiting_task_wakes_for_an_outcome(tool, tmp_path):
    env = join_env(str(tmp_path / "local"))
    fd = nodelock.open_private_dir(fastrec.fast_dir(env))
    os.close(fd)
    waiter = subprocess.Popen([str(tool), "wait", "3000"], stdout=subprocess.PIPE, text=True,
                              env=dict(cfront.SAN_ENV, **env))
    try:
        assert waiter.stdout.readline().strip() == "watching"
        assert write_outcome(env, outcome_lines(env=env))
        answers = waiter.stdout.read().split()
        assert "1" in answers, answers
    finally:
        waiter.kill()
        waiter.wait()


def test_no_record_goes_into_a_base_directory_others_could_have_planted(tmp_path):
    """/tmp/uctr-UID made first by another user (or writable by others): its owner could
    swap launch/ around; the writers put nothing there."""
    base = tmp_path / "local"
    env = {"UCTR_LOCAL_DIR": str(base)}
    os.close(fastrec.open_dir(env))  # created, private
    os.chmod(base, 0o777)
    with pytest.raises(UctrError, match="others may write"):
        fastrec.open_dir(env)
    os.chmod(base, 0o700)
    base.rename(tmp_path / "real")
    base.symlink_to(tmp_path / "real")
    with pytest.raises(UctrError):
        fastrec.open_dir(env)


@needs_cc
@pytest.mark.parametrize("text, sets", [
    ("TaskProlog=/etc/slurm/tp.sh\n", True),
    ("ClusterName=c\n  taskprolog = /etc/slurm/tp.sh # site\n", True),
    ("#TaskProlog=/etc/slurm/tp.sh\n", False),
    ("TaskProlog=\n", False),
    ("TaskProlog= # none\n", False),
    ("TaskPrologFlags=x\nTaskEpilog=/x\n", False),
    ("", False),
])
def test_c_sees_a_task_prolog_in_slurm_conf(tool, tmp_path, text, sets):
    """spank/uctr_join.c: with a TaskProlog, no task joins in task_init (slurmstepd would
    run the script inside the container, where it is missing)."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(text)
    assert run_tool(tool, "conf-sets", conf, "TaskProlog").strip() == ("1" if sets else "0")
