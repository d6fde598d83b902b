"""The EC2 import manifest: built as euca2ools builds it, parsed as untrusted XML."""

import testtools

from imaging_service import manifest
from imaging_service.manifest import ImportManifest, ManifestError, Part

MiB = 1024 * 1024


def sample(size=25 * MiB, part=10 * MiB, fmt="VMDK"):
    parts = []
    for index, start in enumerate(range(0, size, part)):
        end = min(start + part, size) - 1
        parts.append(Part(index, start, end, f"disk.vmdk.part.{index}", f"http://s3/b/p{index}?head",
                          f"http://s3/b/p{index}?get", f"http://s3/b/p{index}?delete"))
    return ImportManifest(fmt, size, 1, parts, "http://s3/b/manifest?delete")


class TestManifest(testtools.TestCase):

    def test_round_trip(self):
        m = sample()
        data = manifest.build(m)
        self.assertIn(b"<version>2010-11-15</version>", data)
        self.assertIn(b'<parts count="3">', data)
        self.assertIn(b'<byte-range start="10485760" end="20971519" />', data)
        self.assertEqual(m, manifest.parse(data))

    def test_euca2ools_layout(self):
        """A manifest as ec2-upload-disk-image / euca2ools write it (attribute order end, start)."""
        data = b"""<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<manifest>
    <version>2010-11-15</version>
    <file-format>VHD</file-format>
    <importer><name>ec2-upload-disk-image</name><version>1.0.0</version><release>2010-11-15</release></importer>
    <self-destruct-url>https://s3/b/m.xml?AWSAccessKeyId=A&amp;Expires=1&amp;Signature=s</self-destruct-url>
    <import>
        <size>12</size>
        <volume-size>20</volume-size>
        <parts count="2">
            <part index="1"><byte-range end="11" start="6"/><key>t.part1</key>
                <head-url>https://s3/b/t.part1?h</head-url><get-url>https://s3/b/t.part1?g</get-url></part>
            <part index="0"><byte-range end="5" start="0"/><key>t.part0</key>
                <get-url>https://s3/b/t.part0?g</get-url></part>
        </parts>
    </import>
</manifest>"""
        m = manifest.parse(data)
        self.assertEqual(("VHD", 12, 20), (m.file_format, m.size, m.volume_size))
        self.assertEqual([0, 1], [p.index for p in m.parts])
        self.assertEqual([6, 6], [p.size for p in m.parts])
        self.assertEqual("https://s3/b/m.xml?AWSAccessKeyId=A&Expires=1&Signature=s", m.self_destruct_url)
        self.assertEqual(("ec2-upload-disk-image", "1.0.0", "2010-11-15"), m.importer)

    def refused(self, data, pattern):
        e = self.assertRaises(ManifestError, manifest.parse, data)
        self.assertRegex(str(e), pattern)

    def test_entity_bomb_and_external_entities_refused(self):
        bomb = (b'<?xml version="1.0"?><!DOCTYPE manifest [<!ENTITY a "aaaaaaaaaa">'
                + b"".join(b'<!ENTITY %c "&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;&%c;">' % ((c,) + (c - 1,) * 10)
                           for c in range(ord("b"), ord("k")))
                + b"]><manifest><version>&j;</version></manifest>")
        self.refused(bomb, "DTD or entities")
        self.refused(b'<?xml version="1.0"?><!DOCTYPE m [<!ENTITY x SYSTEM "file:///etc/shadow">]>'
                     b"<manifest>&x;</manifest>", "DTD or entities")
        self.refused(b"<manifest>" + b" " * manifest.MAX_MANIFEST + b"</manifest>", "more than")
        self.refused(b"<manifest><version>", "not well-formed")

    def test_sizes_checked_against_parts(self):
        def tamper(old, new):
            return manifest.build(sample()).replace(old, new)
        self.refused(tamper(b"<size>26214400</size>", b"<size>26214401</size>"),
                     "parts cover 26214400 bytes but import/size says 26214401")
        self.refused(tamper(b'start="10485760" end="20971519"', b'start="10485761" end="20971519"'),
                     "part 1 starts at byte 10485761, expected 10485760")
        self.refused(tamper(b'count="3"', b'count="4"'), "parts count is 4 but the manifest lists 3")
        self.refused(tamper(b'<part index="2">', b'<part index="1">'), "part 1 is listed twice")
        self.refused(tamper(b'<part index="2">', b'<part index="5">'), "part 2 is missing")
        self.refused(tamper(b'end="26214399"', b'end="-1"'), "part 2 byte-range end: -1 is less than 0")
        self.refused(tamper(b"<volume-size>1</volume-size>", b"<volume-size>x</volume-size>"),
                     "import/volume-size: 'x' is not a whole number")
        self.refused(tamper(b"<file-format>VMDK</file-format>", b"<file-format>QCOW9</file-format>"),
                     "file-format 'QCOW9' is not one of")
        self.refused(tamper(b"<version>2010-11-15</version>", b"<version>2099-01-01</version>"),
                     "version '2099-01-01' is not supported")
        big = sample(size=3 * 1024 ** 3, part=1024 ** 3)
        big.volume_size = 2
        self.refused(manifest.build(big), "volume-size 2 GiB is smaller than the image")

    def test_urls_listed_for_the_host_check(self):
        where = [w for w, _ in sample().urls()]
        self.assertEqual("self-destruct-url", where[0])
        self.assertIn("part 2 get-url", where)
