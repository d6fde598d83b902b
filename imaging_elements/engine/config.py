"""The runner's settings: one table for the command line, the environment,
the defaults, `--help` and docs/configuration.md.

Every setting can be given as an option or as its IMG_* environment variable;
the option wins.  `python -m imaging_elements.engine.config` prints the Markdown
that docs/configuration.md holds.
"""

import os
import re
import sys
import types

from imaging_elements.engine.phases import PHASES


class Setting:
    def __init__(self, dest, flags, env, help, default=None, kind="value", metavar=None):
        self.dest, self.flags, self.env, self.help = dest, flags, env, help
        self.default, self.kind, self.metavar = default, kind, metavar


SETTINGS = (
    Setting("input", ("-i", "--input"), "IMG_INPUT", "the input image (a file, or an EC2 bundle manifest)",
            metavar="PATH"),
    Setting("input_type", ("-t", "--input-type"), "IMG_INPUT_TYPE",
            "type of the input: raw, partition, vmdk, qcow2, vhd, vhdx, bundle; detected from the "
            "content when not given, and refused when the content disagrees", metavar="TYPE"),
    Setting("output", ("-o", "--output"), "IMG_OUTPUT",
            "where to write the result; written to a temporary name and renamed at the end", metavar="PATH"),
    Setting("output_type", ("-T", "--output-type"), "IMG_OUTPUT_TYPE",
            "type of the output: raw, vmdk (streamOptimized), qcow2, vhd, vhdx, bundle; "
            "default: the input's", metavar="TYPE"),
    Setting("output_crypt", ("--output-crypt",), "IMG_OUTPUT_CRYPT",
            "encrypt the output: none or aes-128-cbc", default="none", metavar="CRYPT"),
    Setting("platform", ("--platform",), "IMG_PLATFORM",
            "the guest's platform: linux, windows, unknown, or auto (found by the mounters)",
            default="auto", metavar="PLATFORM"),
    Setting("size", ("--size",), "IMG_SIZE", "size of a disk made from a partition image (e.g. 4G)",
            metavar="SIZE"),
    Setting("kernel", ("--kernel",), "IMG_KERNEL", "an external kernel for a partition (AMI) image",
            metavar="PATH"),
    Setting("ramdisk", ("--ramdisk",), "IMG_RAMDISK", "an external ramdisk for a partition (AMI) image",
            metavar="PATH"),
    Setting("work_dir", ("--work-dir",), "IMG_WORK_DIR",
            "the work directory (journal, scratch, mount point); default: a new one under "
            "/var/tmp, removed at the end", metavar="DIR"),
    Setting("keep_work_dir", ("--keep-work-dir",), "IMG_KEEP_WORK_DIR",
            "keep the work directory at the end (its resources are still released)", kind="flag"),
    Setting("scratch_limit", ("--scratch-limit",), "IMG_SCRATCH_LIMIT",
            "most bytes the scratch space may hold (e.g. 20G, at least 1M): the scratch directory "
            "becomes a filesystem of that size, so a writer stops at the limit (exit 4)",
            metavar="SIZE"),
    Setting("hook_timeout", ("--hook-timeout",), "IMG_HOOK_TIMEOUT",
            "most seconds one hook may run before its processes are killed; default: per phase "
            "(see Hook time limits)", metavar="SECONDS"),
    Setting("result_json", ("--result-json",), "IMG_RESULT_JSON",
            "write the result (docs/api.md, ProcessResult) to this file as JSON at the end",
            metavar="PATH"),
    Setting("breaks", ("--break",), "IMG_BREAK",
            "stop for a shell at these points: before-PHASE, after-PHASE, after-error (comma "
            "separated; the variable `break` is read too, as in diskimage-builder)", metavar="LIST"),
    Setting("phases", ("--phases",), "IMG_PHASES", "run only these phases (comma separated)",
            metavar="LIST"),
    Setting("skip_phases", ("--skip-phases",), "IMG_SKIP_PHASES", "do not run these phases",
            metavar="LIST"),
    Setting("only_hook", ("--hook",), "IMG_ONLY_HOOK",
            "in PHASE, run only hook NAME (PHASE/NAME)", metavar="PHASE/NAME"),
    Setting("list", ("--list",), "IMG_LIST",
            "dry run: print what would run, in order, with each hook's accepts answer", kind="flag"),
    Setting("status_fd", ("--status-fd",), "IMG_EVENTS_FD",
            "write the JSON-lines event stream to this file descriptor", metavar="N"),
    Setting("status_file", ("--status-file",), "IMG_EVENTS_FILE",
            "write the JSON-lines event stream to this file", metavar="PATH"),
    Setting("log_file", ("--log-file",), "IMG_LOG_FILE", "write the readable log to this file too",
            metavar="PATH"),
    Setting("quiet", ("-q", "--quiet"), "IMG_QUIET", "log only warnings and errors", kind="flag"),
    Setting("cleanup", ("--cleanup",), "IMG_CLEANUP",
            "release what a killed process left in WORKDIR (its cleanup journal), then exit",
            metavar="WORKDIR"),
    Setting("elements_path", ("--elements-path",), "ELEMENTS_PATH",
            "directories to search for elements before the project's own (colon separated, "
            "the first wins)", metavar="DIRS"),
    Setting("sandbox_limits", ("--sandbox-limit",), "IMG_SANDBOX_LIMITS",
            "a bound of the sandbox that runs install.d hooks and break-point shells, NAME=VALUE: "
            "memory, tmpfs, file-size (sizes), processes, cpu (seconds); comma separated or repeated; "
            "defaults in docs/security.md", kind="append", metavar="NAME=VALUE"),
    Setting("env", ("-e", "--env"), None,
            "set IMG_NAME=VALUE for the hooks (an element's option); may be repeated",
            kind="append", metavar="NAME=VALUE"),
)

EXIT_CODES = (
    (0, "success"),
    (1, "a hook failed, or a validator that is not optional"),
    (2, "bad usage: options, elements, hook headers, a break point without a terminal"),
    (3, ("bad input: unreadable, unknown or mismatched image type, or a hook said the input is "
         "damaged (status `bad-input`)")),
    (4, "not enough space for a conversion (scratch limit or free space)"),
    (5, "the process succeeded but releasing a resource failed"),
    (130, "interrupted (Ctrl-C)"),
    (143, "terminated (SIGTERM), or cancelled through the API's cancel event"),
)

# A variable is secret when its name (any case) holds one of these words
# (KEY too: a key or a key file's path, both kept from the guest).  Secret values
# are hidden in logs and never given to code that runs from the image, unless
# a chroot hook declares it (needs-secret).
SECRET_WORDS = ("passphrase", "password", "passwd", "secret", "token", "credential", "key")


def is_secret_name(name):
    """Whether the variable `name` holds a secret (see SECRET_WORDS)."""
    folded = name.casefold()
    return any(word in folded for word in SECRET_WORDS)


# Default time limit of one hook, by phase (seconds; the phase table, phases.py):
# generous, so that a real image never meets it, and a hook that hangs (a
# guest's interpreter that sleeps forever) still ends.
HOOK_TIMEOUTS = {p.name: p.timeout for p in PHASES}

# Compiled when first used (re's cache): not part of every process's start-up.
SIZE = r"^(\d+(?:\.\d+)?)\s*([KMGTP]?)(i?B?)$"


def parse_size(text):
    """'10G' -> bytes (powers of 1024; a bare number is bytes)."""
    match = re.match(SIZE, str(text).strip(), re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size (like 512M, 10G, or bytes)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** " KMGTP".index(unit or " "))


def parser(prog="euca-image-process"):
    import argparse  # not at the top: plain command lines are read without it (parse())
    epilog = "exit codes:\n" + "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES)
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        description="Run the hooks of ELEMENTs over an image: unbundle, mount, validate, "
                    "install, convert, instance-validate, crypt, bundle, cleanup.")
    p.add_argument("elements", nargs="*", metavar="ELEMENT", help="elements to use")
    for s in SETTINGS:
        text = s.help + (f" [{s.env}]" if s.env else "")
        if s.kind == "flag":
            p.add_argument(*s.flags, dest=s.dest, action="store_true", help=text)
        elif s.kind == "append":
            p.add_argument(*s.flags, dest=s.dest, action="append", default=[], help=text,
                           metavar=s.metavar)
        else:
            p.add_argument(*s.flags, dest=s.dest, help=text, metavar=s.metavar)
    return p


def parse_plain(argv):
    """The command line as parser().parse_args(argv) reads it, for the plain forms only:
    whole option names (`--work-dir DIR`, `--work-dir=DIR`, `-q`) and one run of
    ELEMENTs.  None for anything else (--help, abbreviations, a value or an element
    starting with '-', a mistake), which argparse then reads, and explains.

    argparse (with gettext, and its parser of 25 options) is about 3 ms of every
    process's start-up: a fifth of a one-hook run (benchmarks/runner.py).  A test
    checks that both agree (tests/test_runner.py, ConfigTest)."""
    by_flag = {flag: s for s in SETTINGS for flag in s.flags}
    values = {s.dest: [] if s.kind == "append" else False if s.kind == "flag" else None for s in SETTINGS}
    elements, elements_done = [], False
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg:
            return None
        if not arg.startswith("-"):
            if elements_done:
                return None  # a second run of elements: argparse refuses it
            elements.append(arg)
            if i == len(argv) or argv[i].startswith("-"):
                elements_done = True
            continue
        flag, eq, value = arg.partition("=")
        setting = by_flag.get(flag) if flag.startswith("--") or not eq else None
        if setting is None:
            return None
        if setting.kind == "flag":
            if eq:
                return None
            values[setting.dest] = True
            continue
        if not eq:
            if i == len(argv):
                return None
            value = argv[i]
            i += 1
        if not value or value.startswith("-"):
            return None
        if setting.kind == "append":
            values[setting.dest].append(value)
        else:
            values[setting.dest] = value
    return types.SimpleNamespace(elements=elements, **values)


def parse(argv, environ=os.environ):
    """Options over environment over defaults; returns a namespace of the settings' dests."""
    args = parse_plain(argv) or parser().parse_args(argv)
    for s in SETTINGS:
        value = getattr(args, s.dest)
        if value in (None, False) and s.env and environ.get(s.env):
            value = environ[s.env] if s.kind != "flag" else environ[s.env] not in ("0", "", "no")
        if value is None:
            value = s.default
        setattr(args, s.dest, value)
    if not args.breaks and environ.get("break"):
        args.breaks = environ["break"]
    return args


def markdown():
    lines = ["# Configuration", "",
             ("Generated from `imaging_elements/engine/config.py` by `python -m imaging_elements.engine.config`; "
              "do not edit by hand."), "",
             ("Every setting of `euca-image-process` is an option and an environment variable; "
              "the option wins."), "",
             "| option | variable | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        flags = ", ".join(f"`{f}`" for f in s.flags) + (f" {s.metavar}" if s.metavar else "")
        lines.append(f"| {flags} | {'`' + s.env + '`' if s.env else ''} | "
                     f"{s.default if s.default is not None else ''} | {s.help} |")
    lines += ["", "## Exit codes", "", "| code | meaning |", "|---|---|"]
    lines += [f"| {code} | {text} |" for code, text in EXIT_CODES]
    lines += ["", "## Hook time limits", "",
              ("A hook that runs longer than its phase's limit is killed with its process group, "
               "and the process fails naming the hook and the limit. `--hook-timeout` sets one "
               "limit for every phase."), "", "| phase | limit (s) |", "|---|---|"]
    lines += [f"| {phase} | {limit} |" for phase, limit in HOOK_TIMEOUTS.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown())
