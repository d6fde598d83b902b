"""Facts about a guest, read from its files: shared by validators and inspection.

Everything here reads the guest through `imaging_elements.guest.guest.Guest`, so no
path ever leaves the image, and nothing from the image is executed.  Windows
registry hives are read with hivex's `hivexget`, never with our own parser.

The inspection report follows libguestfs' `virt-inspector` field names
(name, distro, product_name, major_version, ...); see docs/validators.md.
"""

import errno
import fnmatch
import json
import os
import re
import struct
import sys

from imaging_elements.engine import tools
from imaging_elements.guest.guest import Guest, GuestPathError


def linux_guest(root):
    """The guest mounted at `root` ($IMG_MOUNT_POINT in a hook), case-sensitive."""
    return Guest(root)


def windows_guest(root):
    """The guest mounted at `root`, looked up case-insensitively as Windows does."""
    return Guest(root, nocase=True)


# ---------------------------------------------------------------------------
# filesystems.json: the mounters' view of the image's filesystems

def load_filesystems(work_dir):
    """The list the mounters wrote to WORK_DIR/filesystems.json ([] if none)."""
    if not work_dir:
        return []
    try:
        with open(os.path.join(work_dir, "filesystems.json")) as f:
            data = json.load(f)
    except FileNotFoundError:
        return []
    if not isinstance(data, list):
        raise ValueError(f"{work_dir}/filesystems.json: expected a JSON list")
    return [fs for fs in data if isinstance(fs, dict)]


def is_partition_image(filesystems, *types):
    """A bare filesystem (AMI) image rather than a whole disk: one of `types` (a hook
    passes $IMG_IMAGE_TYPE and $IMG_DISK_TYPE) is `partition`, or the mounters gave
    a filesystem index 0."""
    return "partition" in types or any(fs.get("index") == 0 for fs in filesystems)


def describe_fs(fs):
    what = [fs.get("fstype") or "unknown filesystem"]
    if fs.get("index"):
        what.insert(0, f"partition {fs['index']}")
    if fs.get("label"):
        what.append(f"label {fs['label']}")
    if fs.get("uuid"):
        what.append(f"UUID {fs['uuid']}")
    return ", ".join(what)


# ---------------------------------------------------------------------------
# release: /etc/os-release and the older files

# os-release ID -> virt-inspector's distro name
DISTRO_IDS = {
    "debian": "debian", "ubuntu": "ubuntu", "rhel": "rhel", "centos": "centos",
    "fedora": "fedora", "rocky": "rocky", "almalinux": "alma", "ol": "oraclelinux",
    "sles": "sles", "sled": "sles", "opensuse": "opensuse", "opensuse-leap": "opensuse",
    "opensuse-tumbleweed": "opensuse", "amzn": "amazonlinux", "alpine": "alpinelinux",
    "arch": "archlinux", "gentoo": "gentoo", "linuxmint": "linuxmint", "kali": "kalilinux",
    "scientific": "scientificlinux", "mageia": "mageia", "altlinux": "altlinux",
    "void": "voidlinux", "cirros": "cirros", "openEuler": "openeuler", "kylin": "kylin",
}
SUPPORTED_DISTROS = ("debian", "ubuntu", "rhel", "centos", "fedora", "rocky", "alma",
                     "oraclelinux", "scientificlinux", "sles", "opensuse", "amazonlinux",
                     "alpinelinux", "archlinux")

# Older release files, in libguestfs' order: (file, distro, regex on the first line)
RELEASE_FILES = (
    ("/etc/centos-release", "centos", r"CentOS.*release (\d+)(?:\.(\d+))?"),
    ("/etc/fedora-release", "fedora", r"Fedora.*release (\d+)"),
    ("/etc/redhat-release", None, r"release (\d+)(?:\.(\d+))?"),
    ("/etc/system-release", "amazonlinux", r"Amazon Linux.*release (\d+)(?:\.(\d+))?"),
    ("/etc/SuSE-release", None, r"(\d+)(?:\.(\d+))?"),
    ("/etc/debian_version", "debian", r"^(\d+)(?:\.(\d+))?"),
    ("/etc/alpine-release", "alpinelinux", r"^(\d+)\.(\d+)"),
    ("/etc/arch-release", "archlinux", r"()"),
    ("/etc/gentoo-release", "gentoo", r"release (\d+)(?:\.(\d+))?"),
)


def parse_shell_vars(text):
    """KEY=value lines as in os-release, lsb-release, ifcfg files (quotes removed)."""
    import shlex
    result = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip()
        if key.startswith("export "):
            key = key[7:].strip()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            continue
        try:
            words = shlex.split(value, comments=True)
            value = " ".join(words)
        except ValueError:
            value = value.strip().strip("\"'")
        result[key] = value
    return result


def _version(major, minor):
    return (int(major) if major else 0, int(minor) if minor else 0)


def linux_release(g):
    """{distro, product_name, pretty_name, major_version, minor_version, source} or None."""
    release = None
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            info = parse_shell_vars(g.read_text(path, limit=64 * 1024))
        except GuestPathError:
            continue
        os_id = info.get("ID", "").lower()
        distro = DISTRO_IDS.get(os_id, os_id or None)
        match = re.match(r"(\d+)(?:\.(\d+))?", info.get("VERSION_ID", ""))
        major, minor = _version(*match.groups()) if match else (0, 0)
        name = info.get("PRETTY_NAME") or info.get("NAME")
        release = {"distro": distro, "product_name": name, "pretty_name": name,
                   "major_version": major, "minor_version": minor, "source": path}
        # As virt-inspector: Debian's and CentOS' os-release carry only the
        # major version; their own release file has the full one.
        if not (distro in ("debian", "centos", "rocky") and minor == 0):
            return release
        break
    for path, distro, regex in RELEASE_FILES:
        try:
            text = g.read_text(path, limit=64 * 1024)
        except GuestPathError:
            continue
        first = (text.splitlines() or [""])[0].strip()
        match = re.search(regex, first)
        if not match:
            continue
        groups = (match.groups() + (None, None))[:2]
        major, minor = _version(*groups)
        if distro is None:
            lower = first.lower()
            distro = ("rhel" if "red hat" in lower else "centos" if "centos" in lower
                      else "rocky" if "rocky" in lower else "alma" if "alma" in lower
                      else "scientificlinux" if "scientific" in lower
                      else "oraclelinux" if "oracle" in lower
                      else "opensuse" if "opensuse" in lower else "sles" if "suse" in lower
                      else "redhat-based")
        # As virt-inspector, the release file's first line is the product name
        # ("12.8" for Debian); os-release's PRETTY_NAME is kept beside it.
        pretty = release.get("product_name") if release and release["distro"] == distro else None
        return {"distro": distro, "product_name": first, "pretty_name": pretty or first,
                "major_version": major, "minor_version": minor, "source": path}
    if release:
        return release
    try:
        info = parse_shell_vars(g.read_text("/etc/lsb-release", limit=64 * 1024))
    except GuestPathError:
        return None
    match = re.match(r"(\d+)(?:\.(\d+))?", info.get("DISTRIB_RELEASE", ""))
    return {"distro": DISTRO_IDS.get(info.get("DISTRIB_ID", "").lower(), info.get("DISTRIB_ID")),
            "product_name": info.get("DISTRIB_DESCRIPTION"), "pretty_name": info.get("DISTRIB_DESCRIPTION"),
            "major_version": _version(*match.groups())[0] if match else 0,
            "minor_version": _version(*match.groups())[1] if match else 0,
            "source": "/etc/lsb-release"}


RELEASE_LOOKED_AT = ["/etc/os-release", "/usr/lib/os-release"] + [p for p, _, _ in RELEASE_FILES] + ["/etc/lsb-release"]

# Expectations (IMG_EXPECT_DISTRO): name -> (readable name, distros, release file)
EXPECTATIONS = {
    "rhel": ("RHEL/CentOS", ("rhel", "centos", "scientificlinux", "oraclelinux", "rocky", "alma"),
             "/etc/redhat-release"),
    "centos": ("CentOS", ("centos",), "/etc/centos-release"),
    "fedora": ("Fedora", ("fedora",), "/etc/fedora-release"),
    "debian": ("Debian", ("debian",), "/etc/debian_version"),
    "ubuntu": ("Ubuntu", ("ubuntu",), "/etc/os-release"),
    "sles": ("SUSE", ("sles", "opensuse"), "/etc/os-release"),
    "opensuse": ("openSUSE", ("opensuse",), "/etc/os-release"),
    "amazonlinux": ("Amazon Linux", ("amazonlinux",), "/etc/system-release"),
    "alpinelinux": ("Alpine Linux", ("alpinelinux",), "/etc/alpine-release"),
}


def check_expected_release(g, expect, release):
    """None if the release meets `expect` ("rhel:5,6", "debian:12"), else the reason."""
    name, _, versions = expect.partition(":")
    name = name.strip().lower()
    if name not in EXPECTATIONS:
        return f"IMG_EXPECT_DISTRO={expect}: unknown distribution {name!r}; one of {', '.join(EXPECTATIONS)}"
    readable, distros, release_file = EXPECTATIONS[name]
    majors = [v.strip() for v in versions.split(",") if v.strip()]
    wanted = readable + (" " + "/".join(f"{v}.x" for v in majors) if majors else "")
    if not g.exists(release_file):
        return f"Expected {wanted}, but failed to find {release_file}"
    if not release or release["distro"] not in distros:
        found = release and (release.get("pretty_name") or release["distro"])
        return f"Expected {wanted}, but found {found or 'an unknown distribution'}"
    if majors and str(release["major_version"]) not in majors:
        return (f"Expected {wanted}, but found {release.get('pretty_name') or release['distro']} "
                f"(version {release['major_version']}.{release['minor_version']})")
    return None


# fstab and device resolution: imaging_elements.mount.fstab

# ---------------------------------------------------------------------------
# kernels

KERNEL_PREFIXES = ("vmlinuz-", "vmlinux-", "kernel-", "bzImage-")
INITRD_PATTERNS = ("initrd.img-{v}", "initramfs-{v}.img", "initrd-{v}.img", "initrd-{v}",
                   "initramfs-{v}", "initrd.img-{v}.img")


def kernels(g):
    """Kernels in /boot: [{version, kernel, initramfs, modules, problem}], newest name last."""
    found = []
    for name in g.listdir("/boot"):
        prefix = next((p for p in KERNEL_PREFIXES if name.startswith(p)), None)
        if not prefix or name.endswith((".sig", ".hmac", ".old", ".bak")) or ".hmac" in name:
            continue
        kernel = f"/boot/{name}"
        if not g.isfile(kernel):
            continue
        version = name[len(prefix):]
        initrds = [f"/boot/{p.format(v=version)}" for p in INITRD_PATTERNS]
        initramfs = next((p for p in initrds if g.isfile(p)), None)
        module_version = _modules_version(g, version)
        modules = f"/lib/modules/{module_version}" if module_version else None
        problem = None
        if "rescue" in version:
            problem = "a rescue kernel"
        elif not initramfs:
            problem = f"no initramfs (looked for {', '.join(initrds[:3])})"
        elif not modules:
            problem = f"no /lib/modules/{version}"
        found.append({"version": module_version or version, "kernel": kernel, "initramfs": initramfs,
                      "modules": modules, "problem": problem})
    return found


def _modules_version(g, version):
    for base in ("/lib/modules", "/usr/lib/modules"):
        if g.isdir(f"{base}/{version}"):
            return version
    # Arch: vmlinuz-linux belongs to the modules dir whose pkgbase is "linux".
    for base in ("/usr/lib/modules", "/lib/modules"):
        for entry in g.listdir(base):
            try:
                if g.read_text(f"{base}/{entry}/pkgbase", limit=256).strip() == version:
                    return entry
            except GuestPathError:
                continue
    return None


def kernel_file_version(path):
    """The version string in a bzImage's setup header (x86 boot protocol), or None."""
    try:
        with open(path, "rb") as f:
            header = f.read(0x210)
            if len(header) < 0x210 or header[0x202:0x206] != b"HdrS":
                return None
            offset = struct.unpack_from("<H", header, 0x20E)[0]
            if not offset:
                return None
            f.seek(offset + 0x200)
            text = f.read(256).split(b"\0")[0].decode("ascii", "replace")
    except OSError:
        return None
    return text.split()[0] if text else None


# ---------------------------------------------------------------------------
# boot loader configuration

BOOT_CONFIGS = (
    ("/boot/grub/grub.cfg", "grub2"), ("/boot/grub2/grub.cfg", "grub2"),
    ("/boot/grub/menu.lst", "grub"), ("/boot/grub/grub.conf", "grub"),
    ("/boot/extlinux/extlinux.conf", "extlinux"), ("/boot/extlinux.conf", "extlinux"),
    ("/extlinux.conf", "extlinux"), ("/boot/syslinux/syslinux.cfg", "extlinux"),
    ("/boot/syslinux.cfg", "extlinux"), ("/syslinux/syslinux.cfg", "extlinux"),
)
KERNEL_LINE = {
    "grub2": re.compile(r"^\s*(?:linux|linux16|linuxefi)\s+(\S+)(.*)$", re.M),
    "grub": re.compile(r"^\s*kernel\s+(\S+)(.*)$", re.M),
    "extlinux": re.compile(r"^\s*(?:kernel|linux)\s+(\S+)()", re.M | re.I),
    "bls": re.compile(r"^\s*linux\s+(\S+)()", re.M),
}


def boot_configs(g):
    """[{path, kind, kernels: [guest paths as written], cmdlines: [...]}] of the configs found.

    A config that is there but cannot be read (too large, not a regular file,
    a link out of the image) is listed with `error`, the reason, and no kernels."""
    candidates = list(BOOT_CONFIGS)
    for vendor in g.listdir("/boot/efi/EFI"):
        candidates.append((f"/boot/efi/EFI/{vendor}/grub.cfg", "grub2"))
    configs = []
    for path, kind in candidates:
        try:
            text = g.read_text(path)
        except GuestPathError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                configs.append({"path": path, "kind": kind, "kernels": [], "cmdlines": [], "error": exc.reason})
            continue
        found = KERNEL_LINE[kind].findall(text)
        cmdlines = [rest for _, rest in found]
        if kind == "extlinux":
            cmdlines = re.findall(r"^\s*append\s+(.*)$", text, re.M | re.I)
        entry = {"path": path, "kind": kind, "kernels": [k for k, _ in found], "cmdlines": cmdlines}
        if kind == "grub2" and "blscfg" in text:
            for bls in g.find("/boot/loader/entries", lambda n: n.endswith(".conf")):
                try:
                    bls_text = g.read_text(bls)
                except GuestPathError:
                    continue
                entry["kernels"] += [k for k, _ in KERNEL_LINE["bls"].findall(bls_text)]
                entry["cmdlines"] += re.findall(r"^\s*options\s+(.*)$", bls_text, re.M)
        configs.append(entry)
    return configs


def boot_kernel_path(g, config, kernel):
    """The guest path of a kernel a boot config names, or None if it is not in the image."""
    kernel = re.sub(r"^\([^)]*\)", "", kernel)  # (hd0,msdos1)/vmlinuz, ($root)/boot/...
    if "$" in kernel:
        return None
    if not kernel.startswith("/"):
        kernel = os.path.join(os.path.dirname(config), kernel)
    # A separate /boot partition: the loader's paths are relative to it.
    for path in (kernel, "/boot" + kernel):
        if g.isfile(path):
            return os.path.normpath(path)
    return None


# ---------------------------------------------------------------------------
# network configuration

FIRST_NIC = re.compile(r"^(eth0|en[a-z][a-z0-9]*)$")
NIC_CANDIDATES = ("eth0", "ens3", "ens4", "ens5", "enp0s3", "enp1s0", "eno1", "enX0")


def _guest_glob(g, pattern):
    directory, _, name = pattern.rpartition("/")
    return [f"{directory}/{n}" for n in g.listdir(directory or "/") if fnmatch.fnmatch(n, name)]


def ifupdown_interfaces(g, path="/etc/network/interfaces", seen=None):
    """[(iface, method, file, detail)] from ifupdown configuration, following `source`."""
    seen = seen if seen is not None else set()
    if path in seen or len(seen) > 64:
        return []
    seen.add(path)
    try:
        text = g.read_text(path)
    except GuestPathError:
        return []
    result, current = [], None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if words[0] == "iface" and len(words) >= 4:
            current = [words[1], words[3], path, ""]
            result.append(current)
        elif words[0] in ("source", "source-directory") and len(words) > 1:
            target = words[1] if words[1].startswith("/") else f"/etc/network/{words[1]}"
            if words[0] == "source-directory":
                files = [f"{target}/{n}" for n in g.listdir(target)
                         if re.fullmatch(r"[A-Za-z0-9_-]+", n)]
            else:
                files = _guest_glob(g, target)
            for file in files:
                result += ifupdown_interfaces(g, file, seen)
        elif words[0] == "address" and current is not None:
            current[3] = f"address {words[1]}" if len(words) > 1 else ""
    return [tuple(r) for r in result]


def network_config(g):
    """(dhcp, static, notes): lists of (interface, where) for DHCP and static configs."""
    dhcp, static, notes = [], [], []
    for iface, method, path, detail in ifupdown_interfaces(g):
        if iface == "lo":
            continue
        if method in ("dhcp", "auto"):
            dhcp.append((iface, f"ifupdown {path}"))
        elif method == "static":
            static.append((iface, f"ifupdown {path}" + (f" ({detail})" if detail else "")))
    for path in g.find("/etc/netplan", lambda n: n.endswith(".yaml")):
        _netplan(g, path, dhcp, static, notes)
    for directory in ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network"):
        for path in g.find(directory, lambda n: n.startswith("ifcfg-") and n != "ifcfg-lo"):
            try:
                info = parse_shell_vars(g.read_text(path))
            except GuestPathError:
                continue
            iface = info.get("DEVICE") or path.rsplit("ifcfg-", 1)[1]
            proto = info.get("BOOTPROTO", "").lower()
            if info.get("ONBOOT", "yes").lower() in ("no", "false") or info.get("STARTMODE") in ("off", "manual"):
                notes.append(f"{path} is not started at boot")
                continue
            if proto in ("dhcp", "dhcp4", "bootp"):
                dhcp.append((iface, f"ifcfg {path}"))
            elif proto in ("static", "none", "") and (info.get("IPADDR") or proto == "static"):
                static.append((iface, f"ifcfg {path}" + (f" (IPADDR {info['IPADDR']})" if info.get("IPADDR") else "")))
    _networkd(g, dhcp, static, notes)
    _networkmanager(g, dhcp, static, notes)
    try:
        text = g.read_text("/etc/conf.d/net")  # Gentoo netifrc
        for iface, value in re.findall(r'^config_(\w+)=["\']?([^"\'\n]*)', text, re.M):
            (dhcp if "dhcp" in value else static).append((iface, "netifrc /etc/conf.d/net"))
    except GuestPathError:
        pass
    if cloud_init_network(g):
        dhcp.append(("first interface", "cloud-init's fallback network configuration"))
    return dhcp, static, notes


def _netplan(g, path, dhcp, static, notes):
    try:
        import yaml  # only needed for netplan guests
        data = yaml.safe_load(g.read_text(path))
    except GuestPathError:
        return
    except Exception as exc:
        notes.append(f"{path}: not valid YAML ({str(exc).splitlines()[0]})")
        return
    network = (data or {}).get("network") if isinstance(data, dict) else None
    if not isinstance(network, dict):
        return
    for section in ("ethernets", "bonds", "bridges", "vlans"):
        for name, conf in (network.get(section) or {}).items():
            if not isinstance(conf, dict):
                continue
            match = conf.get("match") if isinstance(conf.get("match"), dict) else {}
            iface = conf.get("set-name") or match.get("name") or str(name)
            if conf.get("dhcp4") in (True, "yes", "true") or conf.get("dhcp6") in (True, "yes", "true"):
                dhcp.append((iface, f"netplan {path}"))
            elif conf.get("addresses"):
                static.append((iface, f"netplan {path} (addresses {', '.join(map(str, conf['addresses']))})"))


def _ini(g, path):
    import configparser  # only for networkd / NetworkManager guests
    parser = configparser.ConfigParser(strict=False, interpolation=None, allow_no_value=True)
    parser.optionxform = str
    try:
        parser.read_string(g.read_text(path))
    except (GuestPathError, configparser.Error, UnicodeError):
        return None
    return parser


def _networkd(g, dhcp, static, notes):
    files = []
    for directory in ("/etc/systemd/network", "/usr/lib/systemd/network", "/lib/systemd/network"):
        files += g.find(directory, lambda n: n.endswith(".network") and not n.startswith("80-container"))
    if not files:
        return
    enabled = any(g.exists(f"/etc/systemd/system/{wants}/systemd-networkd.service")
                  for wants in g.listdir("/etc/systemd/system") if wants.endswith(".wants"))
    for path in files:
        conf = _ini(g, path)
        if conf is None:
            continue
        names = conf.get("Match", "Name", fallback="*") or "*"
        value = conf.get("Network", "DHCP", fallback="no").lower()
        ifaces = [n for n in NIC_CANDIDATES if any(fnmatch.fnmatch(n, p) for p in names.split())]
        if not ifaces:
            continue
        where = f"systemd-networkd {path}"
        if not enabled:
            notes.append(f"{path} configures {names}, but systemd-networkd is not enabled")
        elif value in ("yes", "true", "ipv4", "both", "ipv6", "1"):
            dhcp.append((ifaces[0], where))
        elif conf.get("Network", "Address", fallback=None):
            static.append((ifaces[0], where + f" (Address {conf.get('Network', 'Address')})"))


def _networkmanager(g, dhcp, static, notes):
    installed = g.first("/usr/sbin/NetworkManager", "/usr/bin/NetworkManager")
    if not installed:
        return
    keyfiles = g.find("/etc/NetworkManager/system-connections")
    for path in keyfiles:
        conf = _ini(g, path)
        if conf is None or conf.get("connection", "type", fallback="ethernet") not in ("ethernet", "802-3-ethernet"):
            continue
        iface = conf.get("connection", "interface-name", fallback="first interface")
        method = conf.get("ipv4", "method", fallback="auto")
        if method == "auto":
            dhcp.append((iface, f"NetworkManager {path}"))
        elif method == "manual":
            static.append((iface, f"NetworkManager {path}"))
    config = ""
    for path in ["/etc/NetworkManager/NetworkManager.conf"] + g.find("/etc/NetworkManager/conf.d"):
        try:
            config += g.read_text(path) + "\n"
        except GuestPathError:
            pass
    if not re.search(r"^\s*no-auto-default\s*=\s*\*", config, re.M):
        dhcp.append(("first interface", "NetworkManager's automatic wired connection"))


def cloud_init_present(g):
    return g.first("/usr/bin/cloud-init", "/usr/local/bin/cloud-init") is not None


def cloud_init_network(g):
    """cloud-init installed, its network configuration not disabled (it then DHCPs the first NIC)."""
    if not cloud_init_present(g):
        return False
    for path in ["/etc/cloud/cloud.cfg"] + g.find("/etc/cloud/cloud.cfg.d", lambda n: n.endswith(".cfg")):
        try:
            if re.search(r"config:\s*[\"']?disabled", g.read_text(path)):
                return False
        except GuestPathError:
            continue
    return True


def persistent_net_rules(g):
    """Readable lines for every rule that pins an interface to a MAC address."""
    pins = []
    for path in g.find("/etc/udev/rules.d", lambda n: n.endswith(".rules")):
        try:
            text = g.read_text(path)
        except GuestPathError:
            continue
        for line in text.splitlines():
            if line.lstrip().startswith("#"):
                continue
            mac = re.search(r'ATTRS?\{address\}==\s*"([0-9a-fA-F:]{17})"', line)
            name = re.search(r'NAME\s*:?=\s*"([^"]+)"', line)
            if mac and name:
                pins.append(f"{path} pins {name.group(1)} to MAC {mac.group(1)}")
    for path in g.find("/etc/systemd/network", lambda n: n.endswith(".link")):
        conf = _ini(g, path)
        if conf is not None and conf.get("Match", "MACAddress", fallback=None):
            pins.append(f"{path} matches MAC {conf.get('Match', 'MACAddress')}")
    for directory in ("/etc/sysconfig/network-scripts", "/etc/sysconfig/network"):
        for path in g.find(directory, lambda n: n.startswith("ifcfg-")):
            try:
                info = parse_shell_vars(g.read_text(path))
            except GuestPathError:
                continue
            if info.get("HWADDR"):
                device = info.get("DEVICE") or path.rsplit("ifcfg-", 1)[1]
                pins.append(f"{path} pins {device} to HWADDR {info['HWADDR']}")
    return pins


# ---------------------------------------------------------------------------
# architecture, hostname, packages

ELF_MACHINES = {3: "i386", 62: "x86_64", 183: "aarch64", 40: "arm", 243: "riscv64",
                21: "ppc64", 20: "ppc", 22: "s390x", 8: "mips", 2: "sparc", 43: "sparc64"}


def linux_arch(g):
    """The architecture of the guest's binaries, from an ELF header (as virt-inspector)."""
    for path in ("/bin/bash", "/bin/ls", "/bin/echo", "/bin/rm", "/bin/sh", "/sbin/init"):
        try:
            head = g.read_head(path, 20)
        except GuestPathError:
            continue
        if len(head) < 20 or head[:4] != b"\x7fELF":
            continue
        little = head[5] == 1
        machine = struct.unpack_from("<H" if little else ">H", head, 18)[0]
        arch = ELF_MACHINES.get(machine)
        if arch == "ppc64" and little:
            arch = "ppc64le"
        if arch == "mips" and head[4] == 2:
            arch = "mips64"
        return arch or f"elf-machine-{machine}"
    return None


def linux_hostname(g):
    for path in ("/etc/hostname", "/etc/HOSTNAME"):
        try:
            for line in g.read_lines(path, limit=4096):
                if line.strip() and not line.startswith("#"):
                    return line.strip()
        except GuestPathError:
            continue
    for path in ("/etc/sysconfig/network",):
        try:
            name = parse_shell_vars(g.read_text(path)).get("HOSTNAME")
            if name:
                return name
        except GuestPathError:
            continue
    return None


def linux_packages(g):
    """(package_format, package_management, count) as far as the files tell."""
    try:
        status = g.read_text("/var/lib/dpkg/status", limit=64 << 20)
        count = len(re.findall(r"^Status: install ok installed$", status, re.M))
        return "deb", "apt" if g.exists("/usr/bin/apt-get") else "dpkg", count
    except GuestPathError:
        pass
    for path in ("/var/lib/rpm/rpmdb.sqlite", "/usr/lib/sysimage/rpm/rpmdb.sqlite",
                 "/var/lib/rpm/Packages", "/var/lib/rpm/Packages.db", "/usr/lib/sysimage/rpm/Packages.db"):
        if g.isfile(path):
            manager = ("dnf" if g.exists("/usr/bin/dnf") else "yum" if g.exists("/usr/bin/yum")
                       else "zypper" if g.exists("/usr/bin/zypper") else None)
            return "rpm", manager, _rpm_count(g, path)
    try:
        installed = g.read_text("/lib/apk/db/installed", limit=64 << 20)
        return "apk", "apk", len(re.findall(r"^P:", installed, re.M))
    except GuestPathError:
        pass
    if g.isdir("/var/lib/pacman/local"):
        return "pacman", "pacman", len([n for n in g.listdir("/var/lib/pacman/local") if n != "ALPINE_DB_VERSION"])
    return None, None, None


def _rpm_count(g, path):
    if not path.endswith(".sqlite"):
        return None  # Berkeley DB / ndb: no reader here without running rpm
    import sqlite3
    host = g.resolve(path)
    try:
        # immutable=1: read the file as it is, never create journals beside it.
        with sqlite3.connect(f"file:{host}?mode=ro&immutable=1", uri=True) as db:
            return db.execute("SELECT count(*) FROM Packages").fetchone()[0]
    except sqlite3.Error:
        return None


def osinfo_id(release):
    """The libosinfo short id virt-inspector prints (debian12, rhel9.2, ...)."""
    if not release or not release.get("distro"):
        return None
    distro, major, minor = release["distro"], release["major_version"], release["minor_version"]
    if distro in ("debian", "fedora"):
        return f"{distro}{major}"
    if distro == "ubuntu":
        return f"ubuntu{major}.{minor:02d}"
    if distro in ("rhel", "centos", "rocky", "alma", "oraclelinux"):
        name = "almalinux" if distro == "alma" else distro
        return f"{name}{major}" + (f".{minor}" if distro != "centos" or major < 8 else "")
    return f"{distro}{major}.{minor}" if major else distro


# ---------------------------------------------------------------------------
# Windows: the registry, read with hivex's tools

def windows_systemroot(g):
    """The guest path of the Windows directory (case as on disk), or None."""
    for name in ("/Windows", "/WINNT", "/Win"):
        try:
            path = g.resolve(name + "/System32")
        except GuestPathError:
            continue
        if os.path.isdir(path):
            return "/" + os.path.relpath(os.path.dirname(path), g.root)
    return None


class HiveError(Exception):
    pass


HIVEX_TIMEOUT = 30  # seconds: a damaged hive may not hang us


def _hivex(argv, key, input=None, check_stderr=False):
    """stdout of a hivex tool on a hive from the image; HiveError naming the hive and key."""
    where = f"{os.path.basename(argv[1])}\\{key}"
    try:
        result = tools.run(argv, input=input, timeout=HIVEX_TIMEOUT)
    except tools.ToolError as exc:
        if exc.code is None:  # not installed, or hung
            raise HiveError(f"{where}: {exc}" + (" (package libhivex-bin)" if "not found" in str(exc)
                                                 else " (a damaged hive?)")) from None
        err = exc.stderr.strip()
        raise HiveError(f"{where}: {err.splitlines()[-1] if err else 'cannot read'}") from None
    if check_stderr and result.stderr.strip():  # hivexsh says what it could not do, and exits 0
        raise HiveError(f"{where}: {result.stderr.strip().splitlines()[-1]}")
    return result.stdout


def hive_values(hive_host_path, key):
    """All values of a key as {name: text}, from `hivexget HIVE KEY` (.reg format)."""
    values = {}
    for line in _hivex(["hivexget", hive_host_path, key], key).splitlines():
        match = re.match(r'^"((?:[^"\\]|\\.)*)"=(.*)$', line)
        if not match:
            continue
        name, raw = match.group(1).replace('\\"', '"').replace("\\\\", "\\"), match.group(2)
        if raw.startswith('"'):
            values[name] = raw[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        elif raw.startswith("dword:"):
            values[name] = int(raw[6:], 16)
        else:
            values[name] = raw
    return values


def hive_subkeys(hive_host_path, key):
    """Names of a key's subkeys, listed by hivexsh."""
    return _hivex(["hivexsh", hive_host_path], key, input=f"cd {key}\nls\n", check_stderr=True).splitlines()


def current_control_set(system_host_path):
    current = hive_values(system_host_path, r"\Select").get("Current")
    return f"ControlSet{current:03d}" if isinstance(current, int) else "ControlSet001"


def windows_services(g, systemroot):
    """Lower-cased service names of the SYSTEM hive's current control set; None if unreadable."""
    try:
        system = g.resolve(f"{systemroot}/System32/config/SYSTEM")
        return {name.lower() for name in hive_subkeys(system, rf"\{current_control_set(system)}\Services")}
    except (GuestPathError, HiveError):
        return None


def windows_info(g, systemroot=None):
    """Version, edition, build, hostname, arch of a Windows guest from its hives."""
    systemroot = systemroot or windows_systemroot(g)
    if not systemroot:
        raise HiveError("no Windows directory (looked for /Windows/System32, /WINNT/System32)")
    software = g.resolve(f"{systemroot}/System32/config/SOFTWARE")
    cv = hive_values(software, r"\Microsoft\Windows NT\CurrentVersion")
    info = {"windows_systemroot": systemroot,
            "product_name": cv.get("ProductName"),
            "edition": cv.get("EditionID"),
            "product_variant": cv.get("InstallationType"),
            "build": cv.get("CurrentBuildNumber") or cv.get("CurrentBuild")}
    if isinstance(cv.get("CurrentMajorVersionNumber"), int):
        info["major_version"] = cv["CurrentMajorVersionNumber"]
        info["minor_version"] = cv.get("CurrentMinorVersionNumber", 0)
    else:
        match = re.match(r"(\d+)\.(\d+)", str(cv.get("CurrentVersion", "")))
        info["major_version"], info["minor_version"] = _version(*match.groups()) if match else (None, None)
    try:
        system = g.resolve(f"{systemroot}/System32/config/SYSTEM")
        control_set = current_control_set(system)
        info["windows_current_control_set"] = control_set
        tcpip = hive_values(system, rf"\{control_set}\Services\Tcpip\Parameters")
        info["hostname"] = tcpip.get("Hostname") or tcpip.get("HostName")
        env = hive_values(system, rf"\{control_set}\Control\Session Manager\Environment")
        arch = env.get("PROCESSOR_ARCHITECTURE")
        info["arch"] = {"AMD64": "x86_64", "x86": "i386", "ARM64": "aarch64"}.get(arch, arch)
    except (GuestPathError, HiveError):
        pass
    return info


HIBERNATION_SIGNATURES = (b"hibr", b"HIBR", b"wake", b"WAKE", b"RSTR", b"rstr")


def windows_hibernated(g):
    """(True, reason) if hiberfil.sys holds a hibernated system, else (False, what we saw)."""
    path = "/hiberfil.sys"
    try:
        head = g.read_head(path, 4)
    except GuestPathError as exc:
        return False, f"no {path}" if exc.errno == 2 else str(exc)
    if head in HIBERNATION_SIGNATURES:
        return True, f"{path} holds a hibernated system (signature {head.decode()!r})"
    return False, f"{path} is not a hibernation image"


# ---------------------------------------------------------------------------
# the inspection report

def inspect(root, platform=None, filesystems=None):
    """The inspection report as a dict (virt-inspector's fields where they exist)."""
    from imaging_elements.guest.guest import detect_platform
    platform = platform if platform in ("linux", "windows") else detect_platform(root)
    filesystems = filesystems or []
    report = {"name": platform, "arch": None, "distro": None, "product_name": None,
              "product_variant": None, "major_version": None, "minor_version": None,
              "hostname": None, "osinfo": None, "package_format": None,
              "package_management": None, "package_count": None, "kernels": [],
              "filesystems": [{"index": fs.get("index"), "type": fs.get("fstype"),
                               "label": fs.get("label"), "uuid": fs.get("uuid"),
                               "mountpoint": fs.get("mountpoint"), "root": bool(fs.get("root"))}
                              for fs in filesystems],
              "mountpoints": {fs["mountpoint"]: fs.get("index") for fs in filesystems if fs.get("mountpoint")},
              "errors": []}
    if platform == "linux":
        g = Guest(root)
        release = linux_release(g) or {}
        report.update({k: release.get(k) for k in ("distro", "product_name", "major_version", "minor_version")})
        report["pretty_name"] = release.get("pretty_name")
        report["osinfo"] = osinfo_id(release)
        report["arch"] = linux_arch(g)
        report["hostname"] = linux_hostname(g)
        report["package_format"], report["package_management"], report["package_count"] = linux_packages(g)
        report["kernels"] = [{k: v for k, v in kernel.items() if k != "problem"} for kernel in kernels(g)]
    elif platform == "windows":
        g = Guest(root, nocase=True)
        report["distro"] = "windows"
        try:
            info = windows_info(g)
            report.update({k: v for k, v in info.items() if v is not None})
            if report.get("major_version") is not None:
                report["osinfo"] = _windows_osinfo(report)
        except (HiveError, GuestPathError) as exc:
            report["errors"].append(str(exc))
    return report


def _windows_osinfo(report):
    major, minor = report.get("major_version"), report.get("minor_version")
    name = report.get("product_name") or ""
    if major == 10 and "Server" in name:
        match = re.search(r"Server (\d{4})", name)
        return f"win2k{match.group(1)[2:]}" if match else "win2k16"
    return {(10, 0): "win10", (6, 3): "win8.1", (6, 2): "win8", (6, 1): "win7",
            (6, 0): "winvista", (5, 1): "winxp"}.get((major, minor))


def format_report(report):
    """The readable text of an inspection report, one fact a line."""
    lines = []

    def add(label, value):
        if value not in (None, "", [], {}):
            lines.append(f"{label}: {value}")

    add("OS type", report.get("name"))
    add("distro", report.get("distro"))
    if report.get("major_version") is not None:
        add("version", f"{report['major_version']}.{report.get('minor_version') or 0}")
    add("product name", report.get("product_name"))
    if report.get("pretty_name") != report.get("product_name"):
        add("release", report.get("pretty_name"))
    add("product variant", report.get("product_variant"))
    add("edition", report.get("edition"))
    add("build", report.get("build"))
    add("osinfo", report.get("osinfo"))
    add("hostname", report.get("hostname"))
    add("architecture", report.get("arch"))
    for kernel in report.get("kernels", []):
        add("kernel", f"{kernel['version']} ({kernel['kernel']}, initramfs {kernel.get('initramfs') or 'none'})")
    for fs in report.get("filesystems", []):
        add("filesystem", ", ".join(str(x) for x in (
            f"partition {fs['index']}" if fs.get("index") is not None else None, fs.get("type"),
            f"label {fs['label']}" if fs.get("label") else None,
            f"UUID {fs['uuid']}" if fs.get("uuid") else None,
            f"mounted on {fs['mountpoint']}" if fs.get("mountpoint") else "not mounted") if x))
    if report.get("package_format"):
        count = report.get("package_count")
        add("packages", f"{report['package_format']} ({report.get('package_management') or 'no manager'})"
            + (f", {count} installed" if count is not None else ""))
    for error in report.get("errors", []):
        add("error", error)
    return "\n".join(lines)


def main(argv=None):
    import argparse
    parser = argparse.ArgumentParser(prog="python -m imaging_elements.guest.guestinfo",
                                     description="Inspect a mounted guest image (read-only, nothing executed).")
    parser.add_argument("--root", default=os.environ.get("IMG_MOUNT_POINT"))
    parser.add_argument("--platform", default=os.environ.get("IMG_PLATFORM"))
    parser.add_argument("--filesystems", help="a filesystems.json (default: $IMG_WORK_DIR's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)
    if not args.root:
        parser.error("no image root: give --root or set IMG_MOUNT_POINT")
    if args.filesystems:
        with open(args.filesystems) as f:
            filesystems = json.load(f)
    else:
        filesystems = load_filesystems(os.environ.get("IMG_WORK_DIR"))
    report = inspect(args.root, args.platform, filesystems)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
