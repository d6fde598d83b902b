"""The layers of the package: the engine never imports a class library, the
hook SDK imports the standard library only (it runs on a guest's Python), and
no per-phase rule is a check on a phase's name (phases.py holds them)."""

import ast
import importlib
import os
import shutil
import subprocess
import sys

import testtools

from imaging_elements import api
from imaging_elements.engine import phase_handlers, phases

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "imaging_elements")
ENGINE = os.path.join(PACKAGE, "engine")
SDK = os.path.join(PACKAGE, "sdk")
CLASS_LIBRARIES = ("disk", "fstab", "guest", "guestinfo", "qemuimg", "bootdisk", "bundle", "crypt", "instance",
                   "mount", "convert")


def imported(path):
    """Every module name an import statement of the file names (relative ones too)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" if base else alias.name for alias in node.names)
    return names


def modules(directory):
    for name in sorted(os.listdir(directory)):
        if name.endswith(".py"):
            yield name[:-3], os.path.join(directory, name)


def engine_files():
    return modules(ENGINE)


def not_stdlib_or_sdk(path):
    """The imports of the file that are neither the standard library nor the SDK itself."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within sdk/ only (`from . import journal`)
                if node.level > 1:
                    found.append("." * node.level + (node.module or ""))
                continue
            names = [node.module]
        else:
            continue
        for name in names:
            if name != "imaging_elements.sdk" and not name.startswith("imaging_elements.sdk.") \
                    and name.split(".")[0] not in sys.stdlib_module_names:
                found.append(name)
    return found


class LayersTest(testtools.TestCase):

    def test_engine_never_imports_a_class_library(self):
        found = list(engine_files())
        self.assertGreater(len(found), 10)
        for name, path in found:
            for module in imported(path):
                parts = module.split(".")
                library = (parts[0] == "imaging_elements" and len(parts) > 1 and parts[1] in CLASS_LIBRARIES) \
                    or parts[0] in CLASS_LIBRARIES
                self.assertFalse(library, f"engine module {name} imports the class library {module}")

    def test_sdk_imports_the_standard_library_only(self):
        # It runs inside the guest (chroot sandbox, booted instance) with only itself there.
        found = list(modules(SDK))
        self.assertEqual(["__init__", "hooklib", "journal"], [name for name, _ in found])
        # __init__ is bound as imaging_elements/__init__.py in the sandbox: a docstring only.
        with open(os.path.join(SDK, "__init__.py")) as f:
            body = ast.parse(f.read()).body
        self.assertEqual([ast.Expr], [type(node) for node in body])
        for name, path in found:
            self.assertEqual([], not_stdlib_or_sdk(path), f"sdk module {name} imports beyond the stdlib")

    def test_the_sdk_checker_sees_engine_and_library_imports(self):
        path = os.path.join(self.useFixture(__import__("fixtures").TempDir()).path, "x.py")
        with open(path, "w") as f:
            f.write("import json\nfrom . import journal\nfrom imaging_elements.sdk.journal import Journal\n"
                    "def f():\n    from imaging_elements.engine import config\n"
                    "    from ..mount import disk\n    import sh\n")
        self.assertEqual(["imaging_elements.engine", "..mount", "sh"], not_stdlib_or_sdk(path))

    def test_the_old_top_level_modules_are_gone(self):
        # One implementation: the old top-level hooklib/journal modules are gone, not shims.
        for name in ("hooklib.py", "journal.py"):
            self.assertFalse(os.path.exists(os.path.join(PACKAGE, name)), name)

    def test_the_sdk_alone_runs_as_the_guest_gets_it(self):
        # Laid out as the sandbox binds it: imaging_elements/ holds sdk/ and the SDK's own
        # __init__ only, the interpreter isolated from the site packages.
        guest = os.path.join(self.useFixture(__import__("fixtures").TempDir()).path, "lib")
        shutil.copytree(SDK, os.path.join(guest, "imaging_elements", "sdk"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(os.path.join(SDK, "__init__.py"), os.path.join(guest, "imaging_elements", "__init__.py"))
        hook = ("import sys; sys.path.insert(0, %r)\n"
                "from imaging_elements.sdk import hooklib\n"
                "import imaging_elements\n"
                "assert imaging_elements.__file__ == %r, imaging_elements.__file__\n"
                "hooklib.main(lambda: hooklib.describe('sdk alone'))\n"
                ) % (guest, os.path.join(guest, "imaging_elements", "__init__.py"))
        result = subprocess.run([sys.executable, "-I", "-S", "-c", hook, "run"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"})
        self.assertEqual(0, result.returncode, result.stderr)
        self.assertIn('{"describe": "sdk alone"}', result.stderr)

    def test_the_checker_sees_a_forbidden_import(self):
        path = os.path.join(self.useFixture(__import__("fixtures").TempDir()).path, "x.py")
        with open(path, "w") as f:
            f.write("def f():\n    from imaging_elements import instance\n")
        self.assertIn("imaging_elements.instance", imported(path))

    def test_engine_checks_no_phase_name(self):
        names = set(phases.PHASE_NAMES)
        for name, path in engine_files():
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Compare):
                    sides = [node.left, *node.comparators]
                    attrs = [s for s in sides if isinstance(s, ast.Attribute) and s.attr == "name"]
                    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value in names]
                    self.assertFalse(attrs and consts, f"{name}.py:{node.lineno}: a check on a phase name; "
                                                       "make it a property of phases.Phase")

    def test_instance_handler_registered_by_the_api(self):
        self.assertIs(api._instance_handler, phase_handlers.get("instance"))
        # The handler's deferred import names a module that is there (it boots qemu: not called here).
        with open(api.__file__) as f:
            tree = ast.parse(f.read())
        handler = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "_instance_handler")
        for node in ast.walk(handler):
            if isinstance(node, ast.ImportFrom):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    self.assertTrue(hasattr(module, alias.name) or
                                    importlib.import_module(f"{node.module}.{alias.name}").run_phase)
        handled = [p.name for p in phases.PHASES if p.handler]
        self.assertEqual(["instance-validate"], handled)

    def test_phases_that_read_the_image_file_release_the_mount(self):
        # --skip-phases convert must not leave the image mounted while instance-validate boots it.
        for phase in phases.PHASES:
            if phase.where == "instance" or phase.chain_target == "image-type":
                self.assertTrue(phase.release_mount, phase.name)
