"""What kind of image a file is, read from its content (magic numbers).

Types: raw (a whole disk with an MBR or GPT), partition (a bare filesystem:
the AMI case), vmdk, qcow2, vhd, vhdx, bundle (an EC2 bundle manifest), and
unknown.  A VMDK descriptor (the text file of a monolithicFlat disk) is vmdk.
"""

import json
import os

TYPES = ("raw", "partition", "vmdk", "qcow2", "vhd", "vhdx", "bundle")

# (offset, magic, filesystem) for bare filesystems, checked before the MBR
# signature because a filesystem's boot sector may carry 0x55AA too.
FILESYSTEMS = (
    (1080, b"\x53\xef", "ext"),
    (0, b"XFSB", "xfs"),
    (65600, b"_BHRfS_M", "btrfs"),
    (3, b"NTFS    ", "ntfs"),
    (0, b"hsqs", "squashfs"),
    (82, b"FAT32   ", "vfat"),
    (54, b"FAT16   ", "vfat"),
    (54, b"FAT12   ", "vfat"),
)


class ImageTypeError(Exception):
    pass


def filesystem(head):
    """The filesystem whose superblock magic `head` (the first 64 KiB+) holds, or None."""
    for offset, magic, name in FILESYSTEMS:
        if head[offset:offset + len(magic)] == magic:
            return name
    return None


def detect(path):
    """The type of the image at `path`; raises ImageTypeError naming the file."""
    try:
        with open(path, "rb") as f:
            head = f.read(65536 + 4096)
            size = os.fstat(f.fileno()).st_size
            f.seek(max(size - 512, 0))
            tail = f.read(512)
    except OSError as exc:
        raise ImageTypeError(f"{path}: cannot read: {exc.strerror}") from exc
    if not head:
        raise ImageTypeError(f"{path}: the file is empty")
    if head.startswith(b"QFI\xfb"):
        return "qcow2"
    if head.startswith(b"KDMV") or head.startswith(b"# Disk DescriptorFile"):
        return "vmdk"
    if head.startswith(b"vhdxfile"):
        return "vhdx"
    if tail.startswith(b"conectix") or head.startswith(b"conectix"):
        return "vhd"
    if b"<manifest>" in head[:4096] and head.lstrip().startswith(b"<"):
        return "bundle"
    if filesystem(head):
        return "partition"
    if head[512:520] == b"EFI PART" or head[510:512] == b"\x55\xaa":
        return "raw"
    return "unknown"


# qemu-img's names for the formats the project handles.
QEMU_FORMATS = {"vmdk": "vmdk", "qcow2": "qcow2", "vpc": "vhd", "vhdx": "vhdx"}


def qemu_format(path):
    """What qemu-img's own probing calls the file (vdi, qed, ...), or None.

    Asked only when the magic numbers above found nothing.  qemu-img runs
    confined to the file, which it sees under a fixed plain name (no `nbd:` or
    `json:` parsing of the user's name).
    """
    from imaging_elements.engine import confine
    try:
        image = confine.File(os.path.abspath(path), "image")
        result = confine.run(["qemu-img", "info", "--output=json", image.inside], [image],
                             limits=confine.Limits(cpu=10), timeout=10)
        return json.loads(result.stdout).get("format") if result.returncode == 0 else None
    except (OSError, ValueError, confine.ConfineError):
        return None


def resolve(path, declared=None):
    """The type to use: the declared one if the content agrees, else an error.

    `raw` declared for a bare filesystem is taken as `partition`: both are
    plain bytes, and the content says which layout it is.
    """
    detected = detect(path)
    if detected == "unknown":
        qemu = qemu_format(path)
        if qemu in QEMU_FORMATS:
            detected = QEMU_FORMATS[qemu]
        elif qemu and qemu != "raw":
            raise ImageTypeError(f"{path}: a {qemu} image (as qemu-img calls it), which is not "
                                 f"supported; convert it to one of {', '.join(TYPES)}")
    if not declared:
        if detected == "unknown":
            raise ImageTypeError(f"{path}: unknown image format (no partition table, "
                                 "filesystem or image header found); give -t to say what it is")
        return detected
    if declared not in TYPES:
        raise ImageTypeError(f"{path}: unknown image type {declared!r}; one of {', '.join(TYPES)}")
    if declared == detected:
        return declared
    if declared == "raw" and detected == "partition":
        return "partition"
    if declared in ("raw", "partition") and detected == "unknown":
        return declared  # plain bytes: trust the user; the mounters will say more
    raise ImageTypeError(f"{path}: declared as {declared} but the content is {detected}")
