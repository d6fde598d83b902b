"""Build: the wheel and the sdist carry the stock elements and lib/.

elements/ and lib/ stay at the top of the repository (the project layout); a
build copies them into the package as imaging_elements/_data/, where
imaging_elements/engine/resources.py finds them in an installed copy.  An editable
install uses them in place.
"""

import os
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
        here = os.path.dirname(os.path.abspath(__file__))
        target = os.path.join(self.build_lib, "imaging_elements", "_data")
        for name in DATA_DIRS:
            out = os.path.join(target, name)
            shutil.rmtree(out, ignore_errors=True)
            # copytree keeps the mode bits: hooks stay executable in the wheel.
            shutil.copytree(os.path.join(here, name), out, ignore=SKIP, symlinks=False)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        target = os.path.join(self.build_lib, "imaging_elements", "_data")
        for top, _, files in os.walk(target):
            outputs += [os.path.join(top, f) for f in files]
        return outputs


setuptools.setup(cmdclass={"build_py": BuildWithData})
