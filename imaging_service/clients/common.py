"""What the client commands share: AWS-style sessions and the check of a local image
before anything of it is uploaded."""

import os
import sys

import boto3
import botocore.config

from imaging_elements.convert import qemuimg
from imaging_elements.engine import confine, imagetype

# EC2's names of the formats and the toolkit's image types.
FORMATS = {"raw": "raw", "vmdk": "vmdk", "vhd": "vhd", "vhdx": "vhdx", "qcow2": "qcow2"}


class ClientError(Exception):
    """A refusal or failure the command reports in one line (exit status 1)."""


def add_aws_arguments(parser):
    parser.add_argument("--endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_EC2"),
                        help="the imaging service's EC2 endpoint (or AWS_ENDPOINT_URL_EC2 / AWS_ENDPOINT_URL)")
    parser.add_argument("--s3-endpoint-url", default=os.environ.get("AWS_ENDPOINT_URL_S3"),
                        help="the object store the images are uploaded to (or AWS_ENDPOINT_URL_S3)")
    parser.add_argument("--region", help="region (or AWS_DEFAULT_REGION, or the profile's)")
    parser.add_argument("--profile", help="a profile of ~/.aws/credentials and ~/.aws/config (or AWS_PROFILE)")


def session(args):
    """boto3's session: environment, ~/.aws files and --profile/--region, as the AWS CLI."""
    return boto3.session.Session(profile_name=args.profile, region_name=args.region or None)


def clients(args):
    """(ec2, s3) clients of the session, on the given endpoints."""
    s = session(args)
    credentials = s.get_credentials()
    if credentials is None:
        raise ClientError("no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile in "
                          "~/.aws/credentials (imaging-service credentials create prints them)")
    config = botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"})
    region = s.region_name or "us-east-1"
    ec2 = s.client("ec2", endpoint_url=args.endpoint_url, region_name=region, config=config)
    s3 = s.client("s3", endpoint_url=args.s3_endpoint_url, region_name=region,
                  config=botocore.config.Config(retries={"max_attempts": 3, "mode": "standard"},
                                                s3={"addressing_style": "path"}))
    args.access_key = credentials.access_key
    return ec2, s3


def check_image(path, declared):
    """Refuse, before any upload, a file that is not what it is declared to be, or a qcow2/VMDK
    that reaches for another file (backing file, external data file, descriptor extents).
    Returns the toolkit's image type.  Read-only: the toolkit's own probes."""
    if not os.path.isfile(path):
        raise ClientError(f"{path}: not a regular file")
    declared = FORMATS.get((declared or "").lower())
    if declared is None:
        raise ClientError(f"{path}: format must be one of {', '.join(f.upper() for f in FORMATS)}")
    try:
        image_type = imagetype.resolve(path, declared)
        if image_type in ("vmdk", "qcow2", "vhd", "vhdx"):
            try:
                qemuimg.check(path, image_type, name=path)  # qemu-img info, confined to the file
            except confine.ConfineError as e:  # no bubblewrap here: the service checks it anyway
                print(f"warning: {path}: not checked before upload: {e}", file=sys.stderr)
    except (imagetype.ImageTypeError, qemuimg.QemuImgError) as e:
        raise ClientError(str(e)) from None
    return image_type
