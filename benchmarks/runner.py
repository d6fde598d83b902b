#!/usr/bin/env python3
"""Benchmark the foundation against diskimage-builder, side by side in one run:
a process running N trivial hooks, element-info, and the dependency resolver.

diskimage-builder (DIB_VERSION in compare.py) is installed from PyPI into a
virtualenv under the benchmark cache, once.  Ours is measured as a user runs
it: the wheel of this checkout built and installed into a virtualenv under the
cache (no editable-install finder, bytecode compiled at install), and, for
the 1-hook process, from the checkout (bin/ with this interpreter).

  hooks      `euca-image-process -q ELEMENT` whose ELEMENT has N mount.d hooks
             (#!/bin/bash, true) against `dib-run-parts DIR` over the same
             N hooks, start to exit, for N = 1, 10, 50: wall time, and CPU time
             (user + system, with the children waited for);
  element-info  `element-info --expand-dependencies` against dib's
             element-info.py, on the same elements (the stock ones, and a
             `bench-os` that provides operating-system, which dib insists on);
  resolver   a 2000-element chain, ours and dib's resolver in this one
             interpreter: in memory (element objects made directly) and on
             disk (found on the path, read, then resolved).

    .venv/bin/python benchmarks/runner.py [--runs N]
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.compare import (CACHE, alternate, dib_site, dib_venv, load, process, report,  # noqa: E402
                                report_process, timed)
from imaging_elements.engine import elements  # noqa: E402

CHAIN = 2000
HOOK_COUNTS = (1, 10, 50)


def quiet(argv, env=None):
    return timed(lambda: subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL))


def installed_venv():
    """A virtualenv under the cache with this checkout's wheel installed (rebuilt every run;
    one for each checkout, so that two checkouts benchmarked at once do not share one).
    Ours with --no-compile: its bytecode is the wheel's own, as where an installer writes
    none (the dependencies' is pip's: setuptools' .pth hook runs in every process)."""
    venv = os.path.join(CACHE, "ours-" + hashlib.sha1(ROOT.encode()).hexdigest()[:8])
    dist = tempfile.mkdtemp(prefix="bench-wheel-")
    try:
        subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--wheel", "-o", dist, ROOT],
                       check=True, stdout=subprocess.DEVNULL)
        if not os.path.exists(os.path.join(venv, "bin", "python")):
            subprocess.run(["/usr/bin/python3", "-m", "venv", venv], check=True)
        [wheel] = [os.path.join(dist, n) for n in os.listdir(dist) if n.endswith(".whl")]
        pip = [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, wheel], check=True)  # the dependencies, compiled as pip does
        subprocess.run([*pip, "--no-compile", "--no-deps", "--force-reinstall", wheel], check=True)
    finally:
        shutil.rmtree(dist, ignore_errors=True)
        # The build's own leftovers in the checkout.
        shutil.rmtree(os.path.join(ROOT, "build"), ignore_errors=True)
    return venv


def hook_element(tmp, n):
    """ELEMENTS_PATH dir with element `hooksN` holding n trivial mount.d hooks; (path, hook dir)."""
    base = os.path.join(tmp, f"elements-{n}")
    hook_dir = os.path.join(base, f"hooks{n}", "mount.d")
    os.makedirs(hook_dir)
    with open(os.path.join(base, f"hooks{n}", "README.md"), "w") as f:
        f.write(f"# hooks{n}: {n} trivial hooks\n")
    for i in range(n):
        path = os.path.join(hook_dir, f"{i:02d}-trivial")
        with open(path, "w") as f:
            f.write("#!/bin/bash\ntrue\n")
        os.chmod(path, 0o755)
    return base, hook_dir


def hooks(tmp, venv, dib_run_parts, runs):
    for n in HOOK_COUNTS:
        base, hook_dir = hook_element(tmp, n)
        env = dict(os.environ, ELEMENTS_PATH=base)
        work = os.path.join(tmp, "work")
        argv = ["-q", "--work-dir", work, f"hooks{n}"]
        ours = process([os.path.join(venv, "bin", "euca-image-process"), *argv], env)
        dib = process(["bash", dib_run_parts, hook_dir])
        a, b = alternate(ours, dib, runs)
        report_process(f"a process running {n} trivial hook(s)", "euca-image-process (wheel)", a,
                       "dib-run-parts", b)
        if n == 1:
            # The bytecode tools/install writes (edits since would be recompiled by every
            # process where PYTHONDONTWRITEBYTECODE is set).
            subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "imaging_elements")],
                           check=True)
            checkout = process([sys.executable, os.path.join(ROOT, "bin", "euca-image-process"), *argv], env)
            a, b = alternate(checkout, dib, runs)
            report_process(f"a process running {n} trivial hook(s)", "euca-image-process (bin/)", a,
                           "dib-run-parts", b)


def bench_os(tmp):
    """An ELEMENTS_PATH dir with `bench-os`, which provides operating-system (dib insists on one)."""
    base = os.path.join(tmp, "elements-os")
    os.makedirs(os.path.join(base, "bench-os"))
    with open(os.path.join(base, "bench-os", "element-provides"), "w") as f:
        f.write("operating-system\n")
    with open(os.path.join(base, "bench-os", "README.md"), "w") as f:
        f.write("# bench-os: provides operating-system\n")
    return base


def element_info(tmp, venv, dib, site, runs):
    base = bench_os(tmp)
    stock = sorted(elements.find_elements("").keys())
    # Stock elements that conflict with each other (two providers of one name) are left out.
    names = []
    for name in stock:
        try:
            elements.resolve(names + [name], elements.find_elements(""))
            names.append(name)
        except elements.ElementError:
            pass
    names.append("bench-os")
    ours = quiet([os.path.join(venv, "bin", "element-info"), "--expand-dependencies", *names],
                 dict(os.environ, ELEMENTS_PATH=base))
    theirs = quiet([os.path.join(dib, "bin", "python"), os.path.join(site, "diskimage_builder", "lib",
                                                                      "element-info.py"), *names],
                   dict(os.environ, ELEMENTS_PATH=f"{base}:{elements.PROJECT_ELEMENTS}"))
    a, b = alternate(ours, theirs, runs)
    report(f"element-info --expand-dependencies, {len(names)} elements, start to exit", "element-info (wheel)", a,
           "dib element-info", b)


def chain_on_disk(tmp):
    base = os.path.join(tmp, "chain")
    for i in range(CHAIN):
        path = os.path.join(base, f"e{i}")
        os.makedirs(path)
        with open(os.path.join(path, "element-deps" if i < CHAIN - 1 else "element-provides"), "w") as f:
            f.write(f"e{i + 1}\n" if i < CHAIN - 1 else "operating-system\n")
    return base


def resolver(tmp, site, runs):
    sys.path.append(site)  # after ours: dib's PyYAML or anything else never shadows what we import
    from diskimage_builder import element_dependencies as dib
    dib.logger.disabled = True

    ours_lib, dib_lib = {}, {}
    for i in range(CHAIN):
        deps = frozenset([f"e{i + 1}"]) if i < CHAIN - 1 else frozenset()
        provides = frozenset() if i < CHAIN - 1 else frozenset(["operating-system"])
        element = elements.Element.__new__(elements.Element)
        element.name, element.path, element.deps, element.provides = f"e{i}", "/nonexistent", deps, provides
        ours_lib[element.name] = element
        theirs = dib.Element.__new__(dib.Element)
        theirs.name, theirs.path, theirs.depends, theirs.provides = f"e{i}", "/nonexistent", set(deps), set(provides)
        dib_lib[theirs.name] = theirs
    a, b = alternate(timed(lambda: elements.resolve(["e0"], ours_lib)),
                     timed(lambda: dib._expand_element_dependencies(["e0"], dib_lib)), runs)
    report(f"{CHAIN}-element chain, in memory, one interpreter", "ours: elements.resolve", a,
           "dib _expand_element_dependencies", b)

    base = chain_on_disk(tmp)
    a, b = alternate(timed(lambda: elements.resolve(["e0"], elements.find_elements(base))),
                     timed(lambda: dib._expand_element_dependencies(["e0"], dib._find_all_elements(base))), runs)
    report(f"{CHAIN}-element chain, on disk (find, read, resolve), one interpreter", "ours", a, "dib", b)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    args = parser.parse_args()
    print(load() + " (before)")
    dib = dib_venv()
    venv = installed_venv()
    site = dib_site(dib)
    dib_run_parts = os.path.join(site, "diskimage_builder", "lib", "dib-run-parts")
    with tempfile.TemporaryDirectory() as tmp:
        hooks(tmp, venv, dib_run_parts, args.runs)
        element_info(tmp, venv, dib, site, args.runs)
        resolver(tmp, site, args.runs)
    print(load() + " (after)")


if __name__ == "__main__":
    main()
