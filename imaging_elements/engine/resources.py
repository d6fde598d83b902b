"""Where the project's files are: the one place that knows.

From a checkout (editable install or bin/), elements/, lib/ and bin/ sit at
the top of the repository, beside the package.  From an installed wheel or
sdist, the build step (setup.py) copies elements/ and lib/ into the package as
imaging_elements/_data/, and the drivers are the console scripts installed
beside the interpreter.

Plain paths, not importlib.resources: hooks are executables and the sandbox
binds directories, so they must be real files on disk anyway, and importing
importlib.resources would add to every process's start-up.
"""

import os
import sys

# The package imaging_elements/ (this file is in its engine/).
PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The directory to put on PYTHONPATH for `import imaging_elements`.
PYTHONPATH = os.path.dirname(PACKAGE)
_DATA = os.path.join(PACKAGE, "_data")

if os.path.isdir(os.path.join(_DATA, "elements")):   # installed
    ELEMENTS = os.path.join(_DATA, "elements")
    LIB = os.path.join(_DATA, "lib")
    BIN = os.path.dirname(sys.executable)
else:                                                # a checkout
    ELEMENTS = os.path.join(PYTHONPATH, "elements")
    LIB = os.path.join(PYTHONPATH, "lib")
    BIN = os.path.join(PYTHONPATH, "bin")

# The hook SDK: its Python half (a package, bound or copied into the guest as
# imaging_elements/sdk/) and its bash half.
SDK = os.path.join(PACKAGE, "sdk")
IMG_FUNCTIONS = os.path.join(LIB, "img-functions")
