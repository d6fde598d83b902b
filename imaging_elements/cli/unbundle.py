"""euca-unbundle: rebuild an image from an EC2 AMI bundle, with euca2ools' flags.

The private key falls back on $EC2_PRIVATE_KEY, as in euca2ools.
"""

import argparse
import os
import sys

from imaging_elements.engine import config
from imaging_elements.bundle import bundle
from imaging_elements.cli.bundle_image import ProgressBar

PROG = "euca-unbundle"


def parser():
    p = argparse.ArgumentParser(prog=PROG, description="Recreate an image from its bundled parts. "
                                "The key used to unbundle the image must match a certificate "
                                "that was used to bundle it (the user's or the cloud's).")
    p.add_argument("-m", "--manifest", metavar="FILE", required=True,
                   help="the bundle's manifest file (required)")
    p.add_argument("-k", "--privatekey", metavar="FILE",
                   help="file containing the private key to decrypt the bundle with "
                   "(default: $EC2_PRIVATE_KEY)")
    p.add_argument("-d", "--destination", metavar="DIR", default=".",
                   help="where to place the unbundled image (default: current directory)")
    p.add_argument("-s", "--source", metavar="DIR", default=".",
                   help="directory containing the bundled image parts (default: current directory)")
    p.add_argument("--max-size", metavar="BYTES", default=str(bundle.MAX_IMAGE_SIZE),
                   help="refuse to write an image larger than this (e.g. 100G; default 1 TiB): a "
                   "manifest that declares more is refused before anything is written")
    p.add_argument("--signer-cert", metavar="FILE",
                   help="also verify the manifest's signature with this X.509 certificate "
                   "(the bundler's); refuse the bundle if it does not verify")
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    private_key = args.privatekey or os.environ.get("EC2_PRIVATE_KEY")
    if not private_key:
        p.error("missing private key; please supply one with -k")
    if not os.path.isdir(args.destination):
        p.error(f"argument -d/--destination: {args.destination!r} is not a directory")
    try:
        max_size = config.parse_size(args.max_size)
    except ValueError as exc:
        p.error(f"argument --max-size: {exc}")
    progress = ProgressBar("Unbundling image")
    try:
        manifest = bundle.read_manifest(args.manifest)
        output = bundle.unbundle(manifest, os.path.join(args.destination, manifest.name),
                                 private_key=private_key, source_dir=args.source,
                                 signer_cert=args.signer_cert, progress=progress, max_size=max_size)
    except (bundle.BundleError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        progress.close()
    print("Wrote", output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
