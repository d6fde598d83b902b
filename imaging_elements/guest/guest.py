"""The one safe way hooks read files of a guest image from the host.

An image mounted at ROOT is a tree the guest wrote, and the guest may be
hostile: `/etc/fstab -> /etc/shadow` must mean the image's /etc/shadow, not the
host's.  `Guest(root)` resolves guest paths the way the guest's own kernel
would, with ROOT as `/`:

* absolute symlinks restart at the image root, relative ones at the link's
  directory;
* `..` never climbs above the image root (as `/..` is `/`);
* more than MAX_LINKS symlinks in one lookup is a loop (ELOOP), as in Linux;
* `nocase=True` matches each component case-insensitively (Windows guests).

Reads are capped (`limit`, default 1 MiB), open only regular files (a FIFO or
a device node in the image is refused, never opened for blocking), and text is
decoded tolerantly (UTF-8 or UTF-16 with a BOM, undecodable bytes replaced).

Command line (the bash twins in lib/img-functions call it):

    python -m imaging_elements.guest.guest [--root R] [--nocase] path GUEST_PATH
    python -m imaging_elements.guest.guest [--root R] [--nocase] read GUEST_PATH [--limit N]
    python -m imaging_elements.guest.guest [--root R] [--nocase] exists GUEST_PATH
    python -m imaging_elements.guest.guest [--root R] [--nocase] ls GUEST_PATH
    python -m imaging_elements.guest.guest [--root R] platform

ROOT defaults to $IMG_MOUNT_POINT.  Errors go to stderr naming the guest path
and the reason; the exit code is 1 (2 for bad usage).
"""

import argparse
import errno
import os
import stat
import sys

MAX_LINKS = 40          # the Linux limit on symlinks followed in one lookup
DEFAULT_LIMIT = 1 << 20  # bytes read by default: config files are small


class GuestPathError(OSError):
    """A guest path that cannot be resolved or read; the message names it."""

    def __init__(self, err, guest_path, reason):
        super().__init__(err, f"{guest_path}: {reason}")
        self.guest_path = guest_path
        self.reason = reason

    def __str__(self):
        return self.strerror


class Guest:
    """Read-only access to the guest tree mounted at `root`."""

    def __init__(self, root, nocase=False):
        if not root:
            raise ValueError("no guest root given (IMG_MOUNT_POINT is not set)")
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise GuestPathError(errno.ENOTDIR, root, "the guest root is not a directory")
        self.nocase = nocase

    # -- resolution ----------------------------------------------------------
    def resolve(self, guest_path, follow=True, must_exist=True):
        """The host path of `guest_path`, symlinks followed inside the image.

        follow=False leaves a final symlink itself (like lstat).  With
        must_exist=False a missing last component is allowed (the host path it
        would have is returned); a missing directory on the way is always an
        error.
        """
        if "\0" in guest_path:
            raise GuestPathError(errno.EINVAL, guest_path.replace("\0", "\\0"), "NUL byte in path")
        todo = [c for c in guest_path.split("/") if c][::-1]  # a stack: next component last
        done = []  # resolved components below the root, none of them a symlink
        links = 0
        while todo:
            name = todo.pop()
            if name == ".":
                continue
            if name == "..":
                if done:
                    done.pop()
                continue  # `..` of the root is the root
            last = not todo
            host = self._join(done, name)
            try:
                st = os.lstat(host)
            except FileNotFoundError:
                found = self._match_case(done, name) if self.nocase else None
                if found is None:
                    if last and not must_exist:
                        done.append(name)
                        break
                    raise GuestPathError(errno.ENOENT, guest_path,
                                         f"no such file or directory ({self._show(done, name)})")
                name, host = found, self._join(done, found)
                st = os.lstat(host)
            except NotADirectoryError:
                raise GuestPathError(errno.ENOTDIR, guest_path,
                                     f"{self._show(done)} is not a directory") from None
            except OSError as exc:  # a name too long, an I/O error of a damaged image
                raise GuestPathError(exc.errno, guest_path,
                                     f"{self._show(done, name)}: {exc.strerror}") from None
            if stat.S_ISLNK(st.st_mode) and (follow or not last):
                links += 1
                if links > MAX_LINKS:
                    raise GuestPathError(errno.ELOOP, guest_path,
                                         f"too many levels of symbolic links (a loop?) at {self._show(done, name)}")
                target = os.readlink(host)
                if target.startswith("/"):
                    done = []  # absolute: from the image root, never the host's
                todo.extend([c for c in target.split("/") if c][::-1])
                continue
            if not last and not stat.S_ISDIR(st.st_mode):
                raise GuestPathError(errno.ENOTDIR, guest_path,
                                     f"{self._show(done, name)} is not a directory")
            done.append(name)
        path = self._join(done)
        # Belt and braces: what we return never leaves the root.
        if os.path.commonpath([self.root, path]) != self.root:
            raise GuestPathError(errno.EXDEV, guest_path, "resolves outside the image")
        return path

    def _join(self, done, name=None):
        parts = done + ([name] if name is not None else [])
        return os.path.join(self.root, *parts) if parts else self.root

    @staticmethod
    def _show(done, name=None):
        return "/" + "/".join(done + ([name] if name is not None else []))

    def _match_case(self, done, name):
        try:
            entries = os.listdir(self._join(done))
        except OSError:
            return None
        lower = name.lower()
        matches = sorted(e for e in entries if e.lower() == lower)
        return matches[0] if matches else None

    # -- queries -------------------------------------------------------------
    def lstat(self, guest_path):
        return os.lstat(self.resolve(guest_path, follow=False))

    def stat(self, guest_path):
        return os.lstat(self.resolve(guest_path))  # resolved: no symlink left

    def exists(self, guest_path):
        try:
            self.resolve(guest_path)
            return True
        except GuestPathError:
            return False

    def isfile(self, guest_path):
        try:
            return stat.S_ISREG(self.stat(guest_path).st_mode)
        except OSError:
            return False

    def isdir(self, guest_path):
        try:
            return stat.S_ISDIR(self.stat(guest_path).st_mode)
        except OSError:
            return False

    def listdir(self, guest_path):
        """Names in a guest directory, sorted; [] if it does not exist."""
        try:
            return sorted(os.listdir(self.resolve(guest_path)))
        except FileNotFoundError:
            return []
        except GuestPathError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise

    def find(self, guest_path, name_test=None):
        """Guest paths of the regular files directly in a directory (optionally filtered)."""
        base = guest_path.rstrip("/")
        return [f"{base}/{n}" for n in self.listdir(guest_path)
                if (name_test is None or name_test(n)) and self.isfile(f"{base}/{n}")]

    def first(self, *guest_paths):
        """The first of `guest_paths` that exists (as the guest sees it), or None."""
        for path in guest_paths:
            if self.exists(path):
                return path
        return None

    # -- reading -------------------------------------------------------------
    def open(self, guest_path):
        """A binary file object for a regular file of the guest."""
        path = self.resolve(guest_path)
        # O_NOFOLLOW: resolve() left no symlink; O_NONBLOCK: a FIFO never blocks us.
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY
        try:
            fd = os.open(path, flags)
        except OSError as exc:
            raise GuestPathError(exc.errno, guest_path, exc.strerror) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise GuestPathError(errno.EINVAL, guest_path, f"not a regular file ({_kind(st.st_mode)})")
        return os.fdopen(fd, "rb")

    def read_bytes(self, guest_path, limit=DEFAULT_LIMIT):
        """The whole file; a file over `limit` bytes is an error, never read."""
        with self.open(guest_path) as f:
            size = os.fstat(f.fileno()).st_size
            if limit is not None and size > limit:
                raise GuestPathError(errno.EFBIG, guest_path,
                                     f"too large to read ({size} bytes, the limit is {limit})")
            data = f.read(limit + 1 if limit is not None else -1)
        if limit is not None and len(data) > limit:  # grew while we read
            raise GuestPathError(errno.EFBIG, guest_path, f"too large to read (over {limit} bytes)")
        return data

    def read_head(self, guest_path, size):
        """The first `size` bytes (fewer if the file is shorter)."""
        with self.open(guest_path) as f:
            return f.read(size)

    def read_text(self, guest_path, limit=DEFAULT_LIMIT):
        return decode_text(self.read_bytes(guest_path, limit))

    def read_lines(self, guest_path, limit=DEFAULT_LIMIT):
        return self.read_text(guest_path, limit).splitlines()

    def readlink(self, guest_path):
        """The target of a guest symlink, as written in the image."""
        return os.readlink(self.resolve(guest_path, follow=False))


def _kind(mode):
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def decode_text(data):
    """Text from guest bytes: UTF-16 if it has a BOM, else UTF-8; bad bytes replaced."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    text = data.decode("utf-8-sig", errors="replace")
    return text.replace("\0", "\ufffd")  # NULs are junk in a text file, and break C tools


def is_binary(data):
    """Heuristic used to reject junk where text is expected: NUL bytes in the first 8 KiB."""
    return b"\0" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff"))


def detect_platform(root):
    """linux, windows or unknown, from the guest tree at `root` (nothing is executed)."""
    linux = Guest(root)
    windows = Guest(root, nocase=True)
    for systemroot in ("/Windows", "/WINNT"):
        if windows.isdir(systemroot + "/System32/config"):
            return "windows"
    if linux.first("/etc/os-release", "/usr/lib/os-release", "/etc/redhat-release",
                   "/etc/debian_version", "/etc/SuSE-release", "/etc/alpine-release",
                   "/etc/arch-release", "/etc/gentoo-release") and linux.isdir("/etc"):
        return "linux"
    if linux.isfile("/etc/fstab") and (linux.exists("/sbin/init") or linux.isdir("/lib/modules")):
        return "linux"
    return "unknown"


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m imaging_elements.guest.guest",
                                     description="Read a guest image's files safely.")
    parser.add_argument("--root", default=os.environ.get("IMG_MOUNT_POINT"),
                        help="the image root (default: $IMG_MOUNT_POINT)")
    parser.add_argument("--nocase", action="store_true", help="case-insensitive lookup (Windows)")
    sub = parser.add_subparsers(dest="verb", required=True)
    for verb in ("path", "exists", "ls"):
        sub.add_parser(verb).add_argument("guest_path")
    read = sub.add_parser("read")
    read.add_argument("guest_path")
    read.add_argument("--limit", type=int, default=DEFAULT_LIMIT)
    sub.add_parser("platform")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("no image root: give --root or set IMG_MOUNT_POINT")
    try:
        guest = Guest(args.root, nocase=args.nocase)
        if args.verb == "path":
            print(guest.resolve(args.guest_path, must_exist=False))
        elif args.verb == "exists":
            return 0 if guest.exists(args.guest_path) else 1
        elif args.verb == "ls":
            for name in guest.listdir(args.guest_path):
                print(name)
        elif args.verb == "read":
            sys.stdout.buffer.write(guest.read_bytes(args.guest_path, args.limit))
        elif args.verb == "platform":
            print(detect_platform(args.root))
    except (GuestPathError, ValueError) as exc:
        print(f"guest: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
