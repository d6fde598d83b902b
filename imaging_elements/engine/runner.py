"""The image process: walk the phases, run the hooks, own every resource.

Read this file top to bottom: `Process.run` is the whole story.  Resources
are recorded in the cleanup journal (sdk/journal.py) and unwound by one ExitStack,
newest first, whatever happens.  Hooks talk back through one channel (JSON
lines on $IMG_STATUS_FD, see docs/hooks.md).
"""

import contextlib
import json
import os
import sys
import time

# Not imported here, to keep a process's start-up short (docs/packaging.md):
# sandbox (_sandbox(): ctypes) and traceback (an internal error).
from imaging_elements.engine import (chain, config, elements, hookrun, hooks, imagetype, interrupts,
                                     phase_handlers, phases, workdir)
from imaging_elements.engine.hookrun import MAX_MESSAGE, VAR_NAME
from imaging_elements.engine.interrupts import Cancelled, Terminated
from imaging_elements.engine.monitor import clean
from imaging_elements.engine.resources import BIN, LIB
from imaging_elements.engine.resources import PYTHONPATH as ROOT
from imaging_elements.sdk.journal import SYSTEM_PATH

MiB = 1024 * 1024
PLATFORMS = ("auto", "linux", "windows", "unknown")

# State the runner owns or acts on (paths, types, the journal, ...): a hook
# may not set it, except what a phase's `settable` names (phases.py).  Hooks that run inside
# the image (chroot, instance) may set nothing at all.
RUNNER_STATE = frozenset("IMG_" + name for name in elements.RUNNER_VARIABLES) | {
    "IMG_SIZE", "IMG_KERNEL", "IMG_RAMDISK", "IMG_INSPECTION_REPORT"}
# What -e (a request's options and environment) may not set: the runner's own
# state has options of its own, or is not the operator's to give.
NOT_OPTIONS = RUNNER_STATE - {"IMG_INSPECTION_REPORT", "IMG_SIZE", "IMG_KERNEL", "IMG_RAMDISK"}

PHASES, PHASE_NAMES, CONTEXT_VARS = phases.PHASES, phases.PHASE_NAMES, phases.CONTEXT_VARS


def _sandbox():
    """The sandbox module (it loads ctypes), imported when a phase inside the image first needs it."""
    from imaging_elements.engine import sandbox
    return sandbox


class ProcessFailure(Exception):
    def __init__(self, code, message):
        super().__init__(message)
        self.code = code


class _NoMonitor:
    def event(self, name, **fields):
        pass


# -- one hook, as a process runs it: the pieces Process uses, and run_hook() --------
def work_state(work, scratch, mount_point, journal):
    """The runner's own IMG_* variables for a work directory (workdir.fill() made
    `scratch` and `mount_point`) and its journal."""
    return {"IMG_WORK_DIR": work, "IMG_SCRATCH_DIR": scratch, "IMG_MOUNT_POINT": mount_point,
            "IMG_JOURNAL": journal.path, "IMG_LIB": LIB, "IMG_PYTHON": sys.executable}


def base_environment(state):
    """The clean environment a host hook starts from, with the IMG_* `state`."""
    path = os.pathsep.join([os.path.dirname(sys.executable), BIN, SYSTEM_PATH])
    return {"PATH": path, "LANG": "C.UTF-8", "HOME": "/root", "PYTHONPATH": ROOT,
            "TMPDIR": state.get("IMG_SCRATCH_DIR", "/tmp"), **state}


def hook_environment(hook, state, extra=None):
    """The environment of `hook` (a hooks.Hook) on the host: base_environment(state),
    which hook it is, then `extra` (a chain step's source, target and output)."""
    env = base_environment(state)
    env.update(IMG_PHASE=hook.phase, IMG_HOOK=hook.name, IMG_ELEMENT=hook.element,
               IMG_ELEMENT_DIR=os.path.dirname(os.path.dirname(hook.path)),
               IMG_JOURNAL_SCOPE=hook.phase)
    env.update(extra or {})
    return env


def hook_channel(phase, hook, state, monitor, warn, protected=RUNNER_STATE):
    """The checker of what `hook` says; a host hook of `phase` may set the variables of
    `state` that are not `protected`, and those its phase's `settable` names."""
    settable = phase.settable
    return hookrun.Channel(monitor, warn, phase.name, hook, state,
                           lambda name, value: hookrun.may_set(name, value, settable, protected),
                           inside=phase.where != "host")


def phase_context(phase, state):
    """What `accepts-*` headers of `phase` are judged on: {"disk-type": ..., ...} from `state`."""
    return {key: state.get(CONTEXT_VARS[key], "") for key in phase.context}


def redact(text, state):
    """`text` with the values of the secret variables of `state` hidden."""
    for name, value in state.items():
        if value and len(value) >= 4 and config.is_secret_name(name):
            text = text.replace(value, "***")
    return text


def run_hook(hook, state, journal, monitor=None, extra=None, timeout=None, cancel=None):
    """Run one host hook (`run` verb) as a process runs it, outside a process (tests, tools):
    the environment hook_environment() builds from `state`, its status lines checked
    as a process checks them (a `set` line changes `state` within what the hook's phase
    allows), its process group in `journal` while it runs, stopped after `timeout`
    (default: its phase's) or when `cancel` is set.  Its output lines, progress and
    warnings are `monitor` events (log, progress, warning), secrets redacted.
    Returns (exit code, its last output lines, the hookrun.Channel: describe,
    warnings_said, fail, bad_input).  Raises hookrun.HookStartError, hookrun.TimedOut."""
    phase = phases.BY_NAME[hook.phase]
    if phase.where != "host":
        raise ValueError(f"{hook.phase}/{hook.name} runs inside the image: run it through a process")
    monitor = monitor or _NoMonitor()
    channel = hook_channel(phase, hook, state, monitor,
                           lambda message: monitor.event("warning", message=message))
    code, tail = hookrun.run(hook.argv("run"), hook_environment(hook, state, extra), channel,
                             timeout or phase.timeout, lambda: interrupts.check(cancel),
                             lambda text: redact(text, state), journal)
    return code, tail, channel


class Process:
    """One image process.  `request` is an api.ProcessRequest (read, never
    changed); `cancel` anything with is_set().  only_hook and list_out are the
    command line's --hook and --list (a stream to print the plan to)."""

    def __init__(self, request, monitor=None, cancel=None, only_hook=None, list_out=None):
        self.request = request
        self.monitor = monitor or _NoMonitor()
        self.cancel = cancel
        self.only_hook = only_hook
        self.list_out = list_out
        self.env = {}          # the IMG_* state that hooks see and may change
        self.results = []      # validator results, for the summary
        self.phase_durations = {}
        self.failed = False
        self.journal = None
        self.work = None
        self.output_tmp = None
        self.published = None  # the output path, once renamed into place
        self.inspection_report = None
        self.disk_type = None  # the input's type, or the unbundled image's
        self.cleanup_failures = []
        self.scratch_limited = False
        self.cancel_ignored = False
        self.working_copy = None
        self.operator_names = set()  # variables the request set: no hook may change them
        self.option_values = {}      # declared element options with their defaults
        self.breaks = {b.strip() for b in request.breaks or () if b.strip()}

    # -- the whole story -------------------------------------------------------
    def run(self):
        """Returns (exit code, error message or None); the last event is process-end."""
        started = time.monotonic()
        code, error = 1, "internal error"
        try:
            with interrupts.main_running():
                code, error = self._run()
        except Cancelled as cancelled:  # while the work dir was being removed
            code, error = cancelled.code, str(cancelled)
        except KeyboardInterrupt:
            code, error = 130, "interrupted"
        except Terminated:
            code, error = 143, "terminated by SIGTERM"
        except Exception as exc:  # noqa: BLE001 (a bug: still end the stream, still return a result)
            import traceback
            self.monitor.event("log", level="ERROR", message=traceback.format_exc())
            code, error = 1, f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if self.results:
                summary = {r: sum(1 for x in self.results if x["result"] == r)
                           for r in ("ok", "skipped", "warning", "failed")}
                self.monitor.event("log", level="INFO",
                                   message="validators: {ok} passed, {warning} warnings, {failed} failed, "
                                           "{skipped} not applicable".format(**summary))
            self.monitor.event("process-end", result="ok" if code == 0 else "failed", exit_code=code,
                               error=error, duration=round(time.monotonic() - started, 3))
        return code, error

    def _run(self):
        code, error = 0, None
        with contextlib.ExitStack() as stack:
            try:
                self._check_request()
                self._prepare(stack)  # ties the journal's unwinding to `stack` at once
                if self.list_out:
                    self._list()
                else:
                    for phase in PHASES[:-1]:
                        self._phase(phase)
                    self._publish_output()
            except ProcessFailure as failure:
                code, error = failure.code, str(failure)
            except Cancelled as cancelled:
                code, error = cancelled.code, str(cancelled)
            except KeyboardInterrupt:
                code, error = 130, "interrupted"
            except Terminated:
                code, error = 143, "terminated by SIGTERM"
            self.failed = code != 0
            if code and "after-error" in self.breaks and self.journal:
                self._after_error()
            if self.journal and not self.list_out:
                code, error = self._cleanup_phase(code, error)
            self._find_inspection_report()
        if code == 0 and self.cleanup_failures:
            code, error = 5, "; ".join(self.cleanup_failures)
        return code, error

    def _cancel_point(self):
        """A safe point: stop here if the caller cancelled."""
        if not self.cancel_ignored:
            interrupts.check(self.cancel)

    # -- setup -------------------------------------------------------------------
    def _check_request(self):
        """Every value of the request, checked before anything is done."""
        request = self.request
        if not request.elements:
            raise ProcessFailure(2, "no elements given (see element-info for the list)")
        self.phases = self._selected_phases()
        self.sandbox_limits = None  # the sandbox's defaults
        if request.sandbox_limits:
            try:
                self.sandbox_limits = _sandbox().parse_limits(request.sandbox_limits)
            except ValueError as exc:
                raise ProcessFailure(2, f"--sandbox-limit: {exc}") from exc
        limit = request.scratch_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < MiB):
            raise ProcessFailure(2, f"--scratch-limit: {limit!r} is not a number of bytes of at least 1 MiB")
        timeout = request.hook_timeout
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or not timeout > 0):
            raise ProcessFailure(2, f"--hook-timeout: {timeout!r} is not a positive number of seconds")
        for option, value, allowed in (("-t/--input-type", request.input_type, imagetype.TYPES),
                                       ("-T/--output-type", request.output_type, imagetype.TYPES),
                                       ("--platform", request.platform, PLATFORMS)):
            if value is not None and value not in allowed:
                raise ProcessFailure(2, f"{option}: {value!r} is not one of {', '.join(allowed)}")
        for option, mapping in (("-e", request.options), ("environment", request.environment)):
            for name, value in (mapping or {}).items():
                if not isinstance(name, str) or not isinstance(value, str) or not VAR_NAME.match(name):
                    raise ProcessFailure(2, f"{option} {name!r}: use NAME=VALUE, NAME of letters, "
                                            "digits and _")
                full = name if name.startswith("IMG_") else "IMG_" + name
                if full in NOT_OPTIONS:
                    raise ProcessFailure(2, f"{option} {name}: {full} is the runner's own variable, "
                                            "not an element option (see euca-image-process --help)")

    def _selected_phases(self):
        chosen = set(PHASE_NAMES)
        for option, names in (("--phases", self.request.phases), ("--skip-phases", self.request.skip_phases)):
            if names is None or (option == "--skip-phases" and not names):
                continue
            listed = {n.strip().removesuffix(".d") for n in names if n.strip()}
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
        request = self.request
        warn = self._warn
        try:
            # elements_path None: the stock elements only (never the environment: library code).
            library = elements.find_elements(":".join(request.elements_path or ()), warn=warn)
            self.elements = elements.resolve(list(request.elements), library)
        except (elements.ElementError, OSError) as exc:
            raise ProcessFailure(2, str(exc)) from exc
        self._check_options()
        self.hooks, problems = {}, []
        try:
            for phase in PHASES:
                self.hooks[phase.name], found = hooks.collect(phase.name, self.elements)
                problems += found
        except hooks.HookError as exc:
            raise ProcessFailure(2, str(exc)) from exc
        for problem in problems:
            warn(problem)
        if self.only_hook:
            self._restrict_to_hook(self.only_hook)
        self.monitor.event("process-start", elements=[e.name for e in self.elements],
                           input=request.input, output=request.output)

        self._prepare_work_dir(stack)
        self._refuse_overwriting_inputs()
        self._prepare_image()
        self._prepare_output()
        self.env.update(self._element_options())
        self.env.update(self._source_environment_d())

    def _check_options(self):
        """Declared element options: every unknown option and bad value refused before any hook."""
        try:
            self.option_values = elements.check_options(self.elements, dict(self.request.options or {}))
        except elements.ElementError as exc:
            raise ProcessFailure(2, str(exc)) from exc

    def _restrict_to_hook(self, spec):
        phase, _, name = spec.partition("/")
        phase = phase.removesuffix(".d")
        if phase not in self.hooks or not any(h.name == name for h in self.hooks[phase]):
            raise ProcessFailure(2, f"--hook {spec}: no hook {name} in phase {phase}")
        self.hooks[phase] = [h for h in self.hooks[phase] if h.name == name]

    def _prepare_work_dir(self, stack):
        request = self.request
        try:
            self.work = work = workdir.open_work_dir(
                stack, request.work_dir, self._warn, remove=not request.keep_work_dir,
                failed=lambda: self.failed, tmpdir=os.environ.get("TMPDIR", "/var/tmp"))
            self.journal = workdir.journal_of(work)
            stack.callback(self._unwind)
            scratch, mount_point = workdir.fill(work, self.journal)
            if request.scratch_limit and not self.list_out:
                workdir.limit_scratch(work, scratch, request.scratch_limit, self.journal, self._cancel_point)
                self.scratch_limited = True
        except workdir.WorkDirError as exc:
            raise ProcessFailure(exc.code, str(exc)) from exc
        self.env.update(work_state(work, scratch, mount_point, self.journal),
                        IMG_ELEMENTS=" ".join(e.name for e in self.elements),
                        IMG_PLATFORM=request.platform or "auto",
                        IMG_MOUNT_WRITABLE="1" if self._mount_writable() else "0")

    def _mount_writable(self):
        """A phase that changes the image (install) will run hooks: mount it writable."""
        return any(p.writable_mount and self.hooks[p.name] and p.name in self.phases for p in PHASES)

    def _refuse_overwriting_inputs(self):
        """The output must not be (through links too) a file the process reads, nor in the work dir."""
        request = self.request
        if not request.output:
            return
        output = os.path.abspath(request.output)
        real = os.path.realpath(output)
        work = os.path.realpath(self.work)
        if real == work or real.startswith(work + os.sep):
            raise ProcessFailure(2, f"{output}: the output may not be in the work directory {self.work}")
        try:
            out_stat = os.stat(output)
        except OSError:
            return  # not there yet: it cannot be one of the inputs
        for option, path in (("-i/--input", request.input), ("--kernel", request.kernel),
                             ("--ramdisk", request.ramdisk)):
            with contextlib.suppress(OSError):
                st = os.stat(path) if path else None
                if st and (st.st_dev, st.st_ino) == (out_stat.st_dev, out_stat.st_ino):
                    raise ProcessFailure(2, f"{output}: is the same file as {option} {path}; "
                                            "the output would replace it: write it elsewhere")

    def _prepare_image(self):
        request = self.request
        if not request.input:
            if request.output:
                raise ProcessFailure(2, "-o/--output needs -i/--input")
            return
        path = os.path.abspath(request.input)
        if not os.path.isfile(path):
            raise ProcessFailure(3, f"{path}: no such file" if not os.path.exists(path)
                                 else f"{path}: not a regular file")
        try:
            image_type = imagetype.resolve(path, request.input_type)
        except imagetype.ImageTypeError as exc:
            raise ProcessFailure(3, str(exc)) from exc
        except OSError as exc:
            raise ProcessFailure(3, f"{path}: cannot read: {exc.strerror}") from exc
        self.disk_type = image_type
        self.env.update(IMG_INPUT=path, IMG_INPUT_TYPE=image_type, IMG_IMAGE=path,
                        IMG_IMAGE_TYPE=image_type, IMG_IMAGE_CRYPT="none", IMG_DISK_TYPE=image_type)
        if self.env["IMG_MOUNT_WRITABLE"] == "1" and not self.list_out:
            self._working_copy(path)

    def _working_copy(self, path):
        """install.d hooks change the image: they get a copy, never the user's file."""
        copy = os.path.join(self.env["IMG_SCRATCH_DIR"], "working-copy." + self.env["IMG_IMAGE_TYPE"])
        need, have = os.stat(path).st_blocks * 512, chain.free(self.env["IMG_SCRATCH_DIR"])
        if need > have:
            raise ProcessFailure(4, f"{path}: a working copy needs {need} bytes in "
                                    f"{self.env['IMG_SCRATCH_DIR']}, {have} bytes free")
        self.journal.add("remove", path=copy)
        code, errors = self._run_tool(["cp", "--sparse=always", "--reflink=auto", path, copy])
        if code:
            raise ProcessFailure(1, f"{path}: cannot make a working copy: {errors.decode(errors='replace').strip()}")
        self.env["IMG_IMAGE"] = self.working_copy = copy

    def _run_tool(self, argv, env=None):
        """Run a short host command, stopping it if the caller cancels; (exit code, stderr)."""
        return hookrun.run_tool(argv, self._cancel_point, env)

    def _prepare_output(self):
        request = self.request
        if not request.output:
            return
        output = os.path.abspath(request.output)
        directory = os.path.dirname(output)
        if not os.path.isdir(directory):
            raise ProcessFailure(3, f"{output}: output directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ProcessFailure(3, f"{output}: output directory {directory} is not writable")
        if os.path.isdir(output) and os.listdir(output):
            raise ProcessFailure(3, f"{output}: exists and is a directory that is not empty")
        output_type = request.output_type or self.env["IMG_IMAGE_TYPE"]
        self.env.update(IMG_OUTPUT=output, IMG_OUTPUT_TYPE=output_type,
                        IMG_OUTPUT_CRYPT=request.output_crypt or "none")
        self.output_tmp = os.path.join(directory, f".{os.path.basename(output)}.partial-{os.getpid()}")
        if not self.list_out:
            self.journal.add("remove", path=self.output_tmp)

    def _element_options(self):
        options = {}
        request = self.request
        for name, value in (("IMG_SIZE", request.size), ("IMG_KERNEL", request.kernel),
                            ("IMG_RAMDISK", request.ramdisk)):
            if value:
                options[name] = os.path.abspath(value) if name != "IMG_SIZE" else str(value)
        options.update(self.option_values)
        for name, value in (request.environment or {}).items():
            options[name if name.startswith("IMG_") else "IMG_" + name] = value
        self.operator_names = set(options)
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
        import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
        result = subprocess.run(["bash", "-c", script], env=self._base_env(), stdin=subprocess.DEVNULL,
                                capture_output=True, check=False)
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
        if phase.release_mount:
            self._release_mount()
        run = {"all": self._run_all, "validate": self._run_validators, "chain": self._run_chain,
               "transform": self._run_transform}[phase.kind]
        hooks_here = self.hooks[phase.name]
        if phase.kind == "chain" and not self._chain_target(phase):
            return  # nothing to convert: its hooks have no work (and no source and target)
        if not hooks_here and phase.kind != "chain":
            return
        self._cancel_point()
        self._break("before-" + phase.name, phase)
        self.monitor.event("phase-start", phase=phase.name, hooks=len(hooks_here))
        started, result = time.monotonic(), "ok"
        try:
            run(phase, hooks_here)
        except BaseException:
            result = "failed"
            raise
        finally:
            duration = round(time.monotonic() - started, 3)
            self.phase_durations[phase.name] = duration
            self.monitor.event("phase-end", phase=phase.name, result=result, duration=duration)
        if phase.sets_disk_type:
            self.disk_type = self.env.get("IMG_IMAGE_TYPE")
        if phase.finds_platform and self.env.get("IMG_PLATFORM") == "auto":
            self.env["IMG_PLATFORM"] = "unknown"
        self._break("after-" + phase.name, phase)

    def _release_mount(self):
        """Conversion reads the image file: first let go of every mount-phase resource."""
        self.cleanup_failures += self.journal.unwind(scope="mount", log=self._warn)
        still = workdir.mounts_under(self.env["IMG_MOUNT_POINT"])
        if still:
            raise ProcessFailure(1, f"could not release the mounted image: {', '.join(still)} still mounted")

    def _context(self, phase):
        return phase_context(phase, self.env)

    def _accepted(self, phase, hook, context=None, env=None):
        context = self._context(phase) if context is None else context
        if phase.where == "host":
            ok, reason = hooks.accepts(hook, context, env or self._hook_env(hook))
        else:  # runs inside the image: only the declared context can be judged from here
            ok, reason = hooks.static_accepts(hook, context, None)
        self.monitor.event("accepts", phase=phase.name, hook=hook.name, accepted=ok,
                           reason=clean(reason[:MAX_MESSAGE]))
        return ok

    def _run_all(self, phase, hooks_here):
        for hook in hooks_here:
            if self._accepted(phase, hook):
                self._run_hook(phase, hook)

    def _run_validators(self, phase, hooks_here):
        accepted = [h for h in hooks_here if self._accepted(phase, h)]
        if phase.handler:
            return self._run_handler(phase, accepted)
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
            self._advance_image(output, hook=hook)

    def _advance_image(self, output, image_type=None, hook=None):
        if not os.path.lexists(output):
            who = f"{hook.phase}/{hook.name} ({hook.element})" if hook else "the hook"
            raise ProcessFailure(1, f"{who} ended without writing its output "
                                    f"({self._user_names(output)}, IMG_CONVERT_OUTPUT)")
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
        return chain.target(phase, self.env)

    def _plan(self, phase, hooks_here, source, target):
        src_key, dst_key = phase.context

        def accepts(hook, s, d):
            env = self._hook_env(hook, {CONTEXT_VARS[src_key]: s, CONTEXT_VARS[dst_key]: d})
            return self._accepted(phase, hook, {src_key: s, dst_key: d}, env)

        try:
            return chain.plan(phase, hooks_here, source, target, accepts, [e.name for e in self.elements])
        except chain.PlanError as exc:
            raise ProcessFailure(2, str(exc)) from exc

    def _run_chain(self, phase, hooks_here):
        source, target = self._chain_target(phase)
        src_key, dst_key = phase.context
        steps_planned = self._plan(phase, hooks_here, source, target)
        last_writer = chain.is_last_writer(phase, PHASES, self.phases, self.env)
        steps = []
        for index, (hook, s, d) in enumerate(steps_planned):
            final = last_writer and index == len(steps_planned) - 1
            output = self.output_tmp if final else os.path.join(
                self.env["IMG_SCRATCH_DIR"], f"{phase.name}-{index}-{hook.name}.{d}")
            extra = {CONTEXT_VARS[src_key]: s, CONTEXT_VARS[dst_key]: d, "IMG_CONVERT_OUTPUT": output}
            steps.append((hook, extra, final))
        self._check_capacity(phase, steps)
        for hook, extra, final in steps:
            if not final:
                self.journal.add("remove", path=extra["IMG_CONVERT_OUTPUT"])
            self._run_hook(phase, hook, extra=extra)
            if phase.chain_target == "crypt":  # the image's encryption changes, not its type
                self.env["IMG_IMAGE_CRYPT"] = extra["IMG_DEST_CRYPT"]
                self._advance_image(extra["IMG_CONVERT_OUTPUT"], image_type=self.env["IMG_IMAGE_TYPE"], hook=hook)
            else:
                self._advance_image(extra["IMG_CONVERT_OUTPUT"], image_type=extra["IMG_DEST_TYPE"], hook=hook)

    def _check_capacity(self, phase, steps):
        """Fail before the first byte is written if the chain cannot fit."""
        scratch_need = output_need = 0
        for hook, extra, final in steps:
            try:
                need = hooks.required_capacity(hook, self._hook_env(hook, extra))
            except hooks.HookError as exc:
                code, said = hookrun.said(str(exc))
                raise ProcessFailure(code, f"{phase.name}/{hook.name} ({hook.element}): cannot tell the space "
                                           f"it needs: {self._user_names(said)}") from exc
            if final:
                output_need += need
            else:
                scratch_need += need
        scratch = self.env["IMG_SCRATCH_DIR"]
        checks = [(scratch_need, scratch, "left of --scratch-limit"
                   if self.scratch_limited else "free in the work directory")]
        if output_need:
            checks.append((output_need, os.path.dirname(self.output_tmp), "free in the output directory"))
        short = chain.short_of_space(checks)
        if short:
            need, where, have, what = short
            raise ProcessFailure(4, f"{phase.name}: not enough space: needs {need} bytes in "
                                    f"{where}, {have} bytes {what}")

    # -- running one hook ------------------------------------------------------------
    def _base_env(self):
        return base_environment(self.env)

    def _hook_env(self, hook, extra=None):
        return hook_environment(hook, self.env, extra)

    def _run_hook(self, phase, hook, extra=None, validator=False):
        self._cancel_point()
        env = self._hook_env(hook, extra)
        self.monitor.event("hook-start", phase=phase.name, hook=hook.name, element=hook.element)
        started = time.monotonic()
        if phase.where == "chroot":
            sandbox = _sandbox()
            try:
                argv = sandbox.hook_argv(self.env["IMG_MOUNT_POINT"], hook, limits=self.sandbox_limits,
                                         writable=self.env.get("IMG_MOUNT_WRITABLE") == "1")
            except sandbox.SandboxError as exc:
                raise ProcessFailure(1, f"{hook.path}: cannot run: {exc}") from exc
            env = sandbox.inside_environment(env, hook.secrets)
        else:
            argv = hook.argv("run")
        report = self._channel(phase, hook)
        try:
            try:
                returncode, tail = hookrun.run(argv, env, report, self._hook_timeout(phase),
                                               self._cancel_point, self._redact, self.journal)
            except hookrun.TimedOut as exc:
                raise ProcessFailure(1, str(exc)) from exc
        except hookrun.HookStartError as exc:
            raise ProcessFailure(1, f"{hook.path}: cannot run: {exc}") from exc
        except BaseException as exc:  # stopped (time limit, cancel, signal): the stream still says so
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="failed", duration=round(time.monotonic() - started, 3),
                               reason=str(exc) or type(exc).__name__)
            raise
        duration = round(time.monotonic() - started, 3)
        description = "; ".join(report.describe)
        if returncode == 0:
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="ok", duration=duration, description=description)
            if validator:
                self.results.append({"hook": hook.name, "result": "ok", "description": description})
            return
        sandboxed = phase.where == "chroot"  # a bound the sandbox saw wins over what the guest says
        exit_text = _sandbox().exit_reason(returncode, self.sandbox_limits) if sandboxed \
            else f"exit {returncode}"
        said = not (sandboxed and returncode in _sandbox().BOUND_EXITS) and report.fail
        reason = self._user_names(said or (exit_text + (": " + " | ".join(tail) if tail else "")))
        full = self._full(phase, hook, reason + " ".join(tail), (extra or {}).get("IMG_CONVERT_OUTPUT"))
        if full:
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="failed", duration=duration, reason=str(full))
            raise full
        if validator and hook.optional:
            self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                               result="warning", duration=duration, reason=reason, optional=True)
            self.results.append({"hook": hook.name, "result": "warning", "reason": reason})
            return
        self.monitor.event("hook-end", phase=phase.name, hook=hook.name, element=hook.element,
                           result="failed", duration=duration, reason=reason)
        if validator:
            self.results.append({"hook": hook.name, "result": "failed", "reason": reason})
        # A hook that said the input is bad (unreadable, damaged): exit 3, as the early checks.
        raise ProcessFailure(3 if report.bad_input else 1,
                             f"{phase.name}/{hook.name} ({hook.element}) failed: {reason}")

    def _user_names(self, text):
        """The user's file names in place of the process's own copies of them."""
        for own, user in ((self.output_tmp, self.env.get("IMG_OUTPUT")),
                          (self.working_copy, self.env.get("IMG_INPUT"))):
            if own and user:
                text = text.replace(own, user)
        return text

    def _full(self, phase, hook, said, target):
        """After a hook failed: was a filesystem it wrote to full?  Then a ProcessFailure saying
        which, and the file it was writing (its IMG_CONVERT_OUTPUT, else the newest in scratch)."""
        where = f"{phase.name}/{hook.name} ({hook.element})"
        enospc = "No space left on device" in said or "ENOSPC" in said
        scratch = self.env["IMG_SCRATCH_DIR"]
        to_output = bool(target) and target == self.output_tmp
        if self.scratch_limited and not to_output and (
                enospc or chain.free(scratch) < max(MiB, self.request.scratch_limit // 100)):
            if not (target and target.startswith(scratch + os.sep)):
                target = workdir.newest_file(scratch)
            writing = f" while writing {os.path.relpath(target, self.work)}" if target else ""
            return ProcessFailure(4, f"{where}: the scratch space is full: --scratch-limit of "
                                     f"{self.request.scratch_limit} bytes reached{writing}")
        if not enospc:
            return None
        if to_output:
            return ProcessFailure(4, f"{where}: {self.env['IMG_OUTPUT']}: no space left on device "
                                     f"(in {os.path.dirname(self.output_tmp)})")
        return ProcessFailure(4, f"{where}: no space left on device in the work directory {self.work}"
                                 + (f" while writing {os.path.relpath(target, self.work)}"
                                    if target and target.startswith(self.work + os.sep) else ""))

    def _hook_timeout(self, phase):
        return self.request.hook_timeout or phase.timeout

    def _redact(self, text):
        """Hide the values of secret variables in anything we log."""
        return redact(text, self.env)

    def _channel(self, phase, hook):
        """The checker of what `hook` says; nor may a hook change what the operator set."""
        return hook_channel(phase, hook, self.env, self.monitor, self._warn, RUNNER_STATE | self.operator_names)

    def _run_handler(self, phase, accepted):
        """A phase whose hooks a registered handler runs (instance-validate boots the image)."""
        if not accepted:
            return
        handler = phase_handlers.get(phase.handler)
        if handler is None:
            raise ProcessFailure(2, f"{phase.name}: no phase handler {phase.handler!r} registered "
                                    "(run processes through imaging_elements.api)")
        # The boot is no hook of its own: a log line, then one hook-end per guest-side hook.
        self.monitor.event("log", level="INFO", message=f"{phase.name}: booting the image to run "
                                                        f"{len(accepted)} validator(s) in it")
        env = self._base_env()

        report = self._channel(phase, accepted[0])  # one for the guest's whole report

        def emit(message):
            if "describe" in message:  # how the guest was booted, and how long it took
                text = self._user_names(clean(str(message["describe"])[:MAX_MESSAGE]))
                self.monitor.event("log", level="INFO", message=f"{phase.name}: {text}")
            else:
                report.message(json.dumps(message))

        try:
            results = handler([(h.name, h.path) for h in accepted], env, self.journal, emit)
        except phase_handlers.HandlerError as exc:
            raise ProcessFailure(1, self._user_names(f"{phase.name}: {exc}")) from exc
        optional = {h.name: h.optional for h in accepted}
        failed = []
        for result in results:
            name = result["hook"]
            outcome = ("skipped" if result.get("skipped") else "ok") if result["ok"] else \
                ("warning" if optional.get(name) else "failed")
            text = clean(str(result.get("description") or result.get("output", "")[-500:])[:MAX_MESSAGE])
            name = clean(str(name)[:200])
            duration = result.get("duration", 0)
            duration = duration if isinstance(duration, (int, float)) and not isinstance(duration, bool) else 0
            self.monitor.event("hook-end", phase=phase.name, hook=name, element="-", result=outcome,
                               duration=duration, description=text)
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
            sandbox = _sandbox()
            env = sandbox.inside_environment(env)
            argv = sandbox.wrap(self.env["IMG_MOUNT_POINT"], argv, interactive=True, limits=self.sandbox_limits,
                                writable=self.env.get("IMG_MOUNT_WRITABLE") == "1")
        self.monitor.event("log", level="INFO",
                           message=f"break point {point}: a shell; exit 0 to go on, exit 1 to stop")
        import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
        if subprocess.run(argv, env=env, check=False).returncode != 0:
            raise ProcessFailure(1, f"stopped at break point {point}")

    def _after_error(self):
        try:
            self._break("after-error")
        except ProcessFailure as failure:
            self._warn(str(failure))
        except (KeyboardInterrupt, Terminated, Cancelled):
            pass

    def _cleanup_phase(self, code, error):
        phase = PHASES[-1]
        # cleanup.d runs after a cancel too, as after SIGTERM (each hook within its time limit).
        self.cancel_ignored = True
        try:
            self._phase(phase)
        except ProcessFailure as failure:
            if code == 0:
                return failure.code, str(failure)
            self._warn(f"cleanup phase: {failure}")
        except (KeyboardInterrupt, Terminated, Cancelled):
            if code == 0:
                return 130, "interrupted during cleanup"
        return code, error

    def _publish_output(self):
        if not self.output_tmp:
            return
        output = self.env["IMG_OUTPUT"]
        if not os.path.lexists(self.output_tmp) and self._image_is_the_output():
            # An image the process made (an unbundled one) that needs no conversion: move it out.
            code, errors = self._run_tool(["mv", "-T", self.env["IMG_IMAGE"], self.output_tmp])
            if code:
                raise ProcessFailure(1, f"{output}: cannot write: {errors.decode(errors='replace').strip()}")
        if not os.path.lexists(self.output_tmp):
            raise ProcessFailure(2, f"{output}: nothing wrote the output: add a converter element "
                                    f"(for example convert-qemu) that takes {self.env['IMG_IMAGE_TYPE']} "
                                    f"to {self.env['IMG_OUTPUT_TYPE']}")
        if os.path.isdir(output) and not os.path.isdir(self.output_tmp):
            raise ProcessFailure(3, f"{output}: is a directory")
        os.replace(self.output_tmp, output)
        self.published = output

    def _image_is_the_output(self):
        """The current image is a file of the process's own, of the output's type and encryption."""
        env = self.env
        image, scratch = os.path.realpath(env.get("IMG_IMAGE", "")), os.path.realpath(env["IMG_SCRATCH_DIR"])
        return (image.startswith(scratch + os.sep) and os.path.isfile(image)
                and env.get("IMG_IMAGE_TYPE") == env.get("IMG_OUTPUT_TYPE")
                and env.get("IMG_IMAGE_CRYPT", "none") == env.get("IMG_OUTPUT_CRYPT", "none"))

    def _find_inspection_report(self):
        """The inspect element's report, if one outlives the process."""
        for path in (self.env.get("IMG_INSPECTION_REPORT"),
                     self.work and self.request.keep_work_dir and os.path.join(self.work, "inspection.json")):
            if path and os.path.isfile(path):
                self.inspection_report = os.path.abspath(path)
                return

    def _unwind(self):
        with interrupts.deferred():
            self.cleanup_failures += self.journal.unwind(log=self._warn)

    def _warn(self, message):
        self.monitor.event("warning", message=message)

    # -- dry run -------------------------------------------------------------------------
    def _list(self):
        out = self.list_out
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
                    if not ok:
                        answer += phase.list_note
                optional = " [optional]" if hook.optional else ""
                out.write(f"  {hook.name:<28} {hook.element:<24} accepts: {answer}{optional}\n")
            if phase.kind == "chain" and self._chain_target(phase):
                source, target = self._chain_target(phase)
                try:
                    steps = self._plan(phase, self.hooks[phase.name], source, target)
                    plan = " -> ".join([source] + [f"[{h.name}] {d}" for h, _, d in steps])
                except ProcessFailure as exc:
                    plan = f"impossible: {exc}"
                out.write(f"  plan: {plan}\n")
