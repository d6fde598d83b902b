"""euca-bundle-image: bundle an image into an EC2 AMI bundle, with euca2ools' flags.

Credentials fall back on euca2ools' environment variables (EC2_USER_ID,
EC2_CERT, EC2_PRIVATE_KEY, EUCALYPTUS_CERT), so that eucarc files keep working.
"""

import argparse
import os
import shutil
import sys
import tempfile

from imaging_elements.engine import config
from imaging_elements.bundle import bundle

PROG = "euca-bundle-image"


def _argtype(parse):
    def convert(text):
        try:
            return parse(text)
        except bundle.BundleError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def hex_secret(text):
    try:
        value = bytes.fromhex(text)
    except ValueError:
        value = b""
    if len(value) != 16:
        raise argparse.ArgumentTypeError("expected 32 hex digits")
    return value


def parser():
    p = argparse.ArgumentParser(prog=PROG, description="Prepare an image for uploading to a cloud: "
                                "write an EC2 AMI bundle (manifest and encrypted parts).")
    p.add_argument("-i", "--image", metavar="FILE", required=True,
                   help="file containing the image to bundle (required)")
    p.add_argument("-r", "--arch", required=True, choices=bundle.ARCHITECTURES,
                   help="the image's architecture (required)")
    p.add_argument("-k", "--privatekey", metavar="FILE",
                   help="file containing your private key to sign the bundle's manifest with "
                   "(default: $EC2_PRIVATE_KEY)")
    p.add_argument("-c", "--cert", metavar="FILE",
                   help="file containing your X.509 certificate (default: $EC2_CERT)")
    p.add_argument("--ec2cert", metavar="FILE",
                   help="file containing the cloud's X.509 certificate (default: $EUCALYPTUS_CERT)")
    p.add_argument("-u", "--user", metavar="ACCOUNT", help="your account ID (default: $EC2_USER_ID)")
    p.add_argument("-d", "--destination", metavar="DIR",
                   help="location to place the bundle's files (default: a new directory in "
                   "$TMPDIR, $TEMP, $TMP or /var/tmp)")
    p.add_argument("-p", "--prefix",
                   help="the file name prefix to give the bundle's files (default: the image's file name)")
    p.add_argument("--kernel", metavar="IMAGE",
                   help="ID of the kernel image to associate with this machine image "
                   "('true' bundles a kernel image)")
    p.add_argument("--ramdisk", metavar="IMAGE",
                   help="ID of the ramdisk image to associate with this machine image "
                   "('true' bundles a ramdisk image)")
    p.add_argument("-B", "--block-device-mappings", metavar="VIRTUAL1=DEVICE1,VIRTUAL2=DEVICE2,...",
                   type=_argtype(bundle.parse_block_device_mapping), default={},
                   help="block device mapping scheme with which to launch instances of this image")
    p.add_argument("--productcodes", metavar="CODE1,CODE2,...", default=[], type=bundle.parse_list,
                   help="comma-separated list of product codes for the image")
    p.add_argument("--image-type", choices=bundle.IMAGE_TYPES, default="machine", help=argparse.SUPPRESS)
    p.add_argument("--part-size", type=config.parse_size, default=bundle.PART_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--enc-key", type=hex_secret, help=argparse.SUPPRESS)
    p.add_argument("--enc-iv", type=hex_secret, help=argparse.SUPPRESS)
    p.add_argument("--batch", action="store_true", help=argparse.SUPPRESS)  # no-op, as in euca2ools
    return p


def main(argv=None):
    p = parser()
    args = p.parse_args(argv)
    env = os.environ
    args.user = args.user or env.get("EC2_USER_ID")
    args.cert = args.cert or env.get("EC2_CERT") or env.get("EUCA_CERT")
    args.privatekey = args.privatekey or env.get("EC2_PRIVATE_KEY") or env.get("EUCA_PRIVATE_KEY")
    args.ec2cert = args.ec2cert or env.get("EUCALYPTUS_CERT")
    for value, flag, what in ((args.user, "-u", "account ID"), (args.cert, "-c", "certificate"),
                              (args.privatekey, "-k", "private key"),
                              (args.ec2cert, "--ec2cert", "cloud certificate")):
        if not value:
            p.error(f"missing {what}; please supply one with {flag}")

    try:
        image_type = bundle.resolve_image_type(args.kernel, args.ramdisk, args.block_device_mappings,
                                               args.image_type)
    except bundle.BundleError as exc:
        p.error(str(exc))

    destination = args.destination
    made = None
    progress = ProgressBar("Bundling image")
    try:
        if not destination:
            base = env.get("TMPDIR") or env.get("TEMP") or env.get("TMP") or "/var/tmp"
            destination = made = tempfile.mkdtemp(prefix="bundle-", dir=base)
        manifest, parts = bundle.bundle_image(
            args.image, destination, arch=args.arch, user=args.user, private_key=args.privatekey,
            user_cert=args.cert, ec2_cert=args.ec2cert, prefix=args.prefix, image_type=image_type,
            kernel_id=args.kernel, ramdisk_id=args.ramdisk,
            block_device_mapping=args.block_device_mappings, product_codes=args.productcodes,
            part_size=args.part_size, key=args.enc_key, iv=args.enc_iv, progress=progress)
    except (bundle.BundleError, OSError, KeyboardInterrupt) as exc:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(exc, KeyboardInterrupt):
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    finally:
        progress.close()
    for part in parts:
        print("Wrote", part)
    print("Wrote manifest", manifest)
    return 0


class ProgressBar:
    """A progress bar on a terminal, as euca2ools shows; silent otherwise."""

    def __init__(self, label):
        self.label = label
        self.bar = None

    def __call__(self, done, total):
        if not sys.stderr.isatty():
            return
        if self.bar is None:
            import tqdm
            self.bar = tqdm.tqdm(total=total, unit="B", unit_scale=True, desc=self.label, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


if __name__ == "__main__":
    sys.exit(main())
