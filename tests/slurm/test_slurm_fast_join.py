"""End to end on the two-node cluster: tasks of a container step join their node's step
container from C in the SPANK plugin's task_init (spank/uctr_join.c), with no uctr-exec
process, and their payload sees what a task that went through uctr-exec sees.

Local task 0 of each node goes through uctr-exec (its Python launcher creates the step's
container and writes the fast-join record); the other local tasks wait for that record in
task_init and join from C. UCTR_FAST_DEBUG=1 makes each path say which it took on stderr.

How we know no uctr-exec ran for a joined task: slurmstepd resolves argv[0] in PATH after
task_init and execs that absolute path itself, so the payload's own argv[0] is `/bin/sh`;
uctr-exec (C front or Python) execs the command as given, `sh`.
"""

import re

import pytest

pytestmark = pytest.mark.slurm

LIMIT = ("--time=3",)
JOINED = "uctr: task_init: joined the step's container from C"

# What the payload sees, one "KEY VALUE" line each (busybox sh and tools).
VIEW = r"""
p=/proc/$$
echo "argv0 $(tr '\0' '\n' < $p/cmdline | head -n1)"
echo "cwd $(pwd)"
echo "id $(id)"
grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|Sig[A-Za-z]+|NoNewPrivs|Seccomp):' $p/status \
    | tr '\t' ' ' | sed 's/^/status /'
for n in user mnt pid net ipc uts cgroup; do echo "ns_$n $(readlink $p/ns/$n)"; done
echo "mountinfo $(md5sum < $p/mountinfo | cut -c1-32)"
echo "root $(ls / | tr '\n' ' ')"
# inherited descriptors: anything past stdio but sh's own pipes (command substitution)
for f in $p/fd/*; do
    n=${f##*/}; t=$(readlink $f)
    case $n:$t in [012]:*|*:pipe:*) ;; *) echo "fd$n $t";; esac
done
env | sort | sed 's/^/env /'
"""

# Differ from one task of a step to the next whatever the path.
PER_TASK = {"argv0", "env SLURM_PROCID", "env SLURM_LOCALID", "env SLURM_TASK_PID",
            "env PMIX_RANK", "env PMI_RANK", "env SLURM_GTIDS"}


def views(output):
    """{task: {key: value}} from `srun -l` output (lines "TASK: KEY VALUE")."""
    out = {}
    for line in output.splitlines():
        m = re.match(r"^\s*(\d+): (.*)$", line)
        if not m:
            continue
        task, text = int(m.group(1)), m.group(2)
        if text.startswith("env "):
            key, _, value = text.partition("=")
        else:
            key, _, value = text.partition(" ")
        out.setdefault(task, {})[key] = value
    return out


def joined_tasks(stderr):
    return {int(m.group(1)) for m in re.finditer(r"^\s*(\d+): " + re.escape(JOINED) + "$",
                                                 stderr, re.M)}


@pytest.fixture(scope="module")
def busybox(slurm_cluster):
    return slurm_cluster.image_ref("busybox")


def run_step(cluster, image, *command, tasks=8):
    return cluster.srun([*LIMIT, "-l", "-N2", f"-n{tasks}", "--ntasks-per-node=%d" % (tasks // 2),
                         f"--container-image={image}", *command],
                        env={"UCTR_FAST_DEBUG": "1"}, name="fastjoin", timeout=300)


@pytest.fixture(scope="module")
def warm(slurm_cluster, busybox):
    """One step first: the image staged on both nodes and a fast-join record in the user's
    launch directory there (tasks wait for local task 0's record only on such a warm node)."""
    result = run_step(slurm_cluster, busybox, "true", tasks=2)
    assert result.returncode == 0, result.stderr


def test_warm_tasks_join_from_c_and_see_what_uctr_exec_gives(slurm_cluster, busybox, warm):
    result = run_step(slurm_cluster, busybox, "sh", "-c", VIEW)
    assert result.returncode == 0, result.stderr
    seen = views(result.stdout)
    assert sorted(seen) == list(range(8)), result.stdout + result.stderr
    joined = joined_tasks(result.stderr)
    # local task 0 of each node (tasks 0 and 4) creates the container through uctr-exec
    assert joined and not joined & {0, 4}, result.stderr
    for task, view in seen.items():
        assert view["argv0"] == ("/bin/sh" if task in joined else "sh"), (task, result.stderr)
    for node_tasks in (range(0, 4), range(4, 8)):
        python_path = [t for t in node_tasks if t not in joined]
        c_path = [t for t in node_tasks if t in joined]
        assert python_path and c_path, (joined, result.stderr)
        reference = {k: v for k, v in seen[python_path[0]].items() if k not in PER_TASK}
        for task in node_tasks:
            view = {k: v for k, v in seen[task].items() if k not in PER_TASK}
            differ = {k: (reference.get(k), view.get(k)) for k in set(reference) | set(view)
                      if reference.get(k) != view.get(k)}
            assert not differ, (task, "C" if task in joined else "uctr-exec", differ)
        # one container per node: the same mount namespace on both paths
        assert seen[c_path[0]]["ns_mnt"] == seen[python_path[0]]["ns_mnt"]
        assert seen[c_path[0]]["root"] != "", seen[c_path[0]]


def test_exit_status_and_not_found_on_the_c_path(slurm_cluster, busybox, warm):
    result = run_step(slurm_cluster, busybox, "sh", "-c", "exit 7", tasks=4)
    assert result.returncode == 7, result.stderr
    assert joined_tasks(result.stderr), result.stderr
    result = run_step(slurm_cluster, busybox, "no-such-command-uctr", tasks=4)
    assert result.returncode == 127, result.stderr
    # every task, joined in task_init or through uctr-exec, says the same
    lines = re.findall(r"^\s*(\d+): uctr\[rank \d+\]: error: (.*)$", result.stderr, re.M)
    assert sorted(int(t) for t, _ in lines) == [0, 1, 2, 3], result.stderr
    assert {text for _, text in lines} == \
        {"command not found in the container: no-such-command-uctr"}, result.stderr
    # local task 0 left an outcome record: the others failed from it in task_init, neither
    # after a wait for a container that never came nor through uctr-exec
    assert failed_from_c(result.stderr) == {1, 3}, result.stderr
    took_uctr_exec = re.findall(r"^\s*(\d+): uctr: task_init: uctr-exec path", result.stderr, re.M)
    assert sorted(int(t) for t in took_uctr_exec) == [0, 2], result.stderr


def failed_from_c(stderr):
    return {int(m.group(1)) for m in re.finditer(
        r"^\s*(\d+): uctr: task_init: failing as the step's first rank did$", stderr, re.M)}


def test_multi_prog_tasks_do_not_join(slurm_cluster, busybox, warm):
    """srun --multi-prog: task_init sees the configuration file, not the task's command
    line, so no task joins (or waits) from C; each runs its own program."""
    conf = slurm_cluster.work_dir("multiprog") / "multi.conf"
    conf.write_text("0 true\n1-3 sh -c 'exit 0'\n")
    conf.chmod(0o644)
    result = run_step(slurm_cluster, busybox, "--multi-prog", str(conf), tasks=4)
    assert result.returncode == 0, result.stderr
    assert not joined_tasks(result.stderr), result.stderr
    assert "srun --multi-prog: each task runs its own program" in result.stderr, result.stderr


# What a container looks like from inside, comparable between two containers of one job
# (TMPDIR: Slurm 22.05 exports it to some tasks of a step only; SigBlk: on the simulated
# nodes, Slurm 24.11 and 26.05 start some tasks with almost every signal blocked, with or
# without a container, a third of the tasks of plain `srun` steps in one try).
SHAPE = r"""
echo "cwd $(pwd)"
echo "id $(id)"
grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|Sig(Ign|Cgt)|NoNewPrivs):' /proc/$$/status | tr '\t' ' '
cut -d' ' -f5,6 /proc/self/mountinfo | sort | sed 's/^/mount /'
env | grep -v -E '^(SLURM_(STEP|STEPID|TASK_PID|PROCID|LOCALID|GTIDS|SRUN_COMM_PORT|STEP_LAUNCHER_PORT)[A-Z_]*|PMIX_RANK|PMI_RANK|TMPDIR)=' | sort | sed 's/^/env /'
"""
CREATED_FROM_C = "uctr: task_init: set the step's container up from C (replay template)"


def test_a_later_step_sets_its_container_up_from_c(slurm_cluster, busybox, warm):
    """Local task 0 of a later step of the same request replays, in C, the setup the Python
    launcher recorded for the first one (launchers/c/replay.c): no task of that step starts
    Python, and the container is the one Python makes."""
    script = ("export UCTR_FAST_DEBUG=1; srun -l -N2 -n4 --ntasks-per-node=2 --container-image=%s sh -c '%s' > one 2>&1;"
              " srun -l -N2 -n4 --ntasks-per-node=2 --container-image=%s sh -c '%s' > two 2>&1;"
              " cat one; echo =====; cat two") % (busybox, SHAPE.replace("'", "'\\''"),
                                                  busybox, SHAPE.replace("'", "'\\''"))
    result = slurm_cluster.salloc([*LIMIT, "-N2", "-n4"], ["sh", "-c", script], name="replay")
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = result.stdout.split("=====\n")
    created = {int(m.group(1)) for m in re.finditer(
        r"^\s*(\d+): " + re.escape(CREATED_FROM_C) + "$", two, re.M)}
    assert len(created) == 2, two  # local task 0 of each node
    assert "uctr-exec path" not in two and "python path" not in two, two
    assert joined_tasks(two) >= {0, 1, 2, 3}, two
    # what the tasks of each node see, the same on both steps (the nodes' own mounts differ)
    shape = {}
    for name, text in (("one", one), ("two", two)):
        for task in range(4):
            lines = sorted(line.split(": ", 1)[1] for line in text.splitlines()
                           if re.match(r"^\s*%d: (cwd|id|mount|env|[A-Z])" % task, line))
            node = [ln for ln in lines if ln.startswith("env SLURM_NODEID=")]
            shape.setdefault((name, tuple(node)), set()).add(tuple(lines))
    assert {node for _name, node in shape} == {node for name, node in shape if name == "two"}
    for (name, node), seen in shape.items():
        differ = {ln for t in seen for ln in t} ^ {ln for t in shape["one", node] for ln in t}
        assert seen == shape["one", node], (name, node, sorted(differ))
    assert any(line.startswith("mount ") for seen in shape.values() for line in next(iter(seen)))
