"""uctr-exec: one rank of a parallel job, inside an image. See docs/launcher.md.

    srun --mpi=pmix uctr-exec IMAGE app ...        mpirun -np N uctr-exec IMAGE app ...

Per rank: the rank context (launch.rank), the node's cached policy (policy_cache), the
staged root filesystem (staged: hot lookup, or one rank per node stages), then the first
mode of the site's ladder that works. In N1 the ranks of a step on a node share one
container (sharedns): the first sets it up with the step's host injection (injection), the
others join it. Every path ends in exec: the payload replaces this process, so its exit
status is the rank's and no process of ours stays behind.

The path of a rank whose image is staged, whose policy is cached and whose step's container
exists imports only small stdlib-only modules: no requests, yaml, jsonschema, json, typing,
dataclasses or logging (tests/unit/test_launch_hot_path.py watches this).
"""

import os
import sys

from uctr_batch.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, ModeError, UctrError

DEFAULT_TMP = "/tmp"
HOST_FILES = ("/etc/hosts", "/etc/resolv.conf")
READ_ONLY_MODES = ("N1", "R1")  # modes that can mount the shared rootfs read-only
PAYLOAD_CODES = (126, 127)  # modes.base: the program to run is missing or not executable


PMI_PREFIXES = ("PMI_", "PMIX_", "SLURM_", "OMPI_", "PRTE_", "PALS_", "PBS_", "HYDRA_")


def needs_pmi(env) -> bool:
    """Whether a launcher's wiring may need binds or variables (else pmi_plan is a no-op)."""
    return any(key.startswith(PMI_PREFIXES) and not key.startswith("OMPI_ALLOW_RUN_AS_ROOT")
               for key in env)


def with_binds(binds, more):
    """binds plus more, a bind of `more` replacing one to the same destination; ordered by
    destination depth, as run.merge_binds orders them (a bind inside another lands on top)."""
    dsts = {dst for _src, dst, _ro in more}
    merged = [tuple(b) for b in binds if b[1] not in dsts] + [tuple(b) for b in more]
    return sorted(merged, key=lambda b: b[1].rstrip("/").count("/"))


class Diag:
    """Diagnostics on stderr, prefixed 'uctr[rank R]' when the job has several ranks."""

    def __init__(self, ctx=None, verbosity: int = 0):
        self.prefix = ctx.prefix if ctx is not None else "uctr"
        self.verbosity = verbosity

    def write(self, text: str) -> None:
        os.write(2, ("".join("%s: %s\n" % (self.prefix, line) for line in text.splitlines()))
                 .encode(errors="replace"))

    def say(self, text: str, level: int = 1) -> None:
        if self.verbosity >= level:
            self.write(text)

    def warn(self, text: str) -> None:
        if self.verbosity >= 0:
            self.write("warning: " + text)

    def error(self, e: UctrError) -> None:
        self.write("error: " + e.message + ("\nhint: " + e.hint if e.hint else ""))


def main(argv=None) -> int:
    env = dict(os.environ)  # a copy: staging points os.environ at the policy's directories
    # The shim's signal capture stays in os.environ for the exec (modes.sigstate) and never
    # enters the rank's environment, from which the payload's is built.
    env.pop("UCTR_SIGSTATE", None)
    args = sys.argv[1:] if argv is None else list(argv)
    diag = Diag()
    launch = None
    try:
        from uctr_batch.launch import options, rank

        ctx = rank.detect(env)
        diag = Diag(ctx)
        opts = options.parse(args, env)
        # For the fast-join record (launch.fastrec): how this rank's argv splits into the
        # options and the command, so that the C front can tell a rank asking the same.
        handover = bool(env.get("UCTR_ARGV0"))
        prefix = [] if handover else args[:len(args) - len(opts.command)]
        options.consume_handover(env)
        if opts.help:
            sys.stdout.write(options.USAGE)
            return 0
        diag.verbosity = opts.verbosity
        launch = Launch(opts, ctx, env, diag)
        launch.fast_request = (handover, prefix)
        launch.run()
        return EXIT_INTERNAL  # not reached: run() execs or raises
    except UctrError as e:
        diag.error(e)
        if launch is not None:
            launch.publish_outcome(error=e)
        if diag.verbosity >= 2:
            _traceback(diag)
        return e.exit_code
    except KeyboardInterrupt:
        diag.write("error: interrupted")
        return EXIT_INTERRUPTED
    except Exception:  # a bug: keep the traceback visible
        diag.write("error: internal error (please report this)")
        _traceback(diag)
        if launch is not None:
            launch.publish_outcome(error=InternalError())
        return EXIT_INTERNAL


class InternalError(UctrError):
    """What the step's other ranks say after this rank met a bug (its traceback is its own)."""
    exit_code = EXIT_INTERNAL

    def __init__(self):
        super().__init__("internal error (please report this)",
                         "the traceback is in the output of the step's first rank on this node")


def _traceback(diag: Diag) -> None:
    try:
        import traceback
    except ImportError:  # inside the container already: the host's library is out of sight
        diag.write("%r" % (sys.exc_info()[1],))
        return
    diag.write(traceback.format_exc().rstrip())


class Launch:
    """One rank's way from options to exec."""

    def __init__(self, opts, ctx, env, diag: Diag):
        self.opts, self.ctx, self.env, self.diag = opts, ctx, env, diag
        self.fast_request = None  # (handover, option tokens): main() sets it
        self.entered = False  # in the container's namespaces (set up or joined)
        self.ns_ops = None  # what setting the container up did (n1.setup_namespace)
        self.box = None  # the named container of --container-name/--container-save
        try:
            self.host_cwd = os.getcwd()
        except OSError:
            self.host_cwd = None

    def run(self) -> None:
        from uctr_batch.launch import policy_cache, recipe, staged

        policy = policy_cache.load(self.env)
        _cache_dir, local_dir = policy_cache.storage_dirs(policy, self.env)
        local_dir = staged.usable_local_dir(local_dir, self.env)  # a planted one: the fallback
        timeout = policy_cache.stage_timeout(policy, self.env)
        if (self.opts.image or "").startswith(("/", ".")):  # maybe an Apptainer image (SIF)
            self.run_sif(policy, local_dir)  # execs, raises, or returns: not a SIF
        def stage():
            return staged.ensure(self.opts.image, local_dir, policy=policy, timeout=timeout,
                                 job_id=self.ctx.job_id, env=self.env,
                                 verbosity=self.opts.verbose_flags, say=self.diag.say)

        if self.opts.name or self.opts.save:
            quota = policy_cache.section(policy, "storage").get("local_quota_bytes")
            image = self.named_container(local_dir, stage, timeout, quota)
        else:
            image = stage()
        self.diag.say("%s: rootfs %s (%s, %s)" % (self.opts.image, image.rootfs,
                                                  image.manifest_digest[:19], image.source), 2)
        self.policy, self.local_dir, self.timeout, self.image = policy, local_dir, timeout, image
        self.argv = self.compose_argv()
        self.image_part = recipe.image_inputs(self.opts, self.env, image, policy, self.host_cwd,
                                              recipe.policy_bind_sources(policy, self.env))
        self.inputs = recipe.inputs(self.image_part, self.env)
        if self.box is not None and self.opts.name:
            self.join_named()  # a step running in the named container: joined (exec)
        ladder = policy_cache.mode_ladder(policy, self.opts.mode)
        explicit = self.opts.mode is not None
        skipped = []
        for index, name in enumerate(ladder):
            if name != "N1":
                self.run_alone(ladder[index:], explicit)  # execs or raises
            reason = self.run_shared(explicit)  # execs, raises, or says why N1 cannot run
            self.diag.say("mode N1 skipped: %s" % reason)
            skipped.append("N1: " + reason)
        raise ModeError("no execution mode works on this node (%s)"
                        % ("; ".join(skipped) or "the ladder is empty"),
                        "run `uctr doctor` to see what this node supports; the site policy "
                        "sets the ladder")

    def compose_argv(self):
        from uctr_batch.launch.procspec import compose_argv

        config = self.image.config
        if not self.opts.entrypoint:  # pyxis --no-container-entrypoint (its default)
            config = dict(config, Entrypoint=None)
        return compose_argv(config, self.opts.command)

    # -- Apptainer images: run as they are in mode S1 (image/sif.py) ------------------------
    def run_sif(self, policy, local_dir) -> None:
        """Exec the SIF file the image names in mode S1; return if it names no SIF."""
        from uctr_batch.image import sif

        if sif.sif_path(self.opts.image) is None:  # a squashfs file, a rootfs: go on
            return
        from uctr_batch import run
        from uctr_batch.launch import policy_cache
        from uctr_batch.policy.model import NodePolicy

        target = run.sif_target(self.opts.image)
        if target is None:  # replaced meanwhile: what it is now decides
            return
        opts = self.opts
        sif.refuse_options(opts.image, (("--container-name", opts.name),
                                        ("--container-save", opts.save)))
        ladder = sif.s1_ladder(opts.image, policy_cache.mode_ladder(policy, opts.mode),
                               explicit=opts.mode is not None)
        self.publish_outcome(reason="an Apptainer image runs in mode S1, one container per rank")
        scratch = os.path.join(local_dir, "run")
        os.makedirs(scratch, 0o700, exist_ok=True)
        spec = run.build_spec(
            target, NodePolicy.from_dict(policy), command=opts.command, volumes=opts.volumes,
            user_env=opts.env, workdir=opts.workdir, read_only=not opts.writable,
            root=opts.remap_root, extra_binds=self.host_binds() + sif_pmix_binds(self.env, policy),
            host_env=self.env,
            host_cwd=self.host_cwd, scratch=scratch)
        run.exec_ladder(ladder, spec, explicit=True)

    # -- pyxis: named containers and --container-save ---------------------------------------
    def named_container(self, local_dir, stage, timeout, quota=None):
        """The named (or, for --container-save, the step's own) writable container; local
        rank 0 of a saving step stays behind its payload to save it when the node's ranks
        have ended: on every node, as in pyxis (each node's last task exports)."""
        from uctr_batch.launch import named

        image, box = named.prepare(local_dir, self.opts, self.ctx, stage, self.diag.say, quota)
        self.box = box
        self.opts.writable = True  # a named container keeps its changes: that is its point
        if self.opts.save and self.ctx.local_rank == 0:
            named.save_after_payload(box, self.opts.save, self.ctx, timeout,
                                     keep=bool(self.opts.name), diag=self.diag)
            # (returns in the child only, which goes on to exec the payload)
        return image

    def join_named(self) -> None:
        """--container-name=NAME[:exec] (pyxis): join the namespaces of a step running in the
        named container, as that step's own ranks join them (so its mounts are seen); return
        when there is none and the flag lets the step start its own. Only N1 shares a
        namespace: for :exec anything else is refused with the reason, never ignored."""
        from uctr_batch.errors import UsageError
        from uctr_batch.launch import named, sharedns, staged
        from uctr_batch.modes import get_mode, n1
        from uctr_batch.modes.spec import RunSpec

        request = named.join_request(self.opts.name)
        if request is None:
            return
        option = "--container-name=%s" % self.opts.name
        instead = "drop ':exec' to start this step in the container's files, with namespaces " \
                  "of its own"
        if self.opts.mode not in (None, "N1"):
            if request == "may":
                return
            raise ModeError("%s: joining a running container needs mode N1, not %s"
                            % (option, self.opts.mode), instead)
        probe = get_mode("N1").probe(RunSpec(self.image.rootfs, self.argv))
        if not probe.ok:
            if request == "may":
                return
            raise ModeError("%s: joining a running container needs mode N1, which is not "
                            "usable here: %s" % (option, probe.reason), instead)
        for step_key, key in self.box.running_steps(self.ctx.step_key):
            rdv = sharedns.Rendezvous(staged.launch_dir(self.local_dir), step_key, key,
                                      self.timeout)
            rdv.lock()
            try:
                member = rdv.live_member()
                if member is None:  # that step has ended
                    self.box.forget_running(step_key)
                    continue
                try:
                    spec = self.rank_spec(rdv.record["extras"])
                except BaseException:
                    member.close()
                    raise
                self.diag.say("%s: joining step %s" % (option, step_key), 1)
                self.publish_outcome(reason="the step joins the running container of step %s"
                                     % step_key)
                if self.opts.volumes:
                    self.diag.warn("%s: ignoring --container-mounts: this step joins the "
                                   "running container of step %s, with its mounts"
                                   % (option, step_key))
                rdv.join(member)
                self.entered = True
            finally:
                rdv.release()
            n1.exec_payload(spec)
        if request == "may":
            return
        raise UsageError("%s: no step runs in the container in a namespace that can be joined"
                         % option, "only a step running in mode N1 can be joined; " + instead)

    # -- N1: one container per step and node ------------------------------------------------
    def run_shared(self, explicit: bool) -> str:
        """Join the step's container or create it, then exec. Returns why N1 cannot run
        (before anything changed in this process) when another mode should be tried."""
        from uctr_batch.launch import recipe, sharedns, staged
        from uctr_batch.modes import get_mode, n1
        from uctr_batch.modes.base import ModeUnavailable
        from uctr_batch.modes.spec import RunSpec

        probe = get_mode("N1").probe(RunSpec(self.image.rootfs, self.argv))
        if not probe.ok:
            if explicit:
                raise ModeError("mode N1 is not usable here: %s" % probe.reason,
                                "run `uctr doctor` to see which modes work on this node")
            return probe.reason
        ns_key = recipe.digest(self.inputs)
        rdv = sharedns.Rendezvous(staged.launch_dir(self.local_dir), self.ctx.step_key, ns_key,
                                  self.timeout)
        # Everything a joining rank needs is computed (and imported) before setns: inside,
        # the host's files, our Python modules included, are out of sight. Computed before
        # taking the lock from the record as it is now, so that ranks do not queue for it.
        if not hasattr(os, "setns"):  # Python < 3.12: setns through ctypes, loaded outside
            n1.nsutil.libc()          # the lock (a few ms)
        peeked = rdv.peek()
        early = self.rank_spec(peeked["extras"]) if peeked else None
        rdv.lock()
        try:
            member = rdv.live_member()
            if member is not None:
                try:
                    if early is not None and rdv.record["extras"] == peeked["extras"]:
                        spec = early
                    else:
                        spec = self.rank_spec(rdv.record["extras"])
                except BaseException:
                    member.close()
                    raise
                self.diag.say("joining the step's container (generation %d, created by pid %d)"
                              % (rdv.record["generation"], rdv.record["creator"]), 2)
                rdv.join(member)
                self.entered = True
            else:
                entry = self.container(rdv.dir_fd, read_only=not self.opts.writable)
                spec = self.rank_spec(entry["extras"], entry["spec"])
                self.before_setup(entry, spec)
                fast = self.fast_record_dir()  # opened before pivot_root hides the host
                replay_lines = self.replay_lines(entry) if fast is not None else None
                if self.box is not None and self.opts.name:  # for the steps that join it
                    self.box.note_running(self.ctx.step_key, ns_key)
                self.ns_ops = []
                try:
                    n1.setup_namespace(spec, self.ns_ops)
                except ModeUnavailable as e:
                    if fast is not None:
                        os.close(fast)
                    if explicit:
                        raise
                    return e.message
                self.entered = True
                rdv.publish(entry["extras"], self.ctx.local_size)
                self.write_fast_record(fast, rdv, entry, spec, replay_lines)
        finally:
            rdv.release()
        n1.exec_payload(spec)
        raise ModeError("exec returned", None)  # not reached

    def fast_record_dir(self):
        """The fast-join record's directory (launch.fastrec), or None: the record only
        spares the other ranks their Python, so no failure here may stop this rank."""
        from uctr_batch.launch import fastrec

        if self.fast_request is None or not self.ctx.step_key.isascii():
            return None
        try:
            return fastrec.open_dir(self.env)
        except (UctrError, OSError) as e:
            self.diag.say("no fast-join record: %s" % e, 2)
            return None

    def write_fast_record(self, dir_fd, rdv, entry, spec, replay_lines=None) -> None:
        """Describe the container just published for the C front (launchers/c)."""
        from uctr_batch.launch import fastrec, staged

        if dir_fd is None:
            return
        try:
            handover, prefix, complete = self.fast_request_parts()
            lines = fastrec.build(
                step_key=self.ctx.step_key, prefix=prefix, complete=complete, handover=handover,
                config=self.image.config, policy=self.policy, user_env=self.opts.env,
                extras=entry["extras"], env=self.env, host_cwd=self.host_cwd, cwd=spec.cwd,
                launch_dir=rdv.directory, stem=rdv.stem, record=rdv.record,
                inuse=staged.inuse_dir(self.local_dir, self.image.manifest_digest),
                spec=spec, verbosity=self.opts.verbosity)
            fastrec.write(dir_fd, fastrec.record_name(self.ctx.step_key), lines)
            self.write_replay(dir_fd, lines, replay_lines)
        except (UctrError, OSError, ValueError, KeyError, TypeError) as e:
            self.diag.say("cannot write the fast-join record: %s" % e, 2)
            # the step's other tasks must not wait for it: they take the Python launcher
            self.write_outcome(dir_fd, reason="no fast-join record: %s" % e)
        finally:
            os.close(dir_fd)

    def replay_lines(self, entry):
        """launch.replay.prepare()'s lines for this container, or None; before the setup,
        which hides the host's files (and our modules: replay is imported here)."""
        from uctr_batch.launch import replay

        reason, lines = replay.prepare(self, entry)
        if reason:
            self.diag.say("no replay template: %s" % reason, 2)
            return None
        return lines

    def write_replay(self, dir_fd, record_lines, own) -> None:
        """The replay template for the next steps of this request (launch.replay), inside
        the container: only the descriptor and what replay_lines() computed."""
        from uctr_batch.launch import replay

        template = replay.complete(record_lines, own or (), self.ns_ops) if own else None
        if template is None:
            return
        try:  # only later steps' speed is at stake: the step's own record is written
            replay.write(dir_fd, next(ln[1] for ln in template if ln[0] == "replay_key"),
                         template)
        except OSError as e:
            self.diag.say("cannot write the replay template: %s" % e, 2)

    def fast_request_parts(self):
        """(handover, option tokens, complete) of this rank's request, for the records."""
        from uctr_batch.launch import options

        handover, prefix = self.fast_request
        # Does one more token after the options become the command? Not when the options
        # did not reach the image (UCTR_IMAGE and no command): then it would be taken for
        # the image, and the C front must not guess.
        complete = handover or options.parse(list(prefix) + ["x"], self.env).command == ["x"]
        return handover, prefix, complete

    def publish_outcome(self, error=None, reason=None) -> None:
        """Tell the step's other ranks on this node that no container of this rank comes:
        the SPANK plugin's tasks wait for the record of the container local task 0 makes
        (launchers/c/record.md, "Outcome records"). They then fail with this rank's error,
        or go to the Python launcher at once, instead of waiting for a record that never
        comes. Only before this rank entered a container, and never in its way: any
        failure here is ignored."""
        if self.entered or self.fast_request is None or not self.ctx.step_key.isascii():
            return  # inside a container, the host's files (our modules too) are out of sight
        command = None
        if error is not None and error.exit_code in PAYLOAD_CODES:
            command = self.missing_command()
            if command is None:
                return
        try:
            from uctr_batch.launch import fastrec

            dir_fd = fastrec.open_dir(self.env)
        except (UctrError, OSError, ImportError) as e:
            self.diag.say("no outcome record: %s" % e, 2)
            return
        try:
            self.write_outcome(dir_fd, error=error, reason=reason, command=command or None)
        finally:
            os.close(dir_fd)

    def write_outcome(self, dir_fd: int, **what) -> None:
        """fastrec.outcome(**what) for this rank's request, linked into DIR_FD."""
        from uctr_batch.launch import fastrec, sharedns

        try:
            handover, prefix, complete = self.fast_request_parts()
            ppid = os.getppid()
            lines = fastrec.outcome(
                step_key=self.ctx.step_key, prefix=prefix, complete=complete, handover=handover,
                env=self.env, host_cwd=self.host_cwd, parent=(ppid, sharedns.start_time(ppid)),
                **what)
            fastrec.write_outcome(dir_fd, fastrec.record_name(self.ctx.step_key), lines)
        except (UctrError, OSError, ValueError) as e:
            self.diag.say("no outcome record: %s" % e, 2)

    def missing_command(self):
        """For an error about the program to run (126, 127): the rank's own command when
        it is that program ("" when it is the image's Entrypoint, which every rank runs),
        else None (the image's Cmd: ranks that give a command may well run)."""
        argv = getattr(self, "argv", None)
        if not argv:
            return None
        config = self.image.config
        if self.opts.entrypoint and config.get("Entrypoint"):
            return ""
        if self.opts.command and argv[0] == self.opts.command[0]:
            return argv[0]
        return None

    # -- every other mode: one container per rank -------------------------------------------
    def run_alone(self, ladder, explicit: bool) -> None:
        from uctr_batch.launch import staged
        from uctr_batch.launch.nodelock import open_private_dir
        from uctr_batch.run import exec_ladder

        self.publish_outcome(reason="mode %s runs one container per rank" % ladder[0])

        dir_fd = open_private_dir(staged.launch_dir(self.local_dir))
        try:
            # The shared rootfs is read-only where a mode can enforce it (not proot/F1).
            entry = self.container(dir_fd, read_only=not self.opts.writable
                                   and ladder[0] in READ_ONLY_MODES)
        finally:
            os.close(dir_fd)
        spec = self.rank_spec(entry["extras"], entry["spec"])
        if self.ctx.local_rank == 0:
            self.before_setup(entry, spec)
        exec_ladder(ladder, spec, explicit)

    # -- the container (recipe + the step's PMI part) and the rank's process ---------------
    def container(self, dir_fd: int, read_only: bool) -> dict:
        """What the container of this step is: the cached recipe with the step's PMI part."""
        entry = self.recipe(dir_fd, read_only)
        if not needs_pmi(self.env):
            return entry
        from uctr_batch.launch import injection

        plan, pmi = injection.plan_step(self.image, entry["plan"], self.policy, self.env)
        fields = dict(entry["spec"])
        step_binds, step_devices = injection.plan_binds(pmi), injection.plan_devices(pmi)
        fields["binds"] = with_binds(fields["binds"], step_binds)
        fields["devices"] = list(fields["devices"]) + [
            d for d in step_devices if d not in fields["devices"]]
        extras = injection.extras(plan, entry["gpu_env_keys"], entry["extras"]["gpu_vendor"])
        extras.update({k: entry["extras"][k] for k in ("cwd_for", "cwd", "binds")})
        try:
            path = injection.write_manifest(self.image, plan)
        except OSError as e:
            self.diag.warn("cannot write the injection manifest: %s" % e)
            path = None
        return dict(entry, spec=fields, extras=extras, manifest=plan.summary_lines(),
                    manifest_path=path, warnings=list(plan.warnings),
                    step_part=bool(step_binds or step_devices))

    def recipe(self, dir_fd: int, read_only: bool) -> dict:
        """The container recipe: cached, or built now and cached."""
        from uctr_batch.launch import recipe

        key = recipe.recipe_key(self.image_part, (self.argv[0], read_only,
                                                  self.opts.remap_root))
        entry = recipe.load(dir_fd, key)
        if entry is not None:
            return entry
        entry = self.build_recipe(read_only)
        try:
            recipe.store(dir_fd, key, entry)
        except OSError as e:
            self.diag.say("cannot cache the container recipe: %s" % e)
        return entry

    def build_recipe(self, read_only: bool) -> dict:
        """run.build_spec (the semantics of `uctr run`) plus the image part of the injection."""
        from uctr_batch import envspec, run
        from uctr_batch.launch import injection, recipe
        from uctr_batch.policy.model import NodePolicy

        config, opts = self.image.config, self.opts
        image_env = envspec.parse_image_env(config.get("Env") or [])
        image_env.setdefault("PATH", envspec.DEFAULT_PATH)
        app = injection.app_inside(self.image.rootfs, self.argv[0], image_env)
        plan, gplan = injection.plan_image(self.image, self.policy, self.env, mpi=opts.mpi,
                                           gpu=opts.gpu, app=app)
        scratch = os.path.join(self.local_dir, "run")
        os.makedirs(scratch, 0o700, exist_ok=True)
        spec = run.build_spec(
            run.Target(self.image.rootfs, config, self.image.reference),
            NodePolicy.from_dict(self.policy), command=opts.command, volumes=opts.volumes,
            user_env=opts.env, workdir=opts.workdir, read_only=read_only,
            root=opts.remap_root, devices=injection.plan_devices(plan),
            extra_binds=self.host_binds() + injection.plan_binds(plan),
            host_env=self.env, host_cwd=self.host_cwd, scratch=scratch)
        try:
            manifest = injection.write_manifest(self.image, plan)
        except OSError as e:
            self.diag.warn("cannot write the injection manifest: %s" % e)
            manifest = None
        extras = injection.extras(plan, list(gplan.env), injection.gpu_vendor(gplan))
        extras.update(cwd_for=[self.host_cwd, opts.workdir], cwd=spec.cwd,
                      binds=[list(b) for b in spec.binds])
        return {"spec": recipe.container_fields(spec), "extras": extras,
                "plan": plan.to_dict(), "gpu_env_keys": list(gplan.env),
                "manifest": plan.summary_lines(), "manifest_path": manifest,
                "warnings": list(plan.warnings)}

    def rank_spec(self, extras: dict, container=None):
        """This rank's RunSpec: its own argv, environment and working directory in the
        container described by `container` (recipe fields; None: joined, only the rootfs)."""
        from uctr_batch.launch import injection, procspec
        from uctr_batch.modes.spec import RunSpec

        config, opts, env = self.image.config, self.opts, self.env
        base = procspec.base_env(config, self.policy, env, opts.env)
        gpu_env = injection.gpu_env(env, extras.get("gpu_vendor"), self.policy)
        final = procspec.finish_env(base, env, extras, gpu_env, opts.env)
        if extras.get("cwd_for") == [self.host_cwd, opts.workdir]:
            cwd = extras["cwd"]
        else:
            binds = [tuple(b) for b in extras.get("binds") or ()]
            cwd = procspec.choose_cwd(opts.workdir, self.host_cwd, binds,
                                      config.get("WorkingDir"))
        fields = dict(container or {"rootfs": self.image.rootfs})
        return RunSpec(argv=self.argv, env=final, cwd=cwd, **fields)

    def host_binds(self):
        """What a rank shares with the host besides the network: its name resolution (the
        host network is shared, so the image's /etc/hosts would be wrong: Open MPI then
        waits 5 s for DNS to resolve the node's own name), /tmp (node-local scratch, Open
        MPI's session directory) and $HOME."""
        binds = [(path, path, True) for path in HOST_FILES if os.path.isfile(path)]
        if os.path.isdir(DEFAULT_TMP):
            binds.append((DEFAULT_TMP, DEFAULT_TMP, False))
        home = self.env.get("HOME")
        if self.opts.mount_home and home and home != "/" and os.path.isdir(home):
            binds.append((home, home, False))
        return binds

    def before_setup(self, entry: dict, spec) -> None:
        """Once per container: the command must exist (exit 127 now, not after setting up a
        namespace); drop in-use marks of finished ranks; warnings always, the injection
        manifest with --verbose."""
        from uctr_batch.launch import staged
        from uctr_batch.modes.base import check_command

        check_command(spec)
        staged.prune_dead_pids(self.local_dir, self.image.manifest_digest)
        for warning in entry.get("warnings") or ():
            self.diag.warn(warning)
        if self.diag.verbosity >= 1:
            lines = entry.get("manifest") or ["nothing injected"]
            path = entry.get("manifest_path")
            self.diag.write("injection manifest%s:\n%s" % (" (%s)" % path if path else "",
                                                           "\n".join("  " + ln for ln in lines)))


def sif_pmix_binds(env, policy) -> list:
    """The PMIx server's directories for a rank in a SIF (read-write, as inject.pmi binds
    them for other images): apptainer binds none of them by itself, and without them an
    `srun --mpi=pmix` rank in a SIF cannot reach its server. The rest of the rank's wiring
    (PMI_*/PMIX_* variables, the host network, an inherited PMI fd) apptainer keeps."""
    from uctr_batch.inject import pmi, policyview

    if not policyview.get(policy, "pmix", True):
        return []
    return [(path, path, False) for path in pmi.shared_dirs(env, "/", policy)]


if __name__ == "__main__":
    raise SystemExit(main())
