"""Build: the wheel and the sdist carry the stock elements and lib/; the wheel
carries the package's bytecode too.

elements/ and lib/ stay at the top of the repository (the project layout); a
build copies them into the package as imaging_elements/_data/, where
imaging_elements/engine/resources.py finds them in an installed copy.  An editable
install uses them in place.
"""

import importlib.util
import os
import py_compile
import shutil

import setuptools
from setuptools.command.build_py import build_py

DATA_DIRS = ("elements", "lib")
SKIP = shutil.ignore_patterns("__pycache__", "*.pyc", "*~", ".*")


class BuildWithData(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        self.compile_bytecode()
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "imaging_elements", "_data")
        for name in DATA_DIRS:
            out = os.path.join(target, name)
            shutil.rmtree(out, ignore_errors=True)
            # copytree keeps the mode bits: hooks stay executable in the wheel.
            shutil.copytree(os.path.join(here, name), out, ignore=SKIP, symlinks=False)

    def compile_bytecode(self):
        """Bytecode in the wheel, so that no process recompiles a module where the
        installer wrote none (pip --no-compile, PYTHONDONTWRITEBYTECODE): about 16 ms of
        every process.  Checked against the source's hash, not its time, which an
        installer does not keep; for the interpreter that builds (others compile their own)."""
        for package in self.packages:
            directory = os.path.join(self.build_lib, *package.split("."))
            for name in os.listdir(directory):
                if name.endswith(".py"):
                    source = os.path.join(directory, name)
                    py_compile.compile(source, importlib.util.cache_from_source(source),
                                       doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        target = os.path.join(self.build_lib, "imaging_elements", "_data")
        for top, _, files in os.walk(target):
            outputs += [os.path.join(top, f) for f in files]
        return outputs


setuptools.setup(cmdclass={"build_py": BuildWithData})
