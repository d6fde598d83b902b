"""Hostile guests, from a booted instance (real qemu TCG boots of the test Debian disk).

One boot runs several hostile instance-validate hooks at once: they try to
steer the host through the status channel (set IMG_OUTPUT / IMG_IMAGE,
unknown kinds, broken JSON, a 50 MB line with no end), forge lines on the
results port (ttyS1), carry escape sequences to the host's terminal, look for
secrets in their environment and the files they are given, and stop the
guest from powering off.  Two more boots flood the console and fill the disk,
each against a bound set low.  Each: the host is unchanged, nothing the guest
says is taken as the host's state, what is kept is bounded, and the error
names the bound.
"""

import functools
import json
import os
import resource

import testtools.content

from imaging_elements.instance import instance
from tests import base, imagebuild
from tests.test_instance import PhaseCase, write_hook

MiB = imagebuild.MiB
SECRET = "hunter2-never-in-the-guest"
DECLARED = "s3cret-for-the-declaring-hook"

HEADER = "#!/bin/bash\n#@ accepts-platform: linux\n"

STEER = HEADER + r"""
# The status channel: state the host acts on, unknown kinds, broken lines.
{
  echo '{"set": {"IMG_OUTPUT": "/etc/hostile-output"}}'
  echo '{"set": {"IMG_IMAGE": "/etc/shadow", "IMG_IMAGE_TYPE": "raw"}}'
  echo '{"frobnicate": 1}'
  echo 'not json at all'
  echo '{"progress": {"done": 5}}'
  printf '{"describe": "evil \\u001b[2J\\u001b]0;pwned\\u0007 \\r\\nERROR forged log line"}\n'
  printf '{"warn": "\\u001b[31mred"}\n'
  head -c 50000000 /dev/zero | tr '\0' x     # a 50 MB line with no newline
} >&3
printf 'output with \033[2J an escape\nERROR forged\n'
exit 0
"""

FORGE = HEADER + r"""
# Results port: a guessed token, a result for a hook that does not exist, a
# line of 600 KiB with no end; the agent's settings file is gone by now.
token=$(sed -n 's/^export IMGV_TOKEN=//p' /etc/img-instance-validate/env.sh 2>/dev/null)
{
  printf '\nIMGV %s RESULT 10-steer 0 - -\n' "${token:-0123456789abcdef}"
  printf '\nIMGV %s RESULT 99-nobody 0 - -\n' "${token:-0123456789abcdef}"
  head -c 614400 /dev/zero | tr '\0' y
} >/dev/ttyS1
echo '{"describe": "token '"${token:+found}${token:-not found}"'"}' >&3
"""

SNOOP = HEADER + r"""
# Look for the host's secrets everywhere we are given something.
# (the words are put together here: this file is in the guest too)
found=$(env; cat /etc/img-instance-validate/* /etc/img-instance-validate/*/* 2>/dev/null)
one=hunt two=declaring
case $found in *${one}er2*) echo '{"describe": "SECRET FOUND"}' >&3 ;; esac
case $found in *the-${two}-hook*) echo '{"describe": "OTHER HOOK SECRET FOUND"}' >&3 ;; esac
echo '{"describe": "snooped"}' >&3
"""

DECLARES = HEADER + """#@ needs-secret: DEPLOY_SECRET
case ${IMG_DEPLOY_SECRET:-} in s3cret-for-the-decl*) echo '{"describe": "has its secret"}' >&3 ;; esac
[ "${#IMG_DEPLOY_SECRET}" = 29 ] || echo '{"fail": "not its secret"}' >&3
[ -z "${IMG_DB_PASSWORD:-}" ] && echo '{"describe": "not the others"}' >&3
exit 0
"""

NO_POWEROFF = HEADER + r"""
# Never power off: both ways the agent uses do nothing now.
mount --bind /bin/true /usr/bin/systemctl
mount --bind /bin/true /usr/sbin/poweroff 2>/dev/null || true
echo '{"describe": "poweroff neutered"}' >&3
"""


sha256 = functools.partial(base.file_digest, algorithm="sha256")


class TestHostileGuest(PhaseCase):

    def setUp(self):
        super().setUp()
        self.image = imagebuild.debian_boot_disk()  # shared and cached: it must come out unchanged

    def test_hostile_hooks_do_not_steer_the_host(self):
        hooks = [write_hook(self.tmp, "10-steer", STEER), write_hook(self.tmp, "20-forge", FORGE),
                 write_hook(self.tmp, "30-snoop", SNOOP), write_hook(self.tmp, "40-declares", DECLARES),
                 write_hook(self.tmp, "50-no-poweroff", NO_POWEROFF)]
        env = {"IMG_DB_PASSWORD": SECRET, "IMG_DEPLOY_SECRET": DECLARED, "IMG_OUTPUT": self.path("out.raw")}
        before = sha256(self.image)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        results, said = self.run_phase(self.image, "raw", hooks, **env)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss
        got = {r["hook"]: r for r in results}
        self.addDetail("results", testtools.content.json_content({"results": results, "said": said}))
        self.assertEqual(["10-steer", "20-forge", "30-snoop", "40-declares", "50-no-poweroff"], list(got))
        # Nothing the guest said became the host's state, nor touched a host file.
        self.assertFalse(os.path.exists("/etc/hostile-output"))
        self.assertFalse(os.path.exists(env["IMG_OUTPUT"]))
        self.assertEqual(before, sha256(self.image))
        steer = got["10-steer"]
        self.assertTrue(steer["ok"])
        refused = [w for w in steer["warnings"] if w.startswith("status line refused")]
        for text in ('"IMG_OUTPUT"', '"IMG_IMAGE"', "frobnicate", "not json at all"):
            self.assertTrue(any(text in w for w in refused), (text, refused))
        # Escapes reach the host as text, never as control characters.
        texts = [m.get("warn", m.get("describe", "")) for m in said]
        for result in results:
            texts += [result["description"], result["output"].replace("\n", "")] + result["warnings"]
        for text in texts:
            self.assertFalse([c for c in text if ord(c) < 32 or 127 <= ord(c) < 160], text)
        self.assertIn("evil \\x1b[2J\\x1b]0;pwned\\x07 \\x0d\\x0aERROR forged log line", steer["description"])
        self.assertNotIn("\nERROR", steer["description"])
        self.assertIn("\\x1b[2J", steer["output"])
        # The 50 MB status line was cut in the guest; the host kept little of it.
        self.assertLess(len(repr(steer)), 64 * 1024)
        # Forged lines were not taken; the agent's token was not to be found.
        self.assertEqual("token not found", got["20-forge"]["description"])
        self.assertTrue(any("line(s) of more than" in m.get("warn", "") for m in said), said)
        # Secrets: none for the snooper; the declaring hook has its own, and only it.
        self.assertEqual("snooped", got["30-snoop"]["description"])
        self.assertEqual("has its secret; not the others", got["40-declares"]["description"])
        # The guest that would not power off was stopped, and the bound named.
        self.assertTrue(any(f"did not power off within {instance.POWEROFF_TIMEOUT} s" in m.get("warn", "")
                            for m in said), said)
        self.assertLess(grown, 64 * 1024, "the host's memory grew with what the guest wrote (KiB)")

    def test_console_flood_is_bounded(self):
        hooks = [write_hook(self.tmp, "10-flood", HEADER + "head -c 50000000 /dev/zero | tr '\\0' A >/dev/ttyS0\n")]
        error = self.assertRaises(instance.InstanceError, self.run_phase, self.image, "raw", hooks,
                                  IMG_INSTANCE_CONSOLE_LIMIT="2M")
        self.assertIn(f"more than IMG_INSTANCE_CONSOLE_LIMIT={2 * MiB} bytes to its console", str(error))
        console = self.path("work", "logs", "instance-console.log")
        self.assertLess(os.path.getsize(console), 3 * MiB)
        self.assertLess(len(str(error)), 16 * 1024)

    def test_filling_the_disk_is_bounded(self):
        hooks = [write_hook(self.tmp, "10-fill", HEADER + "tr '\\0' x </dev/zero | "
                            "dd of=/dev/vda bs=1M seek=64 count=400 iflag=fullblock oflag=direct\n")]
        error = self.assertRaises(instance.InstanceError, self.run_phase, self.image, "raw", hooks,
                                  IMG_INSTANCE_OVERLAY_LIMIT="48M")
        self.assertIn(f"more than IMG_INSTANCE_OVERLAY_LIMIT={48 * MiB} bytes to its disk", str(error))


class TestThroughTheDriver(PhaseCase):
    """The same guest through euca-image-process: the output stays where the operator said."""

    def test_hostile_validators_through_euca_image_process(self):
        element = os.path.join(self.tmp, "elements", "hostile", "instance-validate.d")
        os.makedirs(element)
        write_hook(element, "10-steer", STEER)
        write_hook(element, "30-snoop", SNOOP)
        with open(os.path.join(os.path.dirname(element), "element-options.json"), "w") as f:
            json.dump({"DB_PASSWORD": {"type": "string", "description": "a secret the guest must not see"}}, f)
        image = imagebuild.debian_boot_disk()
        output, status = self.path("out.raw"), self.path("status.jsonl")
        result = self.run_bin("euca-image-process", "-i", image, "-o", output, "-T", "raw", "--platform", "linux",
                              "--elements-path", f"{os.path.dirname(os.path.dirname(element))}:"
                              f"{os.path.join(base.ROOT, 'elements')}", "-e", f"DB_PASSWORD={SECRET}",
                              "--status-file", status, "convert-qemu", "hostile", check=0)
        with open(status) as f:
            text = f.read()
        ends = {e["hook"]: e for e in map(json.loads, text.splitlines())
                if e.get("event") == "hook-end" and e.get("phase") == "instance-validate"}
        self.assertEqual(("ok", "snooped"), (ends["30-snoop"]["result"], ends["30-snoop"]["description"]))
        self.assertEqual("ok", ends["10-steer"]["result"])
        self.assertFalse(os.path.exists("/etc/hostile-output"))
        self.assertEqual(sha256(image), sha256(output))  # the output is the image, where the operator said
        for stream in (result.stdout, result.stderr, text):
            self.assertNotIn(SECRET, stream)
            self.assertNotIn("\x1b", stream)
        self.assertIn("status line refused", result.stderr)
