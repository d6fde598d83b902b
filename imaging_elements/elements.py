"""Elements: finding them on ELEMENTS_PATH and resolving their dependencies.

An element is a directory holding any of README.md, element-deps,
element-provides and <phase>.d/ hook directories.  ELEMENTS_PATH is searched
like $PATH: the first directory holding an element of a name wins, and the
project's own elements/ comes last.
"""

import os
import re

from imaging_elements.resources import ELEMENTS as PROJECT_ELEMENTS

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
    return any(e in ("README.md", "element-deps", "element-provides") or e.endswith(".d")
               for e in entries)


def search_path(elements_path=None):
    """The directories to search, in order: ELEMENTS_PATH, then the project's elements/."""
    if elements_path is None:
        elements_path = os.environ.get("ELEMENTS_PATH", "")
    dirs = [d for d in elements_path.split(":") if d]
    dirs.append(PROJECT_ELEMENTS)
    return dirs


def find_elements(elements_path=None, warn=None):
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
