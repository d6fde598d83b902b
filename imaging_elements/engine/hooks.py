"""Hooks: collecting a phase's hooks, their declared headers, and `accepts`.

See docs/hooks.md for the contract.  Reading a header never runs the hook;
only a hook that declares `#@ verbs: accepts` is started to answer.
"""

import os
import re
import sys

HOOK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
CONTEXT_KEYS = ("disk-type", "platform", "source-type", "dest-type", "source-crypt", "dest-crypt")
HEADER_KEYS = {"description", "requires", "optional", "verbs", "needs-secret"} | {"accepts-" + k for k in CONTEXT_KEYS}
VERBS = {"accepts", "required-capacity"}
HEADER_LINES = 40
ACCEPTS_TIMEOUT = 10


class HookError(Exception):
    pass


def sort_key(name):
    """Numeric prefix first (as a number), then the name bytewise."""
    match = re.match(r"\d+", name)
    return (int(match.group()) if match else float("inf"), name.encode())


class Hook:
    def __init__(self, phase, name, path, element):
        self.phase = phase
        self.name = name
        self.path = path
        self.element = element
        self.header, self.python = parse_header(path)

    @property
    def description(self):
        return self.header.get("description", "")

    @property
    def optional(self):
        return self.header.get("optional", "no").lower() in ("yes", "true", "1")

    @property
    def verbs(self):
        return set(self.header.get("verbs", "").split())

    @property
    def secrets(self):
        """The secret variables this hook declares it needs inside the image (`needs-secret`),
        named as `-e` names them: IMG_ is added when missing."""
        return {n if n.startswith("IMG_") else "IMG_" + n for n in self.header.get("needs-secret", "").split()}

    def argv(self, verb="run"):
        # Python hooks run under the runner's own interpreter, so they see
        # the same packages (imaging_elements, cryptography, ...).
        return [sys.executable, self.path, verb] if self.python else [self.path, verb]

    def __repr__(self):
        return f"Hook({self.phase}/{self.name} from {self.element})"


def parse_header(path):
    """The `#@ key: value` lines of a hook, checked; and whether it is Python."""
    header = {}
    try:
        with open(path, "rb") as f:
            head = f.read(8192).decode(errors="replace").splitlines()[:HEADER_LINES]
    except OSError as exc:
        raise HookError(f"{path}: cannot read: {exc.strerror}") from exc
    python = bool(head) and head[0].startswith("#!") and "python" in head[0]
    for number, line in enumerate(head, 1):
        if not line.startswith("#@"):
            continue
        key, sep, value = line[2:].partition(":")
        key = key.strip()
        if not sep or key not in HEADER_KEYS:
            raise HookError(f"{path}:{number}: unknown header {line.strip()!r}; "
                            f"keys are {', '.join(sorted(HEADER_KEYS))}")
        header[key] = value.strip()
    unknown = set(header.get("verbs", "").split()) - VERBS
    if unknown:
        raise HookError(f"{path}: unknown verbs {', '.join(sorted(unknown))}")
    return header, python


def collect(phase, elements):
    """(hooks in run order, problems) for `phase` (e.g. "mount") over `elements`.

    Problems are files in a hook directory that will not run; the caller
    reports them.  Two elements with one hook name is an error.
    """
    hooks, problems, owner = [], [], {}
    for element in elements:
        directory = element.hook_dir(phase)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            path = os.path.join(directory, name)
            if not HOOK_NAME.match(name) or name.endswith("~"):
                problems.append(f"{path}: not run: a hook name is letters, digits, '_', '.' and '-'")
                continue
            if os.path.isdir(path):
                problems.append(f"{path}: not run: a directory")
                continue
            if not os.access(path, os.X_OK):
                problems.append(f"{path}: not run: not executable (chmod +x to run it)")
                continue
            if name in owner:
                raise HookError(f"{phase}.d hook {name} is in two elements: {owner[name]} and {path}")
            owner[name] = path
            hooks.append(Hook(phase, name, path, element.name))
    hooks.sort(key=lambda hook: sort_key(hook.name))
    return hooks, problems


def static_accepts(hook, context, path_env):
    """(accepted, reason) from the header alone; path_env None skips `requires`
    (for hooks that run inside the image, whose tools the host need not have)."""
    for key, value in context.items():
        allowed = hook.header.get("accepts-" + key)
        if allowed is None or "*" in allowed.split():
            continue
        if value not in allowed.split():
            return False, f"{key} {value or '(unknown)'} is not one of: {allowed}"
    for command in hook.header.get("requires", "").split() if path_env is not None else ():
        import shutil  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
        if not shutil.which(command, path=path_env):
            return False, f"needs {command}, not found on PATH"
    return True, ""


def accepts(hook, context, env):
    """(accepted, reason); never raises: a failing hook declines."""
    ok, reason = static_accepts(hook, context, env.get("PATH"))
    if not ok or "accepts" not in hook.verbs:
        return ok, reason
    import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    try:
        result = subprocess.run(hook.argv("accepts"), env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                timeout=ACCEPTS_TIMEOUT)
    except subprocess.TimeoutExpired:
        return False, f"accepts did not answer within {ACCEPTS_TIMEOUT} s"
    except OSError as exc:
        return False, f"accepts could not run: {exc}"
    if result.returncode == 0:
        return True, ""
    first = (result.stdout.strip() or result.stderr.strip() or "declined").splitlines()[0]
    if result.returncode == 1:
        return False, first
    return False, f"accepts failed (exit {result.returncode}): {first}"


def required_capacity(hook, env):
    """Bytes the hook says it will write; 0 for a hook that does not say."""
    if "required-capacity" not in hook.verbs:
        return 0
    import subprocess  # here: not at import, for the start-up of a 1-hook process (docs/packaging.md)
    result = subprocess.run(hook.argv("required-capacity"), env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if result.returncode:
            raise ValueError(result.stderr.strip() or f"exit {result.returncode}")
        return int(result.stdout.split()[0])
    except (ValueError, IndexError) as exc:
        raise HookError(f"{hook.path}: required-capacity failed: {exc or 'no number printed'}") from exc
