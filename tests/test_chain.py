"""The chain planner (chain.py) on real hooks with declared headers."""

import os

import fixtures
import testtools

from imaging_elements.engine import chain, hooks, runner

PHASE = {p.name: p for p in runner.PHASES}


class PlanTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.dir = self.useFixture(fixtures.TempDir()).path
        self.asked = []

    def hook(self, phase, name, **header):
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            f.write("#!/bin/bash\n" + "".join(f"#@ {k.replace('_', '-')}: {v}\n" for k, v in header.items()))
        os.chmod(path, 0o755)
        return hooks.Hook(phase, name, path, "el-" + name)

    def accepts(self, phase):
        src_key, dst_key = PHASE[phase].context

        def accepts(hook, s, d):
            self.asked.append((hook.name, s, d))
            return hooks.static_accepts(hook, {src_key: s, dst_key: d}, None)[0]
        return accepts

    def plan(self, phase, hooks_here, source, target):
        steps = chain.plan(PHASE[phase], hooks_here, source, target, self.accepts(phase), ["a", "b"])
        return [(h.name, s, d) for h, s, d in steps]

    def test_shortest_chain_through_a_hub(self):
        to_raw = self.hook("convert", "10-to-raw", accepts_source_type="vmdk vhd", accepts_dest_type="raw")
        from_raw = self.hook("convert", "20-from-raw", accepts_source_type="raw", accepts_dest_type="qcow2 vhd")
        self.assertEqual([("10-to-raw", "vmdk", "raw"), ("20-from-raw", "raw", "qcow2")],
                         self.plan("convert", [to_raw, from_raw], "vmdk", "qcow2"))

    def test_one_hook_for_the_whole_way_wins_over_a_chain(self):
        to_raw = self.hook("convert", "10-to-raw", accepts_source_type="vmdk", accepts_dest_type="raw")
        from_raw = self.hook("convert", "20-from-raw", accepts_source_type="raw", accepts_dest_type="qcow2")
        direct = self.hook("convert", "90-direct", accepts_source_type="vmdk", accepts_dest_type="qcow2")
        self.assertEqual([("90-direct", "vmdk", "qcow2")],
                         self.plan("convert", [to_raw, from_raw, direct], "vmdk", "qcow2"))

    def test_shorter_chain_wins_over_a_longer_one(self):
        a = self.hook("convert", "10-a", accepts_source_type="vmdk", accepts_dest_type="vdi")
        b = self.hook("convert", "20-b", accepts_source_type="vdi", accepts_dest_type="vhd")
        c = self.hook("convert", "30-c", accepts_source_type="vhd vmdk", accepts_dest_type="raw")
        d = self.hook("convert", "40-d", accepts_source_type="raw", accepts_dest_type="qcow2")
        self.assertEqual([("30-c", "vmdk", "raw"), ("40-d", "raw", "qcow2")],
                         self.plan("convert", [a, b, c, d], "vmdk", "qcow2"))

    def test_ties_go_to_hook_order(self):
        first = self.hook("convert", "10-first", accepts_source_type="raw", accepts_dest_type="qcow2")
        second = self.hook("convert", "20-second", accepts_source_type="raw", accepts_dest_type="qcow2")
        self.assertEqual([("10-first", "raw", "qcow2")], self.plan("convert", [first, second], "raw", "qcow2"))
        self.assertEqual([("20-second", "raw", "qcow2")], self.plan("convert", [second, first], "raw", "qcow2"))

    def test_each_step_is_asked_once(self):
        to_raw = self.hook("convert", "10-to-raw", accepts_source_type="vmdk", accepts_dest_type="raw")
        from_raw = self.hook("convert", "20-from-raw", accepts_source_type="raw", accepts_dest_type="qcow2")
        self.plan("convert", [to_raw, from_raw], "vmdk", "qcow2")
        self.assertEqual(len(self.asked), len(set(self.asked)))

    def test_crypt_pair_rule_goes_through_none(self):
        # A hook that accepts every pair still only encrypts or decrypts.
        any_ = self.hook("crypt", "10-any", accepts_source_crypt="*", accepts_dest_crypt="aes128 aes256 none")
        self.assertEqual([("10-any", "aes128", "none"), ("10-any", "none", "aes256")],
                         self.plan("crypt", [any_], "aes128", "aes256"))
        self.assertNotIn(("10-any", "aes128", "aes256"), self.asked)

    def test_impossible_plan_names_the_elements_and_the_types(self):
        to_raw = self.hook("convert", "10-to-raw", accepts_source_type="vmdk", accepts_dest_type="raw")
        error = self.assertRaises(chain.PlanError, self.plan, "convert", [to_raw], "vmdk", "qcow2")
        self.assertEqual("convert: no hook of the elements (a, b) converts vmdk to qcow2, alone or in a chain",
                         str(error))


class TargetTest(testtools.TestCase):

    def test_targets(self):
        env = {"IMG_OUTPUT": "/o", "IMG_OUTPUT_TYPE": "bundle", "IMG_IMAGE_TYPE": "vmdk"}
        self.assertEqual(("vmdk", "raw"), chain.target(PHASE["convert"], env))
        self.assertEqual(("vmdk", "bundle"), chain.target(PHASE["bundle"], env))
        self.assertIsNone(chain.target(PHASE["crypt"], env))
        env.update(IMG_IMAGE_TYPE="raw")
        self.assertIsNone(chain.target(PHASE["convert"], env))
        env.update(IMG_OUTPUT_TYPE="qcow2", IMG_OUTPUT_CRYPT="aes128")
        self.assertEqual(("raw", "qcow2"), chain.target(PHASE["convert"], env))
        self.assertEqual(("none", "aes128"), chain.target(PHASE["crypt"], env))
        self.assertIsNone(chain.target(PHASE["bundle"], env))
        self.assertIsNone(chain.target(PHASE["convert"], {}))

    def test_last_writer(self):
        env = {"IMG_OUTPUT": "/o", "IMG_OUTPUT_TYPE": "bundle", "IMG_IMAGE_TYPE": "vmdk"}
        names = {p.name for p in runner.PHASES}
        self.assertFalse(chain.is_last_writer(PHASE["convert"], runner.PHASES, names, env))
        self.assertTrue(chain.is_last_writer(PHASE["convert"], runner.PHASES, names - {"bundle"}, env))
        self.assertTrue(chain.is_last_writer(PHASE["bundle"], runner.PHASES, names, env))
