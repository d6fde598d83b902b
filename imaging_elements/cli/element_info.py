"""element-info: list elements, expand dependencies, print them for a shell."""

import argparse
import json
import os
import sys

from imaging_elements.engine import elements


def main(argv=None):
    p = argparse.ArgumentParser(prog="element-info",
                                description="List the elements on ELEMENTS_PATH, or expand the "
                                            "dependencies of some.")
    p.add_argument("names", nargs="*", metavar="ELEMENT")
    p.add_argument("--expand-dependencies", "-d", action="store_true",
                   help="print the elements that ELEMENTs resolve to")
    p.add_argument("--env", action="store_true",
                   help="print shell-sourceable variables (IMAGE_ELEMENT, IMAGE_ELEMENT_PATHS)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--elements-path", help="like ELEMENTS_PATH (colon separated)")
    args = p.parse_args(argv)
    warnings = []
    try:
        path = args.elements_path if args.elements_path is not None else os.environ.get("ELEMENTS_PATH", "")
        library = elements.find_elements(path, warn=warnings.append)
        chosen = (elements.resolve(args.names, library) if args.expand_dependencies or args.env
                  else [library[n] if n in library else _missing(n) for n in args.names]
                  if args.names else sorted(library.values(), key=lambda e: e.name))
        options = {e.name: sorted(e.options.values(), key=lambda o: o.name) for e in chosen}
    except elements.ElementError as exc:
        print(f"element-info: error: {exc}", file=sys.stderr)
        return 2
    for warning in warnings:
        print(f"element-info: {warning}", file=sys.stderr)
    if args.env:
        import shlex
        print(f"export IMAGE_ELEMENT={shlex.quote(' '.join(e.name for e in chosen))}")
        paths = json.dumps({e.name: e.path for e in chosen}, sort_keys=True)
        print(f"export IMAGE_ELEMENT_PATHS={shlex.quote(paths)}")
    elif args.json:
        print(json.dumps([{"name": e.name, "path": e.path, "description": e.description,
                           "deps": sorted(e.deps), "provides": sorted(e.provides),
                           "options": [o.as_dict() for o in options[e.name]]} for e in chosen],
                         indent=2))
    elif args.expand_dependencies:
        print(" ".join(e.name for e in chosen))
    else:
        width = max((len(e.name) for e in chosen), default=0)
        for e in chosen:
            print(f"{e.name:<{width}}  {e.description}  [{e.path}]")
            for o in options[e.name]:
                print(f"    -e {o.name}=<{_kind(o)}>{_default(o)}  {o.description}")
    return 0


def _kind(option):
    return "|".join(option.choices) if option.kind == "choice" else option.kind


def _default(option):
    return f" (default {option.default})" if option.default is not None else ""


def _missing(name):
    raise elements.ElementError(f"element {name} not found")


if __name__ == "__main__":
    sys.exit(main())
