"""The engine API (imaging_elements.api): requests, results, threads, cancel."""

import json
import os
import re
import subprocess
import sys
import threading
import time

from imaging_elements import api
from imaging_elements.engine.monitor import JsonMonitor
from tests import base, guestimages
from tests.test_runner import BASH, RunnerCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _schema():
    with open(os.path.join(ROOT, "docs", "events.md")) as f:
        return json.loads(re.search(r"```json\n(.*?)```", f.read(), re.DOTALL).group(1))


SCHEMA = _schema()
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "null": type(None)}


def check_event(name, fields):
    """The event as docs/events.md says it is."""
    spec = SCHEMA[name]
    allowed = {**spec["required"], **spec.get("optional", {})}
    missing = set(spec["required"]) - set(fields)
    assert not missing, f"{name}: missing {missing}"
    for key, value in fields.items():
        assert key in allowed, f"{name}: undocumented field {key}"
        types = tuple(JSON_TYPES[t] for t in allowed[key].split("|"))
        assert isinstance(value, types) and not (isinstance(value, bool) and bool not in types), \
            f"{name}.{key}: {value!r} is not {allowed[key]}"


class Recorder:
    """A monitor that keeps the events, checked against docs/events.md."""

    def __init__(self):
        self.events = []

    def event(self, name, **fields):
        json.dumps(fields)
        check_event(name, fields)
        self.events.append({"event": name, **fields})

    def named(self, name):
        return [e for e in self.events if e["event"] == name]


class ApiCase(RunnerCase):
    needs_root = True

    def request(self, *elements, **fields):
        fields.setdefault("elements_path", [self.elements])
        fields.setdefault("work_dir", self.work)
        return api.ProcessRequest(elements=list(elements), **fields)


class ThreadsTest(ApiCase):

    def test_two_processes_in_two_threads(self):
        # Each on its own real disk: mounted (loop devices, mounts), checked inside, converted.
        self.element("look", {"validate.d/50-look": BASH + 'test -f "$IMG_MOUNT_POINT/etc/fstab"\n'
                                                          'img_describe "root of $IMG_PLATFORM found"\n'})
        results, recorders = {}, {}

        def run(name):
            disk = guestimages.linux_disk(self.path(f"{name}.raw"), self.tmp)
            recorders[name] = Recorder()
            results[name] = api.run_process(
                self.request("mounters", "convert-qemu", "look", input=disk, output=self.path(f"{name}.qcow2"),
                             output_type="qcow2", work_dir=self.path(f"work-{name}"), scratch_limit=64 * 2**20),
                recorders[name])

        threads = [threading.Thread(target=run, args=(name,)) for name in ("one", "two")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for name in ("one", "two"):
            result = results[name]
            self.assertEqual(0, result.exit_code, result.error)
            self.assertEqual(("raw", "linux"), (result.disk_type, result.platform))
            self.assertEqual(self.path(f"{name}.qcow2"), result.output)
            self.assertEqual(os.path.getsize(result.output), result.output_size)
            self.assertEqual([{"hook": "50-look", "result": "ok", "description": "root of linux found"}],
                             result.validators)
            self.assertEqual({"mount", "validate", "convert"}, set(result.phase_durations))
            self.assertEqual("process-end", recorders[name].events[-1]["event"])
            self.assertTrue(result.released)  # its given work dir may simply be deleted
            json.dumps(result.to_json())
            info = subprocess.run(["qemu-img", "info", "--output=json", result.output],
                                  stdout=subprocess.PIPE, check=True).stdout
            self.assertEqual("qcow2", json.loads(info)["format"])
        # Signals and the subreaper flag are the guard's, never the engine's.
        self.assertFalse(api._subreaper())

    def test_cancel_from_another_thread(self):
        self.element("slow", {"mount.d/10-slow": BASH + f"echo $$ > {self.path('pid')}\nsleep 1000\n",
                              "mount.d/20-never": self.tracer(),
                              "cleanup.d/10-after": BASH + f"echo cleaned > {self.path('cleaned')}\n"})
        cancel, recorder = threading.Event(), Recorder()
        box = {}
        thread = threading.Thread(target=lambda: box.update(result=api.run_process(
            self.request("slow"), recorder, cancel)))
        thread.start()
        deadline = time.monotonic() + 10
        while not os.path.exists(self.path("pid")) and time.monotonic() < deadline:
            time.sleep(0.05)
        with open(self.path("pid")) as f:
            pid = int(f.read())
        started = time.monotonic()
        cancel.set()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertLess(time.monotonic() - started, 1.0)
        self.assertEqual((143, "cancelled"), (box["result"].exit_code, box["result"].error))
        self.assertFalse(os.path.exists(f"/proc/{pid}"), "the hook outlived the cancel")
        self.assertFalse(os.path.exists(self.trace))
        self.assertTrue(os.path.exists(self.path("cleaned")))  # cleanup.d runs, as after SIGTERM
        ends = recorder.named("hook-end")
        self.assertEqual("failed", ends[0]["result"])
        self.assertEqual("process-end", recorder.events[-1]["event"])
        self.assertEqual([], _pending(self.work))

    def test_an_undo_that_fails_is_not_released(self):
        self.element("stuck", {"mount.d/10-stuck": BASH + "img_journal_add run false >/dev/null\n"})
        result = api.run_process(self.request("stuck"))
        self.assertEqual(5, result.exit_code, result.error)
        self.assertFalse(result.released)
        self.assertEqual(["run"], [e["undo"] for e in _pending(self.work)])

    def test_cancelled_before_start_runs_nothing(self):
        self.element("a", {"mount.d/10": self.tracer()})
        cancel = threading.Event()
        cancel.set()
        result = api.run_process(self.request("a"), None, cancel)
        self.assertEqual(143, result.exit_code)
        self.assertFalse(os.path.exists(self.trace))


def _pending(work):
    from imaging_elements.sdk.journal import Journal
    return Journal(os.path.join(work, "journal.jsonl")).pending()


class RequestTest(ApiCase):

    def test_bad_values_refused_before_any_hook(self):
        self.element("a", {"mount.d/10": self.tracer()})
        for fields, words in (({"scratch_limit": "abc"}, "--scratch-limit"), ({"scratch_limit": -1}, "--scratch-limit"),
                              ({"hook_timeout": 0}, "--hook-timeout"), ({"options": {"A B": "x"}}, "-e"),
                              ({"phases": ["mount", "nosuch"]}, "nosuch"), ({"breaks": ["during-mount"]}, "during"),
                              ({"input_type": "floppy"}, "-t/--input-type"), ({"platform": "beos"}, "--platform"),
                              ({"output_type": "iso"}, "-T/--output-type"),
                              ({"options": {"IMAGE": "/etc/shadow"}}, "IMG_IMAGE is the runner's own"),
                              ({"environment": {"IMG_OUTPUT": "/etc/passwd"}}, "IMG_OUTPUT is the runner's own")):
            recorder = Recorder()
            result = api.run_process(self.request("a", **fields), recorder)
            self.assertEqual(2, result.exit_code, fields)
            self.assertIn(words, result.error)
            self.assertEqual(["process-end"], [e["event"] for e in recorder.events])
        self.assertFalse(os.path.exists(self.trace))
        self.assertEqual(2, api.run_process(api.ProcessRequest(elements=[])).exit_code)

    def test_options_and_environment_reach_the_hooks(self):
        self.element("a", {"element-options.json": '{"COLOUR": {"type": "string", "description": "a test option"}}',
                           "mount.d/10": BASH + f'echo "$IMG_COLOUR $IMG_SHAPE" > {self.path("out")}\n'})
        result = api.run_process(self.request("a", options={"COLOUR": "red"}, environment={"IMG_SHAPE": "round"}))
        self.assertEqual(0, result.exit_code, result.error)
        with open(self.path("out")) as f:
            self.assertEqual("red round\n", f.read())


class RecordTest(base.TestCase):
    """ProcessRequest and ProcessResult behave as the dataclasses they replace."""

    def test_fields_defaults_and_copies(self):
        request = api.ProcessRequest(["a"], input="disk.img")
        self.assertEqual(["a"], request.elements)
        self.assertEqual("auto", request.platform)
        request.breaks.append("after-mount")
        self.assertEqual([], api.ProcessRequest(["b"]).breaks)  # a default list is never shared
        self.assertEqual(api.ProcessRequest(elements=["a"], input="disk.img", breaks=["after-mount"]), request)
        self.assertNotEqual(api.ProcessRequest(["a"]), request)
        self.assertIn("input='disk.img'", repr(request))
        self.assertRaises(TypeError, api.ProcessRequest)
        self.assertRaises(TypeError, api.ProcessRequest, ["a"], elements=["b"])
        self.assertRaises(TypeError, api.ProcessRequest, ["a"], inptu="x")
        result = api.ProcessResult(0, validators=[{"hook": "v", "result": "ok"}])
        data = result.to_json()
        self.assertEqual({"exit_code", "error", "disk_type", "platform", "output", "output_size", "validators",
                          "inspection_report", "phase_durations", "released"}, set(data))
        data["validators"][0]["result"] = "failed"
        self.assertEqual("ok", result.validators[0]["result"])  # a copy, as dataclasses.asdict made
        self.assertEqual(data, json.loads(json.dumps(data)))


class StatusMessageTest(ApiCase):

    def test_malformed_status_lines_are_warnings(self):
        lines = ['{"progress": {"done": 5}}', '{"progress": {"done": "x", "total": 9}}', '{"progress": 3}',
                 '[1, 2]', '"text"', '{"describe": "a", "warn": "b"}', 'not json {', '{"nosuch": 1}',
                 '{"set": "IMG_X"}', '{"set": {"IMG_A": 5}}', '{"describe": {"x": 1}}', '[' * 100000]
        script = "".join(f"printf '%s\\n' {_quote(line)} >&$IMG_STATUS_FD\n" for line in lines)
        self.element("a", {"mount.d/10-bad": BASH + script + 'img_describe "still here"\n',
                           "mount.d/20-next": self.tracer()})
        recorder = Recorder()
        result = api.run_process(self.request("a"), recorder)
        self.assertEqual(0, result.exit_code, result.error)
        warnings = [w["message"] for w in recorder.named("warning")]
        self.assertEqual(len(lines), len(warnings), warnings)
        for warning in warnings:
            self.assertIn("mount/10-bad (a)", warning)
            self.assertNotIn("Traceback", warning)
        self.assertEqual([], recorder.named("progress"))
        self.assertEqual(["ok", "ok"], [e["result"] for e in recorder.named("hook-end")])
        self.assertEqual("still here", recorder.named("hook-end")[0]["description"])
        self.assertEqual(["20-next"], self.traced())
        self.assertEqual("process-end", recorder.events[-1]["event"])

    def test_good_progress_still_reported(self):
        self.element("a", {"mount.d/10": BASH + "img_progress 5 10\n"})
        recorder = Recorder()
        self.assertEqual(0, api.run_process(self.request("a"), recorder).exit_code)
        self.assertEqual([(5, 10)], [(e["done"], e["total"]) for e in recorder.named("progress")])


def _quote(text):
    return "'" + text.replace("'", "'\\''") + "'"


class GuardTest(base.TestCase):

    def test_guard_only_in_the_main_thread(self):
        errors = []

        def enter():
            try:
                with api.ProcessGuard():
                    pass
            except RuntimeError as exc:
                errors.append(str(exc))

        thread = threading.Thread(target=enter)
        thread.start()
        thread.join()
        self.assertIn("main thread", errors[0])

    def test_guard_sets_and_restores_the_subreaper(self):
        before = api._subreaper()
        with api.ProcessGuard() as guard:
            self.assertTrue(api._subreaper())
            self.assertFalse(guard.cancel.is_set())
        self.assertEqual(before, api._subreaper())


class DocsTest(ApiCase):

    def test_docs_example_runs(self):
        # The first python block of docs/api.md, as written, in a fresh interpreter.
        with open(os.path.join(ROOT, "docs", "api.md")) as f:
            example = re.search(r"```python\n(.*?)```", f.read(), re.DOTALL).group(1)
        disk = guestimages.linux_disk(self.path("disk.raw"), self.tmp)
        result = subprocess.run([sys.executable, "-c", example], cwd=self.tmp, capture_output=True, check=False,
                                text=True, env=dict(os.environ, DISK=disk, TMPDIR=self.tmp))
        self.assertEqual(0, result.returncode, result.stderr)
        printed = json.loads(result.stdout.splitlines()[-1])
        self.assertEqual(0, printed["exit_code"])
        self.assertEqual("linux", printed["platform"])


class CommandLineTest(ApiCase):

    def test_result_json_and_stream_end(self):
        self.element("a", {"validate.d/10-v": BASH + "img_describe fine\n"})
        self.process("a", "--result-json", self.path("result.json"), check=0)
        with open(self.path("result.json")) as f:
            result = json.load(f)
        self.assertEqual(0, result["exit_code"])
        self.assertEqual([{"hook": "10-v", "result": "ok", "description": "fine"}], result["validators"])
        self.assertEqual("process-end", self.events()[-1]["event"])
        self.assertEqual(1, len(self.events("process-end")))
        for record in self.events():
            check_event(record.pop("event"), {k: v for k, v in record.items() if k != "time"})

    def test_bad_option_value_is_usage_error(self):
        self.element("a", {"mount.d/10": self.tracer()})
        result = self.process("a", "--scratch-limit", "abc", "--result-json", self.path("r.json"), check=2)
        self.assertIn("--scratch-limit: 'abc' is not a size", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(["process-end"], [e["event"] for e in self.events()])
        with open(self.path("r.json")) as f:
            self.assertEqual(2, json.load(f)["exit_code"])
        self.assertFalse(os.path.exists(self.trace))


class MonitorTest(base.TestCase):

    def test_json_monitor_lines_cannot_be_forged(self):
        path = self.path("events")
        with open(path, "w") as f:
            JsonMonitor(f).event("log", message='x\n{"event": "process-end"}\x1b]0;t\x07')
        with open(path) as f:
            self.assertEqual(1, len(f.read().splitlines()))

    def test_monitor_options_checked(self):
        for args, words in ((("--status-fd", "abc"), "--status-fd abc: invalid literal"),
                            (("--log-file", self.path("no", "log")), "No such file or directory"),
                            (("--result-json", self.path("no", "r.json")), "is not a writable directory")):
            result = self.run_bin("euca-image-process", *args, "a", check=2)
            self.assertIn(words, result.stderr)
            self.assertNotIn("Traceback", result.stderr)
