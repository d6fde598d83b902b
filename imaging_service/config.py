"""The service's settings: one table for the flags, the environment
(IMAGING_SERVICE_<NAME>), an optional config file (YAML or JSON, keys are the
setting names), the defaults, `--help` and docs/service.md's table.

The flag wins over the variable, the variable over the file, the file over
the default.  Other modules add their rows with a module-level list
`SETTINGS` of `Setting`s; the modules named in MODULES are concatenated here
(the object store, the workers, the pipeline).  `python -m
imaging_service.config` prints the Markdown table; with `--update FILE` it
replaces the table between the markers in FILE (docs/service.md).
"""

import argparse
import datetime
import importlib
import os
import re
import sys

import yaml

from imaging_elements.engine.config import parse_size

PREFIX = "IMAGING_SERVICE_"
# Modules whose SETTINGS lists are part of the table, in this order.
MODULES = ("imaging_service.objectstore", "imaging_service.seaweed", "imaging_service.worker",
           "imaging_service.pipeline", "imaging_service.celery_engine", "imaging_service.web")

DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd]?)$")


def parse_duration(text):
    """'180m', '7d', '30s', '2h', or seconds -> timedelta."""
    if isinstance(text, datetime.timedelta):
        return text
    match = DURATION.match(str(text).strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration (like 30s, 180m, 2h, 7d)")
    seconds = float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return datetime.timedelta(seconds=seconds)


def parse_bool(text):
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{text!r} is not a boolean (true or false)")


def parse_int(text):
    try:
        return int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{text!r} is not a whole number") from None


def parse_list(text):
    if isinstance(text, (list, tuple)):
        return [str(x) for x in text]
    return [x.strip() for x in str(text).replace(",", " ").split() if x.strip()]


TYPES = {"str": str, "int": parse_int, "bool": parse_bool, "size": parse_size, "duration": parse_duration,
         "list": parse_list}


class Setting:
    """name: the attribute (and flag --name-with-dashes, variable IMAGING_SERVICE_NAME);
    type: one of TYPES; default: text or value (None: none, or computed, as help says)."""

    def __init__(self, name, type, default, help, metavar=None):
        if type not in TYPES:
            raise ValueError(f"setting {name}: unknown type {type!r}")
        self.name, self.type, self.default, self.help = name, type, default, help
        self.metavar = metavar or name.split("_")[-1].upper()

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    @property
    def env(self):
        return PREFIX + self.name.upper()

    def convert(self, value, where):
        if value is None:
            return None
        try:
            return TYPES[self.type](value)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None


class ConfigError(Exception):
    pass


SETTINGS = [
    Setting("config", "str", None, "a YAML or JSON file of settings (keys are the setting names)",
            metavar="FILE"),
    Setting("state_dir", "str", "/var/lib/imaging-service",
            "the service's own directory (database, key file, work cache, embedded object store); "
            "made mode 0700", metavar="DIR"),
    Setting("listen", "str", "127.0.0.1", "address the API listens on", metavar="ADDRESS"),
    Setting("port", "int", 8773, "port the API listens on (0: any free port)"),
    Setting("database_url", "str", None,
            "SQLAlchemy URL of the database, e.g. postgresql+psycopg://user@host/db; "
            "default: SQLite (WAL) at STATE_DIR/service.db", metavar="URL"),
    Setting("key_file", "str", None,
            "the key that encrypts the stored secret keys (made at first start, mode 0600); "
            "default: STATE_DIR/secret.key", metavar="FILE"),
    Setting("region", "str", "us-east-1", "the region that request signatures must be scoped to"),
    Setting("engine", "str", "embedded",
            "what runs the tasks: embedded (worker threads in this process), celery (workers on "
            "other machines through --broker-url; see docs/deployment.md) or none (API only; "
            "another process runs the workers)", metavar="ENGINE"),
    Setting("max_active_tasks", "int", 20, "most unfinished tasks one account may have", metavar="N"),
    Setting("upload_expiry", "duration", "7d",
            "how long a task waits for its upload (the parts of an import manifest)", metavar="TIME"),
    Setting("task_timeout", "duration", "180m", "a conversion that runs longer is cancelled",
            metavar="TIME"),
    Setting("retention", "duration", "7d", "how long finished tasks are kept", metavar="TIME"),
    Setting("api_threads", "int", 8, "requests answered at once (threads; each may hold a database "
            "connection)", metavar="N"),
    Setting("api_processes", "int", 1,
            "processes that answer the API on the one port (SO_REUSEPORT), each with --api-threads "
            "threads; the first also runs the workers and the maintenance; 2 or more lets the describe "
            "calls use more cores", metavar="N"),
    Setting("log_level", "str", "info", "debug, info, warning or error", metavar="LEVEL"),
]


def all_settings():
    rows = list(SETTINGS)
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        rows += list(getattr(module, "SETTINGS", ()))
    seen = set()
    for s in rows:
        if s.name in seen:
            raise ValueError(f"setting {s.name} is defined twice")
        seen.add(s.name)
    return rows


def add_arguments(parser, rows=None):
    for s in rows or all_settings():
        default = f"; default: {s.default}" if s.default not in (None, "") else ""
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.metavar,
                            help=f"{s.help}{default} [{s.env}]")


def resolve(args=None, environ=os.environ, rows=None):
    """Flags (an argparse Namespace or dict) over environment over config file over defaults:
    a Namespace with every setting converted to its type.  Then the computed defaults."""
    rows = rows or all_settings()
    flags = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    config_file = flags.get("config") or environ.get(PREFIX + "CONFIG")
    from_file = {}
    if config_file:
        try:
            with open(config_file) as f:
                from_file = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {config_file}: {e}") from None
        if not isinstance(from_file, dict):
            raise ConfigError(f"config file {config_file}: expected a mapping of setting names to values")
        unknown = sorted(set(from_file) - {s.name for s in rows})
        if unknown:
            raise ConfigError(f"config file {config_file}: unknown settings {', '.join(unknown)}")
    out = argparse.Namespace()
    for s in rows:
        for where, value in ((s.flag, flags.get(s.name)), (s.env, environ.get(s.env)),
                             (f"{config_file}: {s.name}", from_file.get(s.name)),
                             (f"default of {s.name}", s.default)):
            if value is not None:
                setattr(out, s.name, s.convert(value, where))
                break
        else:
            setattr(out, s.name, None)
    out.state_dir = os.path.abspath(out.state_dir)
    if not out.database_url:
        out.database_url = "sqlite:///" + os.path.join(out.state_dir, "service.db")
    if not out.key_file:
        out.key_file = os.path.join(out.state_dir, "secret.key")
    if out.engine not in ("embedded", "none", "celery"):
        raise ConfigError(f"engine {out.engine!r}: expected embedded, celery or none")
    return out


def markdown():
    lines = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for s in all_settings():
        default = "" if s.default is None else f"`{s.default}`"
        lines.append(f"| `{s.flag} {s.metavar}` | `{s.env}` | {default} | {s.help} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- settings: generated by python -m imaging_service.config -->", "<!-- settings end -->"


def update(path):
    with open(path) as f:
        text = f.read()
    head, _, rest = text.partition(BEGIN + "\n")
    _, _, tail = rest.partition(END)
    if not rest:
        raise SystemExit(f"{path}: no {BEGIN!r} line to put the table after")
    table = markdown()  # first: an import that fails must not leave the file cut short
    with open(path + ".tmp", "w") as f:
        f.write(head + BEGIN + "\n" + table + END + tail)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update(sys.argv[2])
    else:
        sys.stdout.write(markdown())
