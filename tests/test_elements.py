"""Finding elements on ELEMENTS_PATH and resolving their dependencies."""

import itertools
import json
import os

from imaging_elements.engine import elements
from tests import base


def chain_library(length):
    """In memory: e0 needs e1, which needs e2, ... (the benchmark uses it too)."""
    library = {}
    for i in range(length):
        element = elements.Element.__new__(elements.Element)
        element.name, element.path = f"e{i}", "/nonexistent"
        element.deps = frozenset([f"e{i + 1}"]) if i < length - 1 else frozenset()
        element.provides = frozenset()
        library[element.name] = element
    return library


def make(root, name, deps=(), provides=(), readme=None, hooks=(), options=None):
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "README.md"), "w") as f:
        f.write(readme or f"# {name}: the {name} element\n")
    if deps:
        with open(os.path.join(path, "element-deps"), "w") as f:
            f.write("\n".join(deps) + "\n")
    if provides:
        with open(os.path.join(path, "element-provides"), "w") as f:
            f.write("\n".join(provides) + "\n")
    if options is not None:
        with open(os.path.join(path, elements.OPTIONS_FILE), "w") as f:
            f.write(options)
    for hook in hooks:
        os.makedirs(os.path.join(path, os.path.dirname(hook)), exist_ok=True)
        with open(os.path.join(path, hook), "w") as f:
            f.write("#!/bin/bash\n")
        os.chmod(os.path.join(path, hook), 0o755)
    return path


class ResolveTest(base.TestCase):

    def library(self, *specs):
        for spec in specs:
            make(self.tmp, *spec) if isinstance(spec, tuple) else make(self.tmp, spec)
        return elements.find_elements(self.tmp)

    def names(self, requested, library):
        return [e.name for e in elements.resolve(requested, library)]

    def test_direct_and_transitive(self):
        lib = self.library(("a", ["b"]), ("b", ["c"]), "c", "unrelated")
        self.assertEqual(["a", "b", "c"], self.names(["a"], lib))

    def test_self_dependency(self):
        lib = self.library(("a", ["a", "b"]), "b")
        self.assertEqual(["a", "b"], self.names(["a"], lib))

    def test_two_element_cycle(self):
        lib = self.library(("a", ["b"]), ("b", ["a"]))
        self.assertEqual(["a", "b"], self.names(["a"], lib))
        self.assertEqual(["a", "b"], self.names(["b"], lib))

    def test_provides_satisfies_a_dependency(self):
        lib = self.library(("a", ["v"]), ("c", [], ["v"]))
        self.assertEqual(["a", "c"], self.names(["a", "c"], lib))

    def test_requester_before_provider_any_order(self):
        # diskimage-builder 3.43 fails [A, D] but not [D, A] on this layout.
        lib = self.library(("A", ["V"]), ("D", ["C"]), ("C", [], ["V"]), ("V", ["W"]), "W")
        for order in itertools.permutations(["A", "D"]):
            self.assertEqual(["A", "C", "D"], self.names(list(order), lib))

    def test_provided_name_never_pulls_real_element(self):
        lib = self.library(("a", ["v"]), ("p", [], ["v"]), ("v", ["heavy"]), "heavy")
        self.assertEqual(["a", "p"], self.names(["p", "a"], lib))
        # Without a provider, the real element (and its deps) comes in.
        self.assertEqual(["a", "heavy", "v"], self.names(["a"], lib))

    def test_single_provider_is_pulled_for_a_virtual_name(self):
        lib = self.library(("a", ["virt"]), ("p", [], ["virt"]))
        self.assertEqual(["a", "p"], self.names(["a"], lib))

    def test_duplicate_providers(self):
        lib = self.library(("a", [], ["v"]), ("b", [], ["v"]))
        error = self.assertRaises(elements.ElementError, elements.resolve, ["a", "b"], lib)
        self.assertIn("v is provided by both a and b", str(error))
        lib = self.library(("x", ["v"]))
        error = self.assertRaises(elements.ElementError, elements.resolve, ["x"], lib)
        self.assertIn("provided by a, b: request one of them", str(error))

    def test_request_for_a_provided_name(self):
        lib = self.library(("p", [], ["v"]), "v")
        error = self.assertRaises(elements.ElementError, elements.resolve, ["p", "v"], lib)
        self.assertIn("element v (requested) is also provided by p", str(error))

    def test_missing_element_names_who_asked(self):
        lib = self.library(("a", ["b"]), ("b", ["ghost"]))
        error = self.assertRaises(elements.ElementError, elements.resolve, ["a"], lib)
        self.assertEqual("element ghost not found (needed by b)", str(error))
        error = self.assertRaises(elements.ElementError, elements.resolve, ["nope"], lib)
        self.assertIn("element nope not found (requested on the command line)", str(error))

    def test_comments_and_blank_lines(self):
        path = make(self.tmp, "a")
        with open(os.path.join(path, "element-deps"), "w") as f:
            f.write("# the deps\n\nb  # trailing comment\n   \nc\n")
        make(self.tmp, "b")
        make(self.tmp, "c")
        self.assertEqual(["a", "b", "c"], self.names(["a"], elements.find_elements(self.tmp)))

    def test_bad_name_in_deps_names_file_and_line(self):
        path = make(self.tmp, "a")
        with open(os.path.join(path, "element-deps"), "w") as f:
            f.write("ok\nnot a name\n")
        error = self.assertRaises(elements.ElementError, elements.find_elements, self.tmp)
        self.assertIn("element-deps:2: 'not a name' is not an element name", str(error))

    def test_deterministic_and_order_independent(self):
        specs = [(f"e{i}", [f"e{(i * 7 + 3) % 40}", f"v{i % 5}"]) for i in range(40)]
        specs += [(f"p{j}", [], [f"v{j}"]) for j in range(5)]
        lib = self.library(*specs)
        requested = [f"e{i}" for i in range(0, 40, 3)] + [f"p{j}" for j in range(5)]
        first = self.names(requested, lib)
        for shift in range(1, len(requested)):
            self.assertEqual(first, self.names(requested[shift:] + requested[:shift], lib))
        self.assertEqual(first, self.names(list(reversed(requested)), lib))

    def test_long_chain(self):
        self.assertEqual(2000, len(elements.resolve(["e0"], chain_library(2000))))


class FindTest(base.TestCase):

    def test_first_on_path_wins_and_override_is_reported_once(self):
        first, second = self.path("first"), self.path("second")
        make(first, "x", readme="# x: from first\n")
        make(second, "x", readme="# x: from second\n")
        make(second, "y")
        warnings = []
        found = elements.find_elements(f"{first}:{second}", warn=warnings.append)
        self.assertEqual(os.path.join(first, "x"), found["x"].path)
        self.assertEqual("from first", found["x"].description)
        self.assertEqual(1, len([w for w in warnings if "element x" in w]))
        self.assertIn("overrides", warnings[0])
        self.assertIn("y", found)

    def test_project_elements_come_last(self):
        path = elements.search_path(self.tmp)
        self.assertEqual([self.tmp, elements.PROJECT_ELEMENTS], path)

    def test_empty_and_invalid_entries(self):
        make(self.tmp, "a")
        warnings = []
        found = elements.find_elements(f"::/does/not/exist:{self.tmp}:", warn=warnings.append)
        self.assertIn("a", found)
        self.assertEqual(["ELEMENTS_PATH entry /does/not/exist: No such file or directory, ignored"],
                         [w for w in warnings if "/does/not/exist" in w])

    def test_non_element_directories(self):
        os.makedirs(self.path("__pycache__", "mount.d"))
        os.makedirs(self.path("tests", "mount.d"))
        os.makedirs(self.path("empty"))
        os.makedirs(self.path(".hidden", "mount.d"))
        make(self.tmp, "real", hooks=["mount.d/10-x"])
        found = elements.find_elements(self.tmp)
        self.assertNotIn("__pycache__", found)
        self.assertNotIn("tests", found)
        self.assertNotIn("empty", found)
        self.assertNotIn(".hidden", found)
        self.assertIn("real", found)


class ElementInfoTest(base.TestCase):

    def setUp(self):
        super().setUp()
        make(self.tmp, "a", deps=["b"], readme="# a: first element\n\nMore text.\n",
             options=declare(COLOUR={"type": "choice", "choices": ["red", "blue"], "default": "red",
                                     "description": "the colour"}))
        make(self.tmp, "b", provides=["virt"])

    def info(self, *args, check=0):
        return self.run_bin("element-info", "--elements-path", self.tmp, *args, check=check)

    def test_list_shows_description_and_location(self):
        out = self.info().stdout
        line = [text for text in out.splitlines() if text.startswith("a ")][0]
        self.assertIn("first element", line)
        self.assertIn(os.path.join(self.tmp, "a"), line)

    def test_expand_dependencies(self):
        self.assertEqual("a b", self.info("--expand-dependencies", "a").stdout.strip())

    def test_env_is_shell_sourceable(self):
        import subprocess
        out = self.info("--env", "a").stdout
        result = subprocess.run(["bash", "-c", out + '\necho "$IMAGE_ELEMENT"; echo "$IMAGE_ELEMENT_PATHS"'],
                                stdout=subprocess.PIPE, text=True, check=True)
        names, paths = result.stdout.splitlines()
        self.assertEqual("a b", names)
        self.assertEqual(os.path.join(self.tmp, "b"), json.loads(paths)["b"])

    def test_json(self):
        data = json.loads(self.info("--json", "--expand-dependencies", "a").stdout)
        self.assertEqual(["a", "b"], [e["name"] for e in data])
        self.assertEqual([{"name": "COLOUR", "type": "choice", "choices": ["red", "blue"], "default": "red",
                           "description": "the colour"}], data[0]["options"])
        self.assertEqual([], data[1]["options"])
        self.assertEqual(["virt"], data[1]["provides"])
        self.assertEqual("first element", data[0]["description"])

    def test_list_shows_options(self):
        lines = self.info().stdout.splitlines()
        index = [i for i, line in enumerate(lines) if line.startswith("a ")][0]
        self.assertEqual("    -e COLOUR=<red|blue> (default red)  the colour", lines[index + 1])

    def test_bad_options_file_exits_2(self):
        make(self.tmp, "b", options=declare(X={"type": "nope", "description": "x"}))
        result = self.info("b", check=2)
        self.assertIn(os.path.join(self.tmp, "b", elements.OPTIONS_FILE), result.stderr)

    def test_error_exit(self):
        result = self.info("--expand-dependencies", "ghost", check=2)
        self.assertIn("element ghost not found", result.stderr)

    def test_stock_elements_all_have_readmes(self):
        found = elements.find_elements("")
        for element in found.values():
            if element.path.startswith(elements.PROJECT_ELEMENTS):
                self.assertTrue(os.path.isfile(os.path.join(element.path, "README.md")), element.path)
                self.assertTrue(element.description, f"{element.path}/README.md has no description")


OPTIONS = json.dumps({
    "COUNT": {"type": "int", "min": 1, "default": 3, "description": "how many"},
    "MODE": {"type": "choice", "choices": ["fast", "slow"], "description": "the mode"},
    "LIMIT": {"type": "size", "description": "the most bytes"},
    "STRICT": {"type": "bool", "default": False, "description": "be strict"},
    "KEY_FILE": {"type": "path", "must-exist": True, "description": "the key"},
    "REPORT": {"type": "path", "description": "where to write"},
    "NOTE": {"type": "string", "description": "free text"},
    "RATIO": {"type": "number", "description": "a ratio"},
})


def declare(**options):
    """element-options.json text: NAME={type: ..., description: ...}."""
    return json.dumps(options)


class OptionsTest(base.TestCase):

    def setUp(self):
        super().setUp()
        make(self.tmp, "a", deps=["b"], options=OPTIONS)
        make(self.tmp, "b")
        self.library = elements.find_elements(self.tmp)
        self.selected = elements.resolve(["a"], self.library)

    def check(self, **given):
        return elements.check_options(self.selected, given)

    def problems(self, **given):
        with self.assertRaises(elements.OptionError) as caught:
            self.check(**given)
        return caught.exception.problems

    def test_defaults_and_given_values(self):
        key = self.path("key")
        open(key, "w").close()
        values = self.check(MODE="slow", IMG_LIMIT="4G", STRICT="yes", KEY_FILE=key, NOTE="a b", RATIO="0.5")
        self.assertEqual({"IMG_COUNT": "3", "IMG_MODE": "slow", "IMG_LIMIT": "4G", "IMG_STRICT": "1",
                          "IMG_KEY_FILE": key, "IMG_NOTE": "a b", "IMG_RATIO": "0.5"}, values)

    def test_no_options_gives_the_defaults(self):
        self.assertEqual({"IMG_COUNT": "3", "IMG_STRICT": "0"}, self.check())

    def test_relative_path_made_absolute(self):
        self.assertEqual(os.path.join(os.getcwd(), "out.json"), self.check(REPORT="out.json")["IMG_REPORT"])

    def test_unknown_option_names_the_elements_and_a_close_match(self):
        [problem] = self.problems(COUNTT="4")
        self.assertEqual("unknown option COUNTT: not declared by any of the elements (a, b); "
                         "did you mean COUNT?", problem)

    def test_bad_values_name_element_and_option(self):
        problems = self.problems(COUNT="many", MODE="medium", LIMIT="lots", STRICT="maybe",
                                 KEY_FILE=self.path("missing"), RATIO="x", REPORT="")
        self.assertEqual([
            "option COUNT of element a: 'many' is not an integer",
            "option MODE of element a: 'medium' is not one of fast, slow",
            "option LIMIT of element a: 'lots' is not a size (like 512M, 10G, or bytes)",
            "option STRICT of element a: 'maybe' is not yes or no",
            f"option KEY_FILE of element a: {self.path('missing')}: no such file",
            "option RATIO of element a: 'x' is not a number",
            "option REPORT of element a: an empty path"], problems)

    def test_nul_byte(self):
        self.assertEqual(["option NOTE of element a: holds a NUL byte, which no environment variable can"],
                         self.problems(NOTE="a\0b"))

    def test_minimum(self):
        self.assertEqual(["option COUNT of element a: 0 is less than 1"], self.problems(COUNT="0"))

    def test_runner_variables_are_not_options(self):
        self.assertEqual(["option MOUNT_POINT: IMG_MOUNT_POINT is set by the runner, not an option"],
                         self.problems(IMG_MOUNT_POINT="/"))

    def test_core_options_need_no_declaration_but_are_checked(self):
        self.assertEqual("4G", self.check(SIZE="4G")["IMG_SIZE"])
        self.assertIn("option SIZE of element (core): 'big' is not a size", self.problems(SIZE="big")[0])

    def test_option_of_an_unselected_element_is_unknown(self):
        make(self.tmp, "c", options=declare(ONLY_C={"type": "string", "description": "c's"}))
        library = elements.find_elements(self.tmp)
        self.assertRaises(elements.OptionError, elements.check_options, elements.resolve(["a"], library),
                          {"ONLY_C": "x"})
        self.assertEqual({"IMG_ONLY_C": "x"}, elements.check_options(elements.resolve(["c"], library),
                                                                     {"ONLY_C": "x"}))

    def test_two_elements_must_declare_alike(self):
        make(self.tmp, "c", options=declare(COUNT={"type": "string", "description": "not a number here"}))
        library = elements.find_elements(self.tmp)
        with self.assertRaises(elements.OptionError) as caught:
            elements.check_options(elements.resolve(["a", "c"], library), {})
        self.assertEqual("option COUNT is declared differently by a and c", str(caught.exception))
        make(self.tmp, "d", options=declare(MODE={"type": "choice", "choices": ["fast", "slow"],
                                                  "description": "same"}))
        library = elements.find_elements(self.tmp)
        self.assertEqual("fast", elements.check_options(elements.resolve(["a", "d"], library),
                                                        {"MODE": "fast"})["IMG_MODE"])

    def test_bad_declarations_name_the_file(self):
        x = {"description": "x"}
        cases = {
            '["a list"]': "must map option names",
            declare(lower={"type": "string", **x}): "option lower: a name is upper-case",
            declare(IMG_X={"type": "string", **x}): "option IMG_X: a name is upper-case",
            declare(WORK_DIR={"type": "path", **x}): "IMG_WORK_DIR is set by the runner",
            declare(X={"type": "float", **x}): "type 'float' is not one of",
            declare(X={"type": "string"}): "needs a description",
            declare(X={"type": "string", "colour": "red", **x}): "unknown keys colour",
            declare(X={"type": "choice", **x}): "choices (a list) go with type choice",
            declare(X={"type": "string", "choices": ["a"], **x}): "choices (a list) go with type choice",
            declare(X={"type": "int", "default": "many", **x}): "default 'many' is not an integer",
            declare(X={"type": "string", "min": 1, **x}): "min is a number",
            declare(X="int"): "must be a mapping",
            '{"X": {"type": ': "cannot read",
        }
        for text, message in cases.items():
            path = make(self.tmp, "bad", options=text)
            element = elements.Element("bad", path)
            with self.assertRaises(elements.ElementError) as caught:
                element.options
            self.assertIn(os.path.join(path, elements.OPTIONS_FILE), str(caught.exception), text)
            self.assertIn(message, str(caught.exception), text)

    def test_element_without_declaration_takes_no_options(self):
        self.assertEqual({}, self.library["b"].options)


class StockOptionsTest(base.TestCase):
    """Every IMG_ variable a stock hook reads is declared, set by the runner, or set by a hook."""

    SET_BY_HOOKS = {"IMG_DISK"}  # mount-qemu-fuse sets it with img_set / set_var

    def test_stock_hooks_read_only_declared_options(self):
        import re
        library = elements.find_elements("")
        stock = [e for e in library.values() if e.path.startswith(elements.PROJECT_ELEMENTS)]
        for element in stock:
            declared = elements.declared_options(elements.resolve([element.name], library))
            for directory, _, files in os.walk(element.path):
                for name in files:
                    if name.endswith((".md", ".json")):
                        continue
                    with open(os.path.join(directory, name), errors="replace") as f:
                        text = f.read()
                    for variable in set(re.findall(r"IMG_([A-Z0-9_]+)", text)):
                        if variable in elements.RUNNER_VARIABLES or "IMG_" + variable in self.SET_BY_HOOKS:
                            continue
                        self.assertIn(variable, declared, f"{directory}/{name} reads IMG_{variable}, "
                                                          f"which {element.name} does not declare")

    def test_example_elements_declare_their_options(self):
        library = elements.find_elements(os.path.join(os.path.dirname(elements.PROJECT_ELEMENTS), "docs",
                                                      "examples"))
        selected = elements.resolve(["max-size"], library)
        self.assertEqual("1099511627776", elements.check_options(selected, {})["IMG_MAX_SIZE"])
        self.assertRaises(elements.OptionError, elements.check_options, selected, {"MAX_SIZE": "big"})

    def test_the_python_example_in_the_docs_runs(self):
        import contextlib
        import io
        import re
        with open(os.path.join(base.ROOT, "docs", "writing-elements.md")) as f:
            text = f.read()
        code = re.search(r"From Python.*?```python\n(.*?)```", text, re.S).group(1)
        namespace, out = {}, io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "docs/writing-elements.md", "exec"), namespace)
        self.assertEqual("1G", namespace["env"]["IMG_MIN_FREE_SPACE"])

    def test_numbers_must_be_finite(self):
        option = elements.Option("X", "e", "number", "x")
        for value in ("nan", "inf", "-inf"):
            self.assertRaises(ValueError, option.check, value)
        self.assertEqual("0.5", option.check("0.5"))
