"""Elements: finding them on ELEMENTS_PATH, resolving their dependencies, and
checking the options they declare.

An element is a directory holding any of README.md, element-deps,
element-provides, element-options.json and <phase>.d/ hook directories.
ELEMENTS_PATH is searched like $PATH: the first directory holding an element
of a name wins, and the project's own elements/ comes last.
"""

import functools
import json
import math
import os
import re

from imaging_elements.engine import config
from imaging_elements.engine.resources import ELEMENTS as PROJECT_ELEMENTS

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
NOT_ELEMENTS = {"__pycache__", "tests"}


class ElementError(Exception):
    pass


class Element:
    def __init__(self, name, path):
        self.name = name
        self.path = path
        self.deps = _read_names(os.path.join(path, "element-deps"))
        self.provides = _read_names(os.path.join(path, "element-provides"))

    @property
    def description(self):
        """The first line of README.md, without '#' and without a leading 'name:'."""
        try:
            with open(os.path.join(self.path, "README.md"), errors="replace") as f:
                for line in f:
                    line = line.strip().lstrip("#").strip()
                    if line:
                        return line.removeprefix(self.name + ":").strip()
        except OSError:
            pass
        return ""

    @functools.cached_property
    def options(self):
        """{NAME: Option} declared in element-options.json, read when first asked."""
        return read_options(os.path.join(self.path, OPTIONS_FILE), self.name)

    def hook_dir(self, phase):
        return os.path.join(self.path, phase + ".d")

    def __repr__(self):
        return f"Element({self.name!r}, {self.path!r})"


def _read_names(path):
    """One name a line; blank lines and # comments allowed."""
    try:
        with open(path) as f:
            lines = f.readlines()
    except FileNotFoundError:
        return frozenset()
    names = set()
    for number, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if not NAME.match(name):
            raise ElementError(f"{path}:{number}: {name!r} is not an element name")
        names.add(name)
    return frozenset(names)


def _is_element(path):
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    return any(e in ("README.md", "element-deps", "element-provides", OPTIONS_FILE) or e.endswith(".d")
               for e in entries)


def search_path(elements_path=""):
    """The directories to search, in order: `elements_path` (ELEMENTS_PATH, colon
    separated; the caller reads the environment), then the project's elements/."""
    dirs = [d for d in (elements_path or "").split(":") if d]
    dirs.append(PROJECT_ELEMENTS)
    return dirs


def find_elements(elements_path="", warn=None):
    """{name: Element} for every element on the path; the first of a name wins."""
    found, seen_dirs = {}, set()
    for directory in search_path(elements_path):
        real = os.path.realpath(directory)
        if real in seen_dirs:
            continue
        seen_dirs.add(real)
        try:
            names = sorted(os.listdir(directory))
        except OSError as exc:
            if warn:
                warn(f"ELEMENTS_PATH entry {directory}: {exc.strerror}, ignored")
            continue
        for name in names:
            path = os.path.join(directory, name)
            if name in NOT_ELEMENTS or not NAME.match(name) or not _is_element(path):
                continue
            if name in found:
                if warn:
                    warn(f"element {name}: {found[name].path} overrides {path}")
                continue
            found[name] = Element(name, path)
    return found


def resolve(requested, elements):
    """The elements needed for `requested`, sorted by name.

    The answer does not depend on the order of `requested`: dependencies on
    names that some element provides are set aside until every plain
    dependency is in, so that a provider found late still satisfies them,
    and a provided name never pulls in the real element of that name.
    """
    for name in requested:
        if name not in elements:
            raise ElementError(f"element {name} not found (requested on the command line)")
    providers = {}
    for element in elements.values():
        for name in element.provides:
            providers.setdefault(name, []).append(element.name)

    selected, needed_by = set(), {}
    deferred = set()

    def provided():
        return {p for name in selected for p in elements[name].provides}

    def pull(name):
        queue = [name]
        while queue:
            current = queue.pop()
            if current in selected:
                continue
            selected.add(current)
            for dep in sorted(elements[current].deps):
                if dep in selected or dep in deferred:
                    continue
                needed_by.setdefault(dep, current)
                if dep in providers:
                    deferred.add(dep)  # decide once everything plain is in
                elif dep in elements:
                    queue.append(dep)
                else:
                    raise ElementError(f"element {dep} not found (needed by {needed_by[dep]})")

    for name in sorted(set(requested)):
        pull(name)
    while True:
        have = provided()
        open_names = sorted(d for d in deferred if d not in have and d not in selected)
        if not open_names:
            break
        name = open_names[0]
        if name in elements:
            pull(name)
        elif len(providers[name]) == 1:
            pull(providers[name][0])
        else:
            raise ElementError(f"{name} (needed by {needed_by[name]}) is provided by "
                               f"{', '.join(sorted(providers[name]))}: request one of them")

    _check_conflicts(selected, elements, set(requested), needed_by)
    return [elements[name] for name in sorted(selected)]


def _check_conflicts(selected, elements, requested, needed_by):
    provider_of = {}
    for name in sorted(selected):
        for provided_name in sorted(elements[name].provides):
            if provided_name in provider_of:
                raise ElementError(f"{provided_name} is provided by both {provider_of[provided_name]} "
                                   f"and {name}")
            provider_of[provided_name] = name
    for name in sorted(selected):
        if name in provider_of:
            why = "requested" if name in requested else f"needed by {needed_by.get(name)}"
            raise ElementError(f"element {name} ({why}) is also provided by {provider_of[name]}: "
                               "use one or the other")


# -- declared options ------------------------------------------------------------
# An element declares the options its hooks read in element-options.json (see
# docs/writing-elements.md); the user gives them as -e NAME=VALUE and hooks see
# IMG_NAME.  They are checked before any hook runs.

OPTIONS_FILE = "element-options.json"
OPTION_NAME = r"^[A-Z][A-Z0-9_]*$"  # compiled when first used: most processes read no options
OPTION_TYPES = ("string", "int", "number", "size", "bool", "choice", "path")
OPTION_KEYS = {"type", "description", "default", "choices", "min", "must-exist"}
BOOL_WORDS = {"1": "1", "yes": "1", "true": "1", "on": "1", "0": "0", "no": "0", "false": "0", "off": "0"}

# Variables the runner sets for hooks: never an option (-e MOUNT_POINT=/ would
# point the mounters at the host's root).
RUNNER_VARIABLES = frozenset({
    "INPUT", "INPUT_TYPE", "IMAGE", "IMAGE_TYPE", "IMAGE_CRYPT", "OUTPUT", "OUTPUT_TYPE", "OUTPUT_CRYPT",
    "DISK_TYPE", "DISK", "PLATFORM", "SOURCE_TYPE", "DEST_TYPE", "CONVERT_OUTPUT", "SOURCE_CRYPT",
    "DEST_CRYPT", "MOUNT_POINT", "MOUNT_WRITABLE", "WORK_DIR", "SCRATCH_DIR", "JOURNAL", "JOURNAL_SCOPE",
    "STATUS_FD", "LIB", "PYTHON", "PHASE", "HOOK", "ELEMENT", "ELEMENT_DIR", "ELEMENTS", "VERB",
    "INSTANCE", "INSTANCE_KEY", "HOST_HOSTNAME"})


class OptionError(ElementError):
    """Bad options; `problems` holds one message for each."""

    def __init__(self, problems):
        super().__init__("; ".join(problems))
        self.problems = problems


class Option:
    def __init__(self, name, element, kind, description, default=None, choices=(), minimum=None,
                 must_exist=False):
        self.name, self.element, self.kind, self.description = name, element, kind, description
        self.default, self.choices, self.minimum, self.must_exist = default, tuple(choices), minimum, must_exist

    def check(self, value):
        """The value as hooks will see it; ValueError with the reason when it is bad."""
        value = str(value)
        if "\0" in value:
            raise ValueError("holds a NUL byte, which no environment variable can")
        if self.kind == "bool":
            if value.lower() not in BOOL_WORDS:
                raise ValueError(f"{value!r} is not yes or no")
            return BOOL_WORDS[value.lower()]
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{value!r} is not one of {', '.join(self.choices)}")
            return value
        if self.kind in ("int", "number", "size"):
            parse, what = {"int": (int, "an integer"), "number": (float, "a number"),
                           "size": (config.parse_size, "a size (like 512M, 10G, or bytes)")}[self.kind]
            try:
                number = parse(value)
            except ValueError:
                number = None
            if number is None or not math.isfinite(number):
                raise ValueError(f"{value!r} is not {what}")
            if self.minimum is not None and number < self.minimum:
                raise ValueError(f"{value} is less than {self.minimum}")
            return value
        if self.kind == "path":
            if not value:
                raise ValueError("an empty path")
            if self.must_exist and not os.path.exists(value):
                raise ValueError(f"{value}: no such file")
            # Hooks do not run in the caller's directory.
            return os.path.abspath(value)
        return value

    def same_as(self, other):
        return (self.kind, self.default, self.choices, self.minimum, self.must_exist) == \
            (other.kind, other.default, other.choices, other.minimum, other.must_exist)

    def as_dict(self):
        data = {"name": self.name, "type": self.kind, "description": self.description,
                "default": self.default}
        if self.choices:
            data["choices"] = list(self.choices)
        if self.minimum is not None:
            data["min"] = self.minimum
        if self.must_exist:
            data["must-exist"] = True
        return data

    def __repr__(self):
        return f"Option({self.name!r} of {self.element}, {self.kind})"


# The runner's own settings that reach hooks as options (--size, --kernel,
# --ramdisk, see docs/configuration.md): allowed with any elements.
CORE_OPTIONS = {o.name: o for o in (
    Option("SIZE", "(core)", "size", "size of a disk made from a partition image (--size)"),
    Option("KERNEL", "(core)", "path", "an external kernel for a partition image (--kernel)", must_exist=True),
    Option("RAMDISK", "(core)", "path", "an external ramdisk for a partition image (--ramdisk)",
           must_exist=True),
)}


def read_options(path, element):
    """{NAME: Option} from an element's element-options.json ({} when there is none).

    JSON, not YAML: the runner already has json loaded, and importing yaml
    would add 25-40 ms to every process."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ElementError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise ElementError(f"{path}: must map option names to their declarations")
    options = {}
    for name, spec in data.items():
        where = f"{path}: option {name}"
        if not isinstance(name, str) or not re.match(OPTION_NAME, name) or name.startswith("IMG_"):
            raise ElementError(f"{where}: a name is upper-case letters, digits and _, without IMG_")
        if name in RUNNER_VARIABLES:
            raise ElementError(f"{where}: IMG_{name} is set by the runner, not an option")
        if not isinstance(spec, dict):
            raise ElementError(f"{where}: must be a mapping with type and description")
        unknown = set(spec) - OPTION_KEYS
        if unknown:
            raise ElementError(f"{where}: unknown keys {', '.join(sorted(map(str, unknown)))}; "
                               f"keys are {', '.join(sorted(OPTION_KEYS))}")
        kind = spec.get("type")
        if kind not in OPTION_TYPES:
            raise ElementError(f"{where}: type {kind!r} is not one of {', '.join(OPTION_TYPES)}")
        if not isinstance(spec.get("description"), str) or not spec["description"].strip():
            raise ElementError(f"{where}: needs a description")
        choices = spec.get("choices", [])
        if (kind == "choice") != bool(choices) or not isinstance(choices, list):
            raise ElementError(f"{where}: choices (a list) go with type choice, and only with it")
        minimum = spec.get("min")
        if minimum is not None and (kind not in ("int", "number", "size")
                                    or not isinstance(minimum, (int, float)) or isinstance(minimum, bool)):
            raise ElementError(f"{where}: min is a number, for int, number and size options")
        option = Option(name, element, kind, spec["description"].strip(), choices=map(str, choices),
                        minimum=minimum, must_exist=bool(spec.get("must-exist")))
        if spec.get("default") is not None:
            default = spec["default"]
            if isinstance(default, bool):
                default = "yes" if default else "no"
            try:
                option.default = option.check(str(default)) if kind != "path" else str(default)
            except ValueError as exc:
                raise ElementError(f"{where}: default {exc}") from None
        options[name] = option
    return options


def declared_options(selected):
    """{NAME: Option} over the selected elements and the core options.

    Two elements may declare one option only alike (type, default, choices)."""
    options = dict(CORE_OPTIONS)
    for element in selected:
        for name, option in element.options.items():
            other = options.get(name)
            if other is not None and not option.same_as(other):
                raise OptionError([f"option {name} is declared differently by {other.element} "
                                   f"and {element.name}"])
            options.setdefault(name, option)
    return options


def check_options(selected, given):
    """Check the options given (-e NAME=VALUE: {NAME or IMG_NAME: value}) against
    what the selected elements declare, before any hook runs.

    Returns {IMG_NAME: value} for the hooks: each declared default, then the
    given values (booleans as 1/0, paths absolute).  Raises OptionError naming
    every unknown option and bad value, with the element that declares it.
    """
    declared = declared_options(selected)
    values = {f"IMG_{name}": option.default for name, option in declared.items() if option.default is not None}
    problems = []
    for key, value in given.items():
        name = key.removeprefix("IMG_")
        option = declared.get(name)
        if name in RUNNER_VARIABLES:
            problems.append(f"option {name}: IMG_{name} is set by the runner, not an option")
        elif option is None:
            import difflib  # only for this message: not part of every process's start-up
            close = difflib.get_close_matches(name, declared, n=1)
            problems.append(f"unknown option {name}: not declared by any of the elements "
                            f"({', '.join(e.name for e in selected) or 'none'})"
                            + (f"; did you mean {close[0]}?" if close else ""))
        else:
            try:
                values[f"IMG_{name}"] = option.check(value)
            except ValueError as exc:
                problems.append(f"option {name} of element {option.element}: {exc}")
    if problems:
        raise OptionError(problems)
    return values
