"""One hook run as euca-image-process runs it, for the tests of one hook or one phase.

The engine's own path, no copy of it: runner.run_hook for `run` (the hook
environment the runner builds from a state, its status channel checked as a
process checks it, its process group journaled, the phase's time limit),
hooks.accepts and hooks.required_capacity for the other verbs.  The state
starts as a process's does: runner.work_state of a work directory that
workdir.fill made.
"""

import os

from imaging_elements.engine import hooks, phases, runner, workdir
from imaging_elements.sdk.journal import Journal


class Events:
    """A monitor that keeps every event."""

    def __init__(self):
        self.events = []

    def event(self, name, **fields):
        self.events.append((name, fields))

    def named(self, name):
        return [fields for event, fields in self.events if event == name]


class Ran:
    """What one hook did.  code: its exit code; said: {describe, warn, fail, bad-input,
    progress: [texts or {done, total}]} as the runner took them from its status channel;
    output: its output lines (stdout and stderr); warnings: the runner's warnings about
    what it said; failure: the reason the runner gives when it failed."""

    def __init__(self, code, tail, channel, events):
        self.code = code
        fail = [channel.fail] if channel.fail is not None else []
        self.said = {"describe": list(channel.describe), "warn": list(channel.warnings_said), "fail": fail,
                     "bad-input": fail if channel.bad_input else [],
                     "progress": [{"done": e["done"], "total": e["total"]} for e in events.named("progress")]}
        prefix = f"{channel.hook.name}: "
        self.output = [e["message"].removeprefix(prefix) for e in events.named("log")]
        self.warnings = [e["message"] for e in events.named("warning")]
        self.failure = None if code == 0 else channel.fail or f"exit {code}" + (
            ": " + " | ".join(tail) if tail else "")

    @property
    def text(self):
        return "\n".join(self.output)


def hook(path, phase=None):
    """The hooks.Hook of the file at `path` (ELEMENT/PHASE.d/NAME), in `phase` (default PHASE)."""
    phase = phase or os.path.basename(os.path.dirname(path)).removesuffix(".d")
    return hooks.Hook(phase, os.path.basename(path), path, os.path.basename(os.path.dirname(os.path.dirname(path))))


def state(work, **values):
    """A process's own state for the work directory `work` (made, as a process makes it,
    with its journal, scratch space and mount point), then `values` (strings)."""
    os.makedirs(work, exist_ok=True)
    journal = workdir.journal_of(work)
    scratch, mount_point = workdir.fill(work, journal)
    return dict(runner.work_state(work, scratch, mount_point, journal), **{k: str(v) for k, v in values.items()})


def run(the_hook, state, timeout=None):
    """Run `the_hook` (a hooks.Hook) with `state` (changed by its `set` lines) as a process
    runs it; a Ran.  Its resources stay in the journal at state["IMG_JOURNAL"]."""
    events = Events()
    journal = Journal(state["IMG_JOURNAL"])
    code, tail, channel = runner.run_hook(the_hook, state, journal, monitor=events, timeout=timeout)
    return Ran(code, tail, channel, events)


def accepts(the_hook, state):
    """(accepted, reason) as the runner asks a host hook: its header, then `HOOK accepts`."""
    phase = phases.BY_NAME[the_hook.phase]
    return hooks.accepts(the_hook, runner.phase_context(phase, state), runner.hook_environment(the_hook, state))


def required_capacity(the_hook, state):
    """Bytes the hook says it will write, as the runner asks it (raises hooks.HookError)."""
    return hooks.required_capacity(the_hook, runner.hook_environment(the_hook, state))


class Completed:
    """A hook's run in the terms of a subprocess.CompletedProcess (returncode, stdout,
    stderr: its output), and `status`: what it said as the runner took it, [{kind: value}],
    a `set` for each variable it changed, its failure last."""

    def __init__(self, returncode, stdout, stderr, status):
        self.returncode, self.stdout, self.stderr, self.status = returncode, stdout, stderr, status


def completed(the_hook, state, verb="run"):
    """`HOOK verb` (run or accepts) asked as the runner asks it; a Completed."""
    if verb == "accepts":
        ok, reason = accepts(the_hook, state)
        return Completed(0 if ok else 1, reason, "", [])
    before = dict(state)
    ran = run(the_hook, state)
    said = ran.said
    status = ([{"describe": text} for text in said["describe"]] + [{"warn": text} for text in said["warn"]]
              + [{"progress": p} for p in said["progress"]]
              + [{"set": {name: value}} for name, value in state.items() if before.get(name) != value]
              + [{"fail": text} for text in said["fail"]])
    return Completed(ran.code, "", ran.text, status)
