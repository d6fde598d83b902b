"""The image process: walk the phases, run the hooks, own every resource.

Read this file top to bottom: `Process.run` is the whole story.  Resources
are recorded in the cleanup journal (journal.py) and unwound by one ExitStack,
newest first, whatever happens.  Hooks talk back through one channel (JSON
lines on $IMG_STATUS_FD, see docs/hooks.md).
"""

import contextlib
import fcntl
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque

from imaging_elements import config, elements, hooks, imagetype, sandbox
from imaging_elements.journal import Journal
from imaging_elements.resources import BIN, LIB
from imaging_elements.resources import PYTHONPATH as ROOT

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
OUTPUT_TAIL = 20
SECRET_NAME = re.compile(r"PASSPHRASE|PASSWORD|SECRET|TOKEN")


class Phase:
    """where: host, chroot or instance.  kind: how the phase's hooks are run:
    all (every accepting hook), validate (all, results kept, optional ones
    warn), chain (a planned chain of converters), transform (every accepting
    hook replaces the image)."""

    def __init__(self, name, where, kind, context=()):
        self.name, self.where, self.kind, self.context = name, where, kind, context


PHASES = (
    Phase("unbundle", "host", "transform", ("source-type",)),
    Phase("mount", "host", "all", ("disk-type",)),
    Phase("validate", "host", "validate", ("platform",)),
    Phase("install", "chroot", "all", ("platform",)),
    Phase("convert", "host", "chain", ("source-type", "dest-type")),
    Phase("instance-validate", "instance", "validate", ("platform",)),
    Phase("crypt", "host", "chain", ("source-crypt", "dest-crypt")),
    Phase("bundle", "host", "chain", ("source-type", "dest-type")),
    Phase("cleanup", "host", "all"),
)
PHASE_NAMES = [p.name for p in PHASES]
CONTEXT_VARS = {"disk-type": "IMG_DISK_TYPE", "platform": "IMG_PLATFORM",
                "source-type": "IMG_SOURCE_TYPE", "dest-type": "IMG_DEST_TYPE",
                "source-crypt": "IMG_SOURCE_CRYPT", "dest-crypt": "IMG_DEST_CRYPT"}


class ProcessFailure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that the ExitStack unwinds."""


def _terminate(signum, frame):
    raise Terminated()


class Process:
    def __init__(self, args, monitor):
        self.args = args
        self.monitor = monitor
        self.env = {}          # the IMG_* state that hooks see and may change
        self.results = []      # validator results, for the summary
        self.failed = False
        self.journal = None
        self.output_tmp = None
        self.breaks = set(filter(None, (args.breaks or "").replace(" ", "").split(",")))
        self.phases = self._selected_phases()

    # -- the whole story -------------------------------------------------------
    def run(self):
        """Returns (exit code, error message or None)."""
        code, error = 0, None
        self.cleanup_failures = []
        with contextlib.ExitStack() as stack:
            # First in, last out: SIGTERM raises until every resource is released.
            stack.enter_context(_signals_raise())
            try:
                self._prepare(stack)  # ties the journal's unwinding to `stack` at once
                if self.args.list:
                    self._list()
                else:
                    for phase in PHASES[:-1]:
                        self._phase(phase)
                    self._publish_output()
            except ProcessFailure as failure:
                code, error = failure.code, str(failure)
            except KeyboardInterrupt:
                code, error = 130, "interrupted"
            except Terminated:
                code, error = 143, "terminated by SIGTERM"
            self.failed = code != 0
            if code and "after-error" in self.breaks and self.journal:
                self._after_error()
            if self.journal and not self.args.list:
                code, error = self._cleanup_phase(code, error)
        if code == 0 and self.cleanup_failures:
            code, error = 5, "; ".join(self.cleanup_failures)
        return code, error

    # -- setup -------------------------------------------------------------------
    def _selected_phases(self):
        chosen = set(PHASE_NAMES)
        for option, names in (("--phases", self.args.phases), ("--skip-phases", self.args.skip_phases)):
            if not names:
                continue
            listed = {n.strip().removesuffix(".d") for n in names.split(",") if n.strip()}
            unknown = listed - set(PHASE_NAMES)
            if unknown:
                raise ProcessFailure(2, f"{option}: unknown phase {', '.join(sorted(unknown))}; "
                                        f"phases are {', '.join(PHASE_NAMES)}")
            chosen = chosen & listed if option == "--phases" else chosen - listed
        for point in self.breaks:
            where, _, phase = point.partition("-")
            if point != "after-error" and (where not in ("before", "after") or phase not in PHASE_NAMES):
                raise ProcessFailure(2, f"break point {point!r}: use before-PHASE, after-PHASE or "
                                        f"after-error with PHASE one of {', '.join(PHASE_NAMES)}")
        return chosen

    def _prepare(self, stack):
        args = self.args
        warn = lambda message: self.monitor.event("warning", message=message)
        try:
            library = elements.find_elements(args.elements_path, warn=warn)
            self.elements = elements.resolve(args.elements, library)
        except (elements.ElementError, OSError) as exc:
            raise ProcessFailure(2, str(exc)) from exc
        self.hooks, problems = {}, []
        try:
            for phase in PHASES:
                self.hooks[phase.name], found = hooks.collect(phase.name, self.elements)
                problems += found
        except hooks.HookError as exc:
            raise ProcessFailure(2, str(exc)) from exc
        for problem in problems:
            warn(problem)
        if args.only_hook:
            self._restrict_to_hook(args.only_hook)
        self.monitor.event("process-start", elements=[e.name for e in self.elements],
                           input=args.input, output=args.output)

        self._prepare_work_dir(stack)
        self._prepare_image()
        self._prepare_output()
        self.env.update(self._element_options())
        self.env.update(self._source_environment_d())

    def _restrict_to_hook(self, spec):
        phase, _, name = spec.partition("/")
        phase = phase.removesuffix(".d")
        if phase not in self.hooks or not any(h.name == name for h in self.hooks[phase]):
            raise ProcessFailure(2, f"--hook {spec}: no hook {name} in phase {phase}")
        self.hooks[phase] = [h for h in self.hooks[phase] if h.name == name]

    def _prepare_work_dir(self, stack):
        # Daemons that hooks start (qemu-storage-daemon, ntfs-3g) outlive their
        # hook; as their subreaper we reap them the moment the journal kills them.
        _become_subreaper()
        args = self.args
        if args.work_dir:
            work = os.path.abspath(args.work_dir)
            os.makedirs(work, exist_ok=True)
            created = False
        else:
            # /var/tmp, not /tmp: images are large and /tmp may be in memory.
            work = tempfile.mkdtemp(prefix="euca-image-process.", dir=os.environ.get("TMPDIR", "/var/tmp"))
            created = True
            with open(os.path.join(work, ".created-by-euca-image-process"), "w"):
                pass
        self.work = work
        lock = open(os.path.join(work, "lock"), "w")
        stack.callback(lock.close)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ProcessFailure(2, f"{work}: another euca-image-process is using this work dir")
        if created and not args.keep_work_dir:
            # After a failure the logs (a guest's console, daemons' output) stay.
            stack.callback(lambda: remove_work_dir(work, self._warn, keep_logs=self.failed))
        self.journal = Journal(os.path.join(work, "journal.jsonl"))
        stack.callback(self._unwind)
        leftover = self.journal.pending()
        if leftover:
            raise ProcessFailure(2, f"{work}: {len(leftover)} resource(s) left by an earlier process; "
                                    f"run euca-image-process --cleanup {work} first")
        scratch = os.path.join(work, "scratch")
        mount_point = os.path.join(work, "mnt")
        for path in (scratch, mount_point, os.path.join(work, "logs")):
            os.makedirs(path, exist_ok=True)
        self.env.update(IMG_WORK_DIR=work, IMG_SCRATCH_DIR=scratch, IMG_MOUNT_POINT=mount_point,
                        IMG_JOURNAL=self.journal.path, IMG_LIB=LIB, IMG_PYTHON=sys.executable,
                        IMG_ELEMENTS=" ".join(e.name for e in self.elements),
                        IMG_PLATFORM=args.platform,
                        IMG_MOUNT_WRITABLE="1" if self.hooks["install"] and "install" in self.phases else "0")

    def _prepare_image(self):
        args = self.args
        if not args.input:
            if args.output:
                raise ProcessFailure(2, "-o/--output needs -i/--input")
            return
        path = os.path.abspath(args.input)
        if not os.path.isfile(path):
            raise ProcessFailure(3, f"{path}: no such file" if not os.path.exists(path)
                                 else f"{path}: not a regular file")
        try:
            image_type = imagetype.resolve(path, args.input_type)
        except imagetype.ImageTypeError as exc:
            raise ProcessFailure(3, str(exc)) from exc
        self.env.update(IMG_INPUT=path, IMG_INPUT_TYPE=image_type, IMG_IMAGE=path,
                        IMG_IMAGE_TYPE=image_type, IMG_IMAGE_CRYPT="none", IMG_DISK_TYPE=image_type)
        if self.env["IMG_MOUNT_WRITABLE"] == "1" and not args.list:
            self._working_copy(path)

    def _working_copy(self, path):
        """install.d hooks change the image: they get a copy, never the user's file."""
        copy = os.path.join(self.env["IMG_SCRATCH_DIR"], "working-copy." + self.env["IMG_IMAGE_TYPE"])
        need, have = os.stat(path).st_blocks * 512, _free(self.env["IMG_SCRATCH_DIR"])
        if need > have:
            raise ProcessFailure(4, f"{path}: a working copy needs {need} bytes in "
                                    f"{self.env['IMG_SCRATCH_DIR']}, {have} bytes free")
        self.journal.add("remove", path=copy)
        result = subprocess.run(["cp", "--sparse=always", "--reflink=auto", path, copy],
                                stderr=subprocess.PIPE, text=True)
        if result.returncode:
            raise ProcessFailure(1, f"{path}: cannot make a working copy: {result.stderr.strip()}")
        self.env["IMG_IMAGE"] = copy

    def _prepare_output(self):
        args = self.args
        if not args.output:
            return
        output = os.path.abspath(args.output)
        directory = os.path.dirname(output)
        if not os.path.isdir(directory):
            raise ProcessFailure(3, f"{output}: output directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ProcessFailure(3, f"{output}: output directory {directory} is not writable")
        if os.path.isdir(output) and os.listdir(output):
            raise ProcessFailure(3, f"{output}: exists and is a directory that is not empty")
        output_type = args.output_type or self.env["IMG_IMAGE_TYPE"]
        self.env.update(IMG_OUTPUT=output, IMG_OUTPUT_TYPE=output_type,
                        IMG_OUTPUT_CRYPT=args.output_crypt or "none")
        self.output_tmp = os.path.join(directory, f".{os.path.basename(output)}.partial-{os.getpid()}")
        if not args.list:
            self.journal.add("remove", path=self.output_tmp)

    def _element_options(self):
        options = {}
        for name, value in (("IMG_SIZE", self.args.size), ("IMG_KERNEL", self.args.kernel),
                            ("IMG_RAMDISK", self.args.ramdisk)):
            if value:
                options[name] = os.path.abspath(value) if name != "IMG_SIZE" else value
        for item in self.args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise ProcessFailure(2, f"-e {item!r}: use NAME=VALUE")
            options[name if name.startswith("IMG_") else "IMG_" + name] = value
        return options

    def _source_environment_d(self):
        """Source every environment.d file in hook order; keep the exported IMG_* variables."""
        files = []
        for element in self.elements:
            directory = element.hook_dir("environment")
            if os.path.isdir(directory):
                files += [(name, os.path.join(directory, name)) for name in os.listdir(directory)]
        if not files:
            return {}
        files.sort(key=lambda item: hooks.sort_key(item[0]))
        script = "".join(f'source "{path}" || {{ echo "{path}: failed (exit $?)" >&2; exit 1; }}\n'
                         for _, path in files) + "env -0\n"
        result = subprocess.run(["bash", "-c", script], env=self._base_env(), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode:
            raise ProcessFailure(2, "environment.d: " + result.stderr.decode(errors="replace").strip())
        found = {}
        for item in result.stdout.split(b"\0"):
            name, _, value = item.decode(errors="replace").partition("=")
            if name.startswith("IMG_") and self.env.get(name) != value:
                found[name] = value
        return found

    # -- phases --------------------------------------------------------------------
    def _phase(self, phase):
        if phase.name not in self.phases:
            return
        if phase.name == "convert":
            self._release_mount()
        run = {"all": self._run_all, "validate": self._run_validators, "chain": self._run_chain,
               "transform": self._run_transform}[phase.kind]
        hooks_here = self.hooks[phase.name]
        if not hooks_here and not (phase.kind == "chain" and self._chain_target(phase)):
            return
        self._break("before-" + phase.name, phase)
        self.monitor.event("phase-start", phase=phase.name, hooks=len(hooks_here))
        started, result = time.monotonic(), "ok"
        try:
            run(phase, hooks_here)
        except BaseException:
            result = "failed"
            raise
        finally:
            self.monitor.event("phase-end", phase=phase.name, result=result,
                               duration=round(time.monotonic() - started, 3))
        if phase.name == "mount" and self.env.get("IMG_PLATFORM") == "auto":
            self.env["IMG_PLATFORM"] = "unknown"
        self._break("after-" + phase.name, phase)

    def _release_mount(self):
        """Conversion reads the image file: first let go of every mount-phase resource."""
        self.cleanup_failures += self.journal.unwind(scope="mount", log=self._warn)
        still = _mounts_under(self.env["IMG_MOUNT_POINT"])
        if still:
            raise ProcessFailure(1, f"could not release the mounted image: {', '.join(still)} still mounted")

    def _context(self, phase):
        return {key: self.env.get(CONTEXT_VARS[key], "") for key in phase.context}

    def _accepted(self, phase, hook, context=None, env=None):
        context = self._context(phase) if context is None else context
        if phase.where == "host":
            ok, reason = hooks.accepts(hook, context, env or self._hook_env(hook))
        else:  # runs inside the image: only the declared context can be judged from here
            ok, reason = hooks.static_accepts(hook, context, None)
        self.monitor.event("accepts", phase=phase.name, hook=hook.name, accepted=ok, reason=reason)
        return ok

    def _run_all(self, phase, hooks_here):
        for hook in hooks_here:
            if self._accepted(phase, hook):
                self._run_hook(phase, hook)

    def _run_validators(self, phase, hooks_here):
        accepted = [h for h in hooks_here if self._accepted(phase, h)]
        if phase.where == "instance":
            return self._run_instance(phase, accepted)
        # Every validator runs, so the user sees all that is wrong at once.
        failures = []
        for hook in accepted:
            try:
                self._run_hook(phase, hook, validator=True)
            except ProcessFailure as failure:
                failures.append(failure)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise ProcessFailure(1, f"{len(failures)} validators failed: "
                                    + "; ".join(str(f) for f in failures))

    def _run_transform(self, phase, hooks_here):
        for hook in hooks_here:
            output = os.path.join(self.env["IMG_SCRATCH_DIR"], f"{phase.name}-{hook.name}.img")
            extra = {"IMG_SOURCE_TYPE": self.env["IMG_IMAGE_TYPE"], "IMG_CONVERT_OUTPUT": output}
            if not self._accepted(phase, hook, {"source-type": extra["IMG_SOURCE_TYPE"]},
                                  self._hook_env(hook, extra)):
                continue
            self.journal.add("remove", path=output)
            self._run_hook(phase, hook, extra=extra)
            self._advance_image(output)

    def _advance_image(self, output, image_type=None):
        if not os.path.lexists(output):
            raise ProcessFailure(1, f"the hook did not write {output}")
        self.env["IMG_IMAGE"] = output
        if image_type is None and self.env.get("IMG_IMAGE_TYPE") in (None, "", "bundle"):
            image_type = imagetype.detect(output) if os.path.isfile(output) else "unknown"
            if image_type == "unknown":
                image_type = "raw"  # a bundle holds plain bytes; the mounters will say more
        if image_type:
            self.env["IMG_IMAGE_TYPE"] = image_type
        self.env["IMG_DISK_TYPE"] = self.env["IMG_IMAGE_TYPE"]

    # -- converter chains ------------------------------------------------------------
    def _chain_target(self, phase):
        """(source, target) the phase must get from and to, or None when it has nothing to do."""
        env = self.env
        if not env.get("IMG_OUTPUT"):
            return None
        output_type = env["IMG_OUTPUT_TYPE"]
        if phase.name == "convert":
            current = env["IMG_IMAGE_TYPE"]
            if output_type == "bundle":
                target = current if current in ("raw", "partition") else "raw"
                return (current, target) if target != current else None
            return current, output_type
        if phase.name == "crypt":
            current, wanted = env.get("IMG_IMAGE_CRYPT", "none"), env.get("IMG_OUTPUT_CRYPT", "none")
            return (current, wanted) if current != wanted else None
        if phase.name == "bundle":
            return (env["IMG_IMAGE_TYPE"], "bundle") if output_type == "bundle" else None
        return None

    def _is_last_writer(self, phase):
        later = PHASE_NAMES[PHASE_NAMES.index(phase.name) + 1:]
        return not any(p.kind == "chain" and p.name in later and p.name in self.phases
                       and self._chain_target(p) for p in PHASES)

    def _plan(self, phase, hooks_here, source, target):
        """The shortest chain of accepting hooks from source to target (ties: hook order)."""
        src_key, dst_key = phase.context
        types = {target}
        for hook in hooks_here:
            types.update(t for t in hook.header.get("accepts-" + dst_key, "").split() if t != "*")
        types = sorted(types)
        cache = {}

        def edge(hook, s, d):
            if phase.name == "crypt" and "none" not in (s, d):
                return False  # a crypt hook only ever encrypts or decrypts
            if (hook.name, s, d) not in cache:
                env = self._hook_env(hook, {CONTEXT_VARS[src_key]: s, CONTEXT_VARS[dst_key]: d})
                cache[hook.name, s, d] = self._accepted(phase, hook, {src_key: s, dst_key: d}, env)
            return cache[hook.name, s, d]

        for hook in hooks_here:  # one hook for the whole way, if any
            if edge(hook, source, target):
                return [(hook, source, target)]
        previous, frontier = {source: None}, [source]
        while frontier and target not in previous:
            following = []
            for s in frontier:
                for hook in hooks_here:
                    for d in types:
                        if d not in previous and d != s and edge(hook, s, d):
                            previous[d] = (hook, s)
                            following.append(d)
            frontier = following
        if target not in previous:
            names = ", ".join(e.name for e in self.elements)
            raise ProcessFailure(2, f"{phase.name}: no hook of the elements ({names}) converts "
                                    f"{source} to {target}, alone or in a chain")
        chain, step = [], target
        while previous[step]:
            hook, s = previous[step]
            chain.append((hook, s, step))
            step = s
        return chain[::-1]

    def _run_chain(self, phase, hooks_here):
        source, target = self._chain_target(phase)
        src_key, dst_key = phase.context
        chain = self._plan(phase, hooks_here, source, target)
        last_writer = self._is_last_writer(phase)
        steps = []
        for index, (hook, s, d) in enumerate(chain):
            final = last_writer and index == len(chain) - 1
            output = self.output_tmp if final else os.path.join(
                self.env["IMG_SCRATCH_DIR"], f"{phase.name}-{index}-{hook.name}.{d}")
            extra = {CONTEXT_VARS[src_key]: s, CONTEXT_VARS[dst_key]: d, "IMG_CONVERT_OUTPUT": output}
            steps.append((hook, extra, final))
        self._check_capacity(phase, steps)
        for hook, extra, final in steps:
            if not final:
                self.journal.add("remove", path=extra["IMG_CONVERT_OUTPUT"])
            self._run_hook(phase, hook, extra=extra)
            if phase.name == "crypt":
                self.env["IMG_IMAGE_CRYPT"] = extra["IMG_DEST_CRYPT"]
                self._advance_image(extra["IMG_CONVERT_OUTPUT"], image_type=self.env["IMG_IMAGE_TYPE"])
            else:
                self._advance_image(extra["IMG_CONVERT_OUTPUT"], image_type=extra["IMG_DEST_TYPE"])

    def _check_capacity(self, phase, steps):
        """Fail before the first byte is written if the chain cannot fit."""
        scratch_need = output_need = 0
        for hook, extra, final in steps:
            try:
                need = hooks.required_capacity(hook, self._hook_env(hook, extra))
            except hooks.HookError as exc:
                raise ProcessFailure(1, str(exc)) from exc
            if final:
                output_need += need
            else:
                scratch_need += need
        scratch = self.env["IMG_SCRATCH_DIR"]
        checks = [(scratch_need, scratch, _free(scratch), "free in the work directory")]
        if output_need:
            checks.append((output_need, os.path.dirname(self.output_tmp),
                           _free(os.path.dirname(self.output_tmp)), "free in the output directory"))
        if self.args.scratch_limit and scratch_need:
            limit = config.parse_size(self.args.scratch_limit)
            checks.append((scratch_need, scratch, limit - _usage(scratch), "left of --scratch-limit"))
        for need, where, have, what in checks:
            if need > have:
                raise ProcessFailure(4, f"{phase.name}: not enough space: needs {need} bytes in "
                                        f"{where}, {max(have, 0)} bytes {what}")

    # -- running one hook ------------------------------------------------------------
    def _base_env(self):
        path = os.pathsep.join([os.path.dirname(sys.executable), BIN, SYSTEM_PATH])
        return {"PATH": path, "LANG": "C.UTF-8", "HOME": "/root", "PYTHONPATH": ROOT,
                "TMPDIR": self.env.get("IMG_SCRATCH_DIR", "/tmp"), **self.env}

    def _hook_env(self, hook, extra=None):
        env = self._base_env()
        env.update(IMG_PHASE=hook.phase, IMG_HOOK=hook.name, IMG_ELEMENT=hook.element,
                   IMG_ELEMENT_DIR=os.path.dirname(os.path.dirname(hook.path)),
                   IMG_JOURNAL_SCOPE=hook.phase)
        env.update(extra or {})
        return env

    def _run_hook(self, phase, hook, extra=None, validator=False):
        env = self._hook_env(hook, extra)
        self.monitor.event("hook-start", phase=phase.name, hook=hook.name, element=hook.element)
        started = time.monotonic()
        status_read, status_write = os.pipe()
        env["IMG_STATUS_FD"] = str(status_write)
        try:
            if phase.where == "chroot":
                argv = sandbox.hook_argv(self.env["IMG_MOUNT_POINT"], hook,
                                         writable=self.env.get("IMG_MOUNT_WRITABLE") == "1")
                env = sandbox.inside_environment(env)
            else:
                argv = hook.argv("run")
            process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, pass_fds=(status_write,),
                                       start_new_session=True)
        except (OSError, sandbox.SandboxError) as exc:
            os.close(status_read)
            raise ProcessFailure(1, f"{hook.path}: cannot run: {exc}") from exc
        finally:
            os.close(status_write)
        entry = self.journal.add("kill", pid=process.pid, group=True)
        report = {"describe": [], "warn": [], "fail": None}
        try:
            tail = self._follow(phase, hook, process, status_read, report)
        finally:
            if process.poll() is None:  # interrupted: stop it before anything else unwinds
                _stop(process)
            self.journal.done(entry)
        duration = round(time.monotonic() - started, 3)
        description = "; ".join(report["describe"])
        if process.returncode == 0:
            self._check_scratch()
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="ok", duration=duration, description=description)
            if validator:
                self.results.append({"hook": hook.name, "result": "ok", "description": description})
            return
        reason = report["fail"] or (f"exit {process.returncode}"
                                    + (": " + " | ".join(tail) if tail else ""))
        if validator and hook.optional:
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="warning", duration=duration, reason=reason, optional=True)
            self.results.append({"hook": hook.name, "result": "warning", "reason": reason})
            return
        self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                           result="failed", duration=duration, reason=reason)
        if validator:
            self.results.append({"hook": hook.name, "result": "failed", "reason": reason})
        raise ProcessFailure(1, f"{phase.name}/{hook.name} ({hook.element}) failed: {reason}")

    def _follow(self, phase, hook, process, status_read, report):
        """Relay the hook's output and status lines until it ends; returns its last lines."""
        tail = deque(maxlen=OUTPUT_TAIL)
        buffers = {status_read: b"", process.stdout.fileno(): b""}
        selector = selectors.DefaultSelector()
        for fd in buffers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        try:
            while selector.get_map():
                exited = process.poll() is not None
                ready = selector.select(timeout=0 if exited else 0.2)
                if exited and not ready:
                    break  # a daemon the hook started keeps the pipes open
                for key, _ in ready:
                    data = os.read(key.fd, 65536)
                    if not data:
                        selector.unregister(key.fd)
                        continue
                    lines = (buffers[key.fd] + data).split(b"\n")
                    buffers[key.fd] = lines.pop()
                    for line in lines:
                        text = line.decode(errors="replace")
                        if key.fd == status_read:
                            self._message(phase, hook, text, report)
                        else:
                            text = self._redact(text)
                            tail.append(text)
                            self.monitor.event("log", level="INFO", message=f"{hook.name}: {text}")
            process.wait()
        finally:
            selector.close()
            os.close(status_read)
            process.stdout.close()
        return list(tail)

    def _redact(self, text):
        """Hide the values of secret variables in anything we log."""
        for name, value in self.env.items():
            if value and len(value) >= 4 and SECRET_NAME.search(name):
                text = text.replace(value, "***")
        return text

    def _message(self, phase, hook, text, report):
        text = self._redact(text)
        try:
            message = json.loads(text)
            (kind, value), = message.items()
        except ValueError:
            self._warn(f"{hook.path}: not a status line: {text[:200]!r}")
            return
        if kind == "describe":
            report["describe"].append(str(value))
        elif kind == "warn":
            report["warn"].append(str(value))
            self._warn(f"{phase.name}/{hook.name}: {value}")
        elif kind == "fail":
            report["fail"] = str(value)
        elif kind == "set" and isinstance(value, dict):
            for name, setting in value.items():
                if name.startswith("IMG_"):
                    self.env[name] = str(setting)
                else:
                    self._warn(f"{hook.path}: may only set IMG_* variables, not {name}")
        elif kind == "progress":
            self.monitor.event("progress", phase=phase.name, hook=hook.name,
                               done=int(value["done"]), total=int(value["total"]))
        else:
            self._warn(f"{hook.path}: unknown status line {text[:200]!r}")

    def _check_scratch(self):
        if self.args.scratch_limit:
            limit, used = config.parse_size(self.args.scratch_limit), _usage(self.env["IMG_SCRATCH_DIR"])
            if used > limit:
                raise ProcessFailure(4, f"scratch space {self.env['IMG_SCRATCH_DIR']} holds {used} "
                                        f"bytes, over --scratch-limit {limit}")

    def _run_instance(self, phase, accepted):
        if not accepted:
            return
        from imaging_elements import instance  # boots qemu: loaded only when needed
        self.monitor.event("hook-start", phase=phase.name, hook="(boot)", element="-")
        env = self._base_env()

        def emit(message):
            if "describe" in message:  # how the guest was booted, and how long it took
                self.monitor.event("log", level="INFO", message=f"{phase.name}: {message['describe']}")
            else:
                self._message(phase, accepted[0], json.dumps(message), {"describe": [], "warn": [], "fail": None})

        try:
            results = instance.run_phase([(h.name, h.path) for h in accepted], env, self.journal, emit)
        except instance.InstanceError as exc:
            raise ProcessFailure(1, f"{phase.name}: {exc}") from exc
        optional = {h.name: h.optional for h in accepted}
        failed = []
        for result in results:
            name = result["hook"]
            outcome = ("skipped" if result.get("skipped") else "ok") if result["ok"] else \
                ("warning" if optional.get(name) else "failed")
            text = result.get("description") or result.get("output", "")[-500:]
            self.monitor.event("hook-end", phase=phase.name, hook=name, element="-", result=outcome,
                               duration=result.get("duration", 0), description=text)
            self.results.append({"hook": name, "result": outcome, "description": text})
            if outcome == "failed":
                failed.append(f"{name}: {text}")
        if failed:
            raise ProcessFailure(1, f"{phase.name} failed: " + "; ".join(failed))

    # -- break points, output, cleanup ------------------------------------------------
    def _break(self, point, phase=None):
        if point not in self.breaks:
            return
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            raise ProcessFailure(2, f"break point {point}: no terminal attached to open a shell; "
                                    "remove it from --break / break= to run unattended")
        env = self._base_env()
        env.update(PS1=f"[euca-image-process {point}] \\w # ", TERM=os.environ.get("TERM", "xterm"))
        argv = ["bash", "--norc", "--noprofile", "-i"]
        if phase is not None and phase.where == "chroot":
            env = sandbox.inside_environment(env)
            argv = sandbox.wrap(self.env["IMG_MOUNT_POINT"], argv, interactive=True,
                                writable=self.env.get("IMG_MOUNT_WRITABLE") == "1")
        self.monitor.event("log", level="INFO",
                           message=f"break point {point}: a shell; exit 0 to go on, exit 1 to stop")
        if subprocess.run(argv, env=env).returncode != 0:
            raise ProcessFailure(1, f"stopped at break point {point}")

    def _after_error(self):
        try:
            self._break("after-error")
        except ProcessFailure as failure:
            self._warn(str(failure))
        except (KeyboardInterrupt, Terminated):
            pass

    def _cleanup_phase(self, code, error):
        phase = PHASES[-1]
        try:
            self._phase(phase)
        except ProcessFailure as failure:
            if code == 0:
                return failure.code, str(failure)
            self._warn(f"cleanup phase: {failure}")
        except (KeyboardInterrupt, Terminated):
            if code == 0:
                return 130, "interrupted during cleanup"
        return code, error

    def _publish_output(self):
        if not self.output_tmp:
            return
        output = self.env["IMG_OUTPUT"]
        if not os.path.lexists(self.output_tmp):
            raise ProcessFailure(2, f"{output}: nothing wrote the output: add a converter element "
                                    f"(for example convert-qemu) that takes {self.env['IMG_IMAGE_TYPE']} "
                                    f"to {self.env['IMG_OUTPUT_TYPE']}")
        if os.path.isdir(output) and not os.path.isdir(self.output_tmp):
            raise ProcessFailure(3, f"{output}: is a directory")
        os.replace(self.output_tmp, output)

    def _unwind(self):
        with _signals_deferred():
            self.cleanup_failures += self.journal.unwind(log=self._warn)

    def _warn(self, message):
        self.monitor.event("warning", message=message)

    # -- dry run -------------------------------------------------------------------------
    def _list(self):
        out = sys.stdout
        out.write(f"elements: {' '.join(e.name + ' (' + e.path + ')' for e in self.elements)}\n")
        for phase in PHASES:
            if phase.name not in self.phases or not self.hooks[phase.name]:
                continue
            out.write(f"{phase.name}.d ({phase.where}):\n")
            for hook in self.hooks[phase.name]:
                if phase.kind == "chain":
                    answer = "planned below" if self._chain_target(phase) else "nothing to do"
                elif "platform" in phase.context and self.env.get("IMG_PLATFORM") == "auto" \
                        and hook.header.get("accepts-platform"):
                    answer = "when the platform found at mount time is " + hook.header["accepts-platform"]
                else:
                    ok, reason = hooks.accepts(hook, self._context(phase), self._hook_env(hook))
                    answer = "yes" if ok else f"no: {reason}"
                    if phase.name == "mount" and not ok:
                        answer += " (unless an earlier mounter changes the disk type)"
                optional = " [optional]" if hook.optional else ""
                out.write(f"  {hook.name:<28} {hook.element:<24} accepts: {answer}{optional}\n")
            if phase.kind == "chain" and self._chain_target(phase):
                source, target = self._chain_target(phase)
                try:
                    chain = self._plan(phase, self.hooks[phase.name], source, target)
                    plan = " -> ".join([source] + [f"[{h.name}] {d}" for h, _, d in chain])
                except ProcessFailure as exc:
                    plan = f"impossible: {exc}"
                out.write(f"  plan: {plan}\n")


def _mounts_under(path):
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4].replace("\\040", " ") for line in f]
    return [p for p in points if p == real or p.startswith(real + "/")]


def remove_work_dir(work, warn, keep_logs=False):
    """Remove a work dir we created, unless something is still mounted in it;
    with keep_logs, all but a non-empty logs/ (for a failed process)."""
    busy = _mounts_under(work)
    if busy:
        warn(f"{work}: not removed, still mounted: {', '.join(busy)}")
        return
    logs = os.path.join(work, "logs")
    if keep_logs and os.path.isdir(logs) and os.listdir(logs):
        for name in os.listdir(work):
            path = os.path.join(work, name)
            if name == "logs":
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
        warn(f"logs kept in {logs}")
        return
    shutil.rmtree(work, ignore_errors=True)


def cleanup_work_dir(work, warn):
    """--cleanup: unwind what a killed process left; returns (exit code, error)."""
    journal_path = os.path.join(work, "journal.jsonl")
    if not os.path.isfile(journal_path):
        return 2, f"{work}: no cleanup journal here (not a work directory?)"
    with open(os.path.join(work, "lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 2, f"{work}: a running euca-image-process still uses it"
        with _signals_deferred():
            failures = Journal(journal_path).unwind(log=warn)
    if failures:
        return 5, "; ".join(failures)
    if os.path.exists(os.path.join(work, ".created-by-euca-image-process")):
        remove_work_dir(work, warn)
    return 0, None


def _stop(process):
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _become_subreaper():
    import ctypes
    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _free(path):
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _usage(path):
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
    return total


@contextlib.contextmanager
def _signals_raise():
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_deferred():
    """While releasing resources, a second Ctrl-C or SIGTERM must not stop us halfway."""
    received = []
    handler = lambda signum, frame: received.append(signum)
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
