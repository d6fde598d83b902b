"""The phase table: every per-phase rule of the runner, in one place, as data.

The runner and the chain planner read these properties; no code checks a
phase's name.  docs/hooks.md describes the phases."""

HOUR = 3600


class Phase:
    """One phase of an image process.

    where: host, chroot or instance.  kind: how its hooks are run: all (every
    accepting hook), validate (all, results kept, optional ones warn), chain (a
    planned chain of converters), transform (every accepting hook replaces the
    image).  context: what its hooks' `accepts-*` headers are matched against.
    timeout: default time limit of one hook (seconds; --hook-timeout overrides).
    release_mount: the mount phase's resources are let go first (it reads or
      boots the image file).
    finds_platform: after it, a platform still `auto` becomes `unknown`.
    sets_disk_type: after it, the image it made is the process's disk type.
    settable: runner variables its host hooks may set (status `set`).
    writable_mount: when it has hooks to run, the image is mounted writable
      (on a working copy).
    chain_target: for a chain: image-type, crypt or bundle (chain.target).
    pair_through: for a chain: every step has this value at one end (crypt
      hooks only encrypt or decrypt).
    list_note: what --list adds to a hook that does not accept (yet).
    handler: the name of the phase handler that runs its accepted hooks
      (api.register_phase_handler); None: the runner runs them itself."""

    def __init__(self, name, where, kind, context=(), timeout=1800, release_mount=False,
                 finds_platform=False, sets_disk_type=False, settable=(), writable_mount=False,
                 chain_target=None, pair_through=None, list_note="", handler=None):
        self.name, self.where, self.kind, self.context = name, where, kind, context
        self.timeout, self.release_mount = timeout, release_mount
        self.finds_platform, self.sets_disk_type = finds_platform, sets_disk_type
        self.settable, self.writable_mount = frozenset(settable), writable_mount
        self.chain_target, self.pair_through = chain_target, pair_through
        self.list_note, self.handler = list_note, handler

    def __repr__(self):
        return f"Phase({self.name})"


PHASES = (
    Phase("unbundle", "host", "transform", ("source-type",), timeout=6 * HOUR, sets_disk_type=True),
    # A container mounter hands the raw view on; the root finder says the platform.
    Phase("mount", "host", "all", ("disk-type",), finds_platform=True,
          settable=("IMG_DISK", "IMG_DISK_TYPE", "IMG_PLATFORM"),
          list_note=" (unless an earlier mounter changes the disk type)"),
    Phase("validate", "host", "validate", ("platform",)),
    Phase("install", "chroot", "all", ("platform",), writable_mount=True),
    Phase("convert", "host", "chain", ("source-type", "dest-type"), timeout=6 * HOUR, release_mount=True,
          chain_target="image-type"),
    Phase("instance-validate", "instance", "validate", ("platform",), timeout=HOUR, release_mount=True,
          handler="instance"),
    Phase("crypt", "host", "chain", ("source-crypt", "dest-crypt"), timeout=6 * HOUR, chain_target="crypt",
          pair_through="none"),
    Phase("bundle", "host", "chain", ("source-type", "dest-type"), timeout=6 * HOUR, chain_target="bundle"),
    Phase("cleanup", "host", "all"),
)
PHASE_NAMES = [p.name for p in PHASES]
BY_NAME = {p.name: p for p in PHASES}
CONTEXT_VARS = {"disk-type": "IMG_DISK_TYPE", "platform": "IMG_PLATFORM",
                "source-type": "IMG_SOURCE_TYPE", "dest-type": "IMG_DEST_TYPE",
                "source-crypt": "IMG_SOURCE_CRYPT", "dest-crypt": "IMG_DEST_CRYPT"}
