"""The EC2 import manifest (version 2010-11-15), as euca2ools and
ec2-upload-disk-image write it for ImportVolume / ImportInstance:

    <manifest><version>2010-11-15</version><file-format>VMDK</file-format>
      <importer><name/><version/><release/></importer>
      <self-destruct-url/>
      <import><size>BYTES</size><volume-size>GiB</volume-size>
        <parts count="N"><part index="0"><byte-range start="0" end="..."/>
          <key/><head-url/><get-url/><delete-url/></part>...</parts></import></manifest>

A manifest comes from a user: it is parsed with defusedxml with no DTD
allowed (so no entity expansion at all), bounded in size, and every number in
it is checked against the others before a byte is fetched.
"""

import dataclasses
import os
import xml.etree.ElementTree as ET

import defusedxml.ElementTree

VERSION = "2010-11-15"
FORMATS = ("RAW", "VMDK", "VHD")
MAX_MANIFEST = 4 * 1024 * 1024  # 10 MiB parts of a 16 TiB disk fit in well under this
MAX_PARTS = 100_000
GiB = 1024 ** 3


class ManifestError(ValueError):
    """The manifest is not acceptable; the message says where and why."""


@dataclasses.dataclass
class Part:
    index: int
    start: int
    end: int  # inclusive, as in the manifest
    key: str
    head_url: str | None = None
    get_url: str | None = None
    delete_url: str | None = None

    @property
    def size(self):
        return self.end - self.start + 1


@dataclasses.dataclass
class ImportManifest:
    file_format: str
    size: int
    volume_size: int  # GiB
    parts: list
    self_destruct_url: str | None = None
    importer: tuple = ("imaging-service", "1.0", VERSION)

    def urls(self):
        """Every URL in the manifest, with where it is (for the allowed-host check)."""
        found = [("self-destruct-url", self.self_destruct_url)]
        for p in self.parts:
            found += [(f"part {p.index} {name}", url) for name, url in
                      (("head-url", p.head_url), ("get-url", p.get_url), ("delete-url", p.delete_url))]
        return [(where, url) for where, url in found if url]


def _text(element, path, where):
    child = element.find(path)
    if child is None or child.text is None or not child.text.strip():
        raise ManifestError(f"{where}: <{path}> is missing")
    return child.text.strip()


def _int(text, where, minimum=0):
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ManifestError(f"{where}: {text!r} is not a whole number") from None
    if value < minimum:
        raise ManifestError(f"{where}: {value} is less than {minimum}")
    return value


def parse(data):
    """An ImportManifest from the bytes of a manifest, or ManifestError."""
    if len(data) > MAX_MANIFEST:
        raise ManifestError(f"the manifest is {len(data)} bytes, more than the {MAX_MANIFEST} allowed")
    try:
        root = defusedxml.ElementTree.fromstring(data, forbid_dtd=True, forbid_entities=True,
                                                 forbid_external=True)
    except defusedxml.DefusedXmlException as e:
        raise ManifestError(f"the manifest uses a DTD or entities, which are refused: {e}") from None
    except ET.ParseError as e:
        raise ManifestError(f"the manifest is not well-formed XML: {e}") from None
    if root.tag != "manifest":
        raise ManifestError(f"the root element is <{root.tag}>, not <manifest>")
    version = _text(root, "version", "manifest")
    if version != VERSION:
        raise ManifestError(f"manifest version {version!r} is not supported (only {VERSION})")
    file_format = _text(root, "file-format", "manifest").upper()
    if file_format not in FORMATS:
        raise ManifestError(f"file-format {file_format!r} is not one of {', '.join(FORMATS)}")
    importer = root.find("importer")
    importer = tuple((importer.findtext(k) or "").strip() for k in ("name", "version", "release")) \
        if importer is not None else ("", "", "")
    size = _int(_text(root, "import/size", "manifest"), "import/size", 1)
    volume_size = _int(_text(root, "import/volume-size", "manifest"), "import/volume-size", 1)
    parts_element = root.find("import/parts")
    if parts_element is None:
        raise ManifestError("manifest: <import/parts> is missing")
    count = _int(parts_element.get("count"), "parts count", 1)
    elements = parts_element.findall("part")
    if count > MAX_PARTS or len(elements) > MAX_PARTS:
        raise ManifestError(f"more than {MAX_PARTS} parts")
    if len(elements) != count:
        raise ManifestError(f"parts count is {count} but the manifest lists {len(elements)} part(s)")
    parts = {}
    for element in elements:
        index = _int(element.get("index"), "part index")
        where = f"part {index}"
        if index in parts:
            raise ManifestError(f"{where} is listed twice")
        byte_range = element.find("byte-range")
        if byte_range is None:
            raise ManifestError(f"{where}: <byte-range> is missing")
        start = _int(byte_range.get("start"), f"{where} byte-range start")
        end = _int(byte_range.get("end"), f"{where} byte-range end")
        if end < start:
            raise ManifestError(f"{where}: byte-range end {end} is before start {start}")
        parts[index] = Part(index, start, end, _text(element, "key", where),
                            (element.findtext("head-url") or "").strip() or None,
                            _text(element, "get-url", where),
                            (element.findtext("delete-url") or "").strip() or None)
    ordered = []
    offset = 0
    for index in range(count):
        part = parts.get(index)
        if part is None:
            raise ManifestError(f"part {index} is missing from the manifest (parts count is {count})")
        if part.start != offset:
            raise ManifestError(f"part {index} starts at byte {part.start}, expected {offset} "
                                f"(the parts must cover the image without gaps or overlaps)")
        offset = part.end + 1
        ordered.append(part)
    if offset != size:
        raise ManifestError(f"the parts cover {offset} bytes but import/size says {size}")
    if volume_size * GiB < size:
        raise ManifestError(f"volume-size {volume_size} GiB is smaller than the image ({size} bytes)")
    return ImportManifest(file_format, size, volume_size, ordered,
                          (root.findtext("self-destruct-url") or "").strip() or None, importer)


def build(manifest):
    """The XML bytes of an ImportManifest, as euca2ools writes them."""
    root = ET.Element("manifest")
    ET.SubElement(root, "version").text = VERSION
    ET.SubElement(root, "file-format").text = manifest.file_format
    importer = ET.SubElement(root, "importer")
    for name, value in zip(("name", "version", "release"), manifest.importer):
        ET.SubElement(importer, name).text = value
    if manifest.self_destruct_url:
        ET.SubElement(root, "self-destruct-url").text = manifest.self_destruct_url
    imp = ET.SubElement(root, "import")
    ET.SubElement(imp, "size").text = str(manifest.size)
    ET.SubElement(imp, "volume-size").text = str(manifest.volume_size)
    parts = ET.SubElement(imp, "parts", count=str(len(manifest.parts)))
    for p in manifest.parts:
        element = ET.SubElement(parts, "part", index=str(p.index))
        ET.SubElement(element, "byte-range", start=str(p.start), end=str(p.end))
        ET.SubElement(element, "key").text = p.key
        for name, url in (("head-url", p.head_url), ("get-url", p.get_url), ("delete-url", p.delete_url)):
            if url:
                ET.SubElement(element, name).text = url
    ET.indent(root)
    return b'<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n' + ET.tostring(root) + b"\n"


def upload(store, path, bucket, prefix, file_format, part_size=10 * 1024 * 1024, expires=7 * 86400):
    """Upload `path` in parts and its manifest, as euca-import-volume does.

    `store` is an ObjectStore with the uploader's keys; returns (manifest key,
    presigned GET URL of the manifest)."""
    size = os.path.getsize(path)
    parts = []
    base = os.path.basename(path)
    with open(path, "rb") as f:
        for index, start in enumerate(range(0, size, part_size)):
            data = f.read(part_size)
            key = f"{prefix}{base}.part.{index}"
            store.put_bytes(data, bucket, key)
            parts.append(Part(index, start, start + len(data) - 1, key,
                              store.presign("head_object", bucket, key, expires),
                              store.presign("get_object", bucket, key, expires),
                              store.presign("delete_object", bucket, key, expires)))
    manifest_key = f"{prefix}{base}.manifest.xml"
    manifest = ImportManifest(file_format.upper(), size, max(1, -(-size // GiB)), parts,
                              store.presign("delete_object", bucket, manifest_key, expires),
                              ("euca-import-volume", "3.4", VERSION))
    store.put_bytes(build(manifest), bucket, manifest_key)
    return manifest_key, store.presign("get_object", bucket, manifest_key, expires)
