"""Running a command inside the mounted image, in a bubblewrap sandbox.

The image's root becomes `/`; the sandbox has its own mount, PID, IPC, UTS,
user-visible network (loopback only) namespaces, a private /dev, /proc and
/tmp, and none of the host's mounts.  The hook file, the bash helpers and the
Python helper package are bound read-only under /run/img.
"""

import os
import shutil

from imaging_elements.resources import LIB, PACKAGE

INSIDE = "/run/img"


class SandboxError(Exception):
    pass


def wrap(root, argv, binds=(), writable=True, interactive=False):
    """The argv that runs `argv` (paths as seen inside) in a sandbox rooted at `root`.

    binds: (host path, path inside) pairs bound read-only.
    """
    bwrap = shutil.which("bwrap")
    if not bwrap:
        raise SandboxError("running hooks inside the image needs bubblewrap (bwrap), "
                           "not found on PATH: apt-get install bubblewrap")
    if not os.path.isdir(root):
        raise SandboxError(f"{root}: the image is not mounted (no mount.d hook mounted it)")
    sandbox = [bwrap, "--bind" if writable else "--ro-bind", root, "/",
               "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--tmpfs", "/run",
               "--unshare-all", "--die-with-parent", "--hostname", "imaging-sandbox",
               "--ro-bind", LIB, f"{INSIDE}/lib",
               "--ro-bind", os.path.dirname(PACKAGE), f"{INSIDE}/python"]
    for host, inside in binds:
        sandbox += ["--ro-bind", host, inside]
    if not interactive:
        sandbox.append("--new-session")  # no TIOCSTI into the caller's terminal
    return sandbox + ["--chdir", "/", "--"] + list(argv)


def hook_argv(root, hook, verb="run", writable=True):
    """Run `hook` inside the image: its file is bound at /run/img/hooks/NAME."""
    inside = f"{INSIDE}/hooks/{hook.name}"
    # The guest's own interpreter runs it, chosen by the shebang.
    return wrap(root, [inside, verb], binds=[(hook.path, inside)], writable=writable)


def inside_environment(env):
    """The hook environment as seen inside the sandbox."""
    env = dict(env, IMG_LIB=f"{INSIDE}/lib", PYTHONPATH=f"{INSIDE}/python",
               IMG_MOUNT_POINT="/", IMG_PYTHON="python3",
               PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # Host-side paths mean nothing in there.
    for name in ("IMG_JOURNAL", "IMG_WORK_DIR", "IMG_SCRATCH_DIR", "IMG_ELEMENT_DIR"):
        env.pop(name, None)
    return env
