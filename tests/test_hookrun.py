"""Running one hook (hookrun.py): the line reader, the status channel, time limits, with real processes."""

import os
import time

from imaging_elements.engine import hookrun, hooks
from tests import base
from tests.hookcall import Events


class LineReaderTest(base.TestCase):

    def test_lines_split_and_cut(self):
        reader = hookrun.LineReader()
        self.assertEqual([b"one", b"two"], reader.feed(b"one\ntwo\nthr"))
        self.assertTrue(reader.pending())
        self.assertEqual([b"three"], reader.feed(b"ee\n"))
        long = reader.feed(b"x" * (3 * hookrun.MAX_LINE) + b"\n")
        self.assertEqual([b"x" * hookrun.MAX_LINE + b" [line cut]"], long)
        self.assertFalse(reader.pending())


class ChannelTest(base.TestCase):

    def setUp(self):
        super().setUp()
        path = self.path("10-hook")
        with open(path, "w") as f:
            f.write("#!/bin/bash\n")
        self.hook = hooks.Hook("mount", "10-hook", path, "el")
        self.monitor, self.warnings, self.variables = Events(), [], {}

    def channel(self, inside=False, settable=()):
        return hookrun.Channel(self.monitor, self.warnings.append, "mount", self.hook, self.variables,
                               lambda n, v: hookrun.may_set(n, v, settable, {"IMG_WORK_DIR", "IMG_DISK"}),
                               inside=inside)

    def test_malformed_lines_warn_naming_the_hook(self):
        channel = self.channel()
        for line in ('{"progress": {"done": 5}}', "[1]", "not json", '{"frob": 1}', '{"a": 1, "b": 2}',
                     '{"describe": {"x": 1}}', "[" * 100000):
            channel.message(line)
        self.assertEqual(7, len(self.warnings))
        self.assertTrue(all(w.startswith("mount/10-hook (el): ") for w in self.warnings), self.warnings)
        self.assertEqual([], self.monitor.named("progress"))

    def test_describe_fail_progress(self):
        channel = self.channel()
        channel.message('{"describe": "a"}')
        channel.message('{"progress": {"done": 1, "total": 2}}')
        channel.message('{"bad-input": "broken"}')
        self.assertEqual((["a"], "broken", True), (channel.describe, channel.fail, channel.bad_input))
        self.assertEqual([{"phase": "mount", "hook": "10-hook", "done": 1, "total": 2}],
                         self.monitor.named("progress"))

    def test_set_rules(self):
        self.channel(settable={"IMG_DISK"}).message('{"set": {"IMG_DISK": "/dev/x", "IMG_WORK_DIR": "/", '
                                                    '"PATH": "/x", "IMG_OK": "1"}}')
        self.assertEqual({"IMG_DISK": "/dev/x", "IMG_OK": "1"}, self.variables)
        self.assertEqual(2, len(self.warnings))
        self.channel(inside=True).message('{"set": {"IMG_OTHER": "1"}}')
        self.assertNotIn("IMG_OTHER", self.variables)

    def test_warnings_are_bounded(self):
        channel = self.channel()
        for _ in range(hookrun.MAX_WARN + 50):
            channel.message("junk")
        self.assertEqual(hookrun.MAX_WARN + 1, len(self.warnings))


class FollowTest(base.TestCase):
    needs_root = True  # the leak check of helper processes

    def run_script(self, script, limit=30, cancel_point=lambda: None):
        path = self.path("10-hook")
        with open(path, "w") as f:
            f.write("#!/bin/bash\n" + script)
        os.chmod(path, 0o755)
        hook = hooks.Hook("mount", "10-hook", path, "el")
        monitor, warnings = Events(), []
        channel = hookrun.Channel(monitor, warnings.append, "mount", hook, {}, lambda n, v: None)
        process, status = hookrun.spawn([path], dict(os.environ))
        try:
            tail = hookrun.follow(process, status, channel, limit, cancel_point, lambda t: t.replace("pw", "**"))
        finally:
            if process.poll() is None:
                hookrun.stop(process)
        return process, tail, channel, monitor

    def test_output_and_status(self):
        process, tail, channel, monitor = self.run_script(
            'echo hello pw; echo \'{"describe": "done"}\' >&$IMG_STATUS_FD; exit 4\n')
        self.assertEqual((4, ["hello **"], ["done"]), (process.returncode, tail, channel.describe))
        self.assertIn({"level": "INFO", "message": "10-hook: hello **"}, monitor.named("log"))

    def test_time_limit_stops_the_hook_group(self):
        started = time.monotonic()
        self.assertRaises(hookrun.TimedOut, self.run_script, "sleep 100 & sleep 100\n", limit=0.5)
        self.assertLess(time.monotonic() - started, 10)

    def test_hook_gets_only_its_own_descriptors(self):
        # An inheritable descriptor of the runner (one its own parent passed it) is
        # not the hook's; its status fd, stdin /dev/null and one output pipe are.
        leaked_read, leaked_write = os.pipe()
        os.set_inheritable(leaked_write, True)
        self.addCleanup(os.close, leaked_read)
        self.addCleanup(os.close, leaked_write)
        process, tail, channel, monitor = self.run_script(
            f'[ -e /proc/self/fd/{leaked_write} ] && echo leaked\n'
            'echo "$(readlink /proc/self/fd/0) $(readlink /proc/self/fd/1 | cut -d: -f1)'
            ' $(readlink /proc/self/fd/2 | cut -d: -f1)"\n'
            'echo \'{"describe": "status"}\' >&$IMG_STATUS_FD\n')
        self.assertEqual((0, ["/dev/null pipe pipe"], ["status"]), (process.returncode, tail, channel.describe))

    def test_hook_has_sigpipe_at_its_default(self):
        # Python ignores SIGPIPE; a hook must not (`yes | head` ends by it).
        process, tail, channel, monitor = self.run_script(
            "grep SigIgn /proc/self/status\n")
        [line] = tail
        ignored = int(line.split()[1], 16)
        self.assertFalse(ignored & (1 << (13 - 1)), line)  # SIGPIPE is 13

    def test_a_missing_hook_does_not_start(self):
        self.assertRaises(hookrun.HookStartError, hookrun.spawn, [self.path("absent")], dict(os.environ))

    def test_cancel_point_stops_following(self):
        def cancel():
            raise KeyboardInterrupt()
        self.assertRaises(KeyboardInterrupt, self.run_script, "sleep 100\n", cancel_point=cancel)

    def test_said(self):
        self.assertEqual((3, "bad"), hookrun.said('/x/hook: {"bad-input": "bad"}\nbad'))
        self.assertEqual((1, "plain"), hookrun.said("plain"))
