"""The euca2ools import commands, with euca2ools' flags and output lines, on boto3:
euca-import-volume, euca-import-instance, euca-resume-import,
euca-describe-conversion-tasks, euca-cancel-conversion-task, euca-delete-disk-image.

As euca2ools does: the task is submitted with a presigned GET URL of a manifest key
that does not exist yet; the upload (resume-import) then writes the import manifest
(version 2010-11-15: parts of a fixed size, presigned HEAD/GET/DELETE URLs of each,
a self-destruct URL) and sends each part that a HEAD does not find (so a resumed
upload sends only the missing parts).  Every part carries its Content-MD5, which the
store checks as it arrives; the worker checks each part's MD5 ETag as it fetches.

Credentials and endpoints the AWS way (environment, ~/.aws profiles, --profile,
--region, --endpoint-url, --s3-endpoint-url); euca2ools' -I/-S/-U also work.
"""

import argparse
import base64
import hashlib
import math
import os
import sys
import urllib.parse
import uuid

from botocore.exceptions import BotoCoreError
from botocore.exceptions import ClientError as AWSError
from tqdm import tqdm

from imaging_service import manifest as import_manifest
from imaging_service.clients.common import (
    ClientError,
    add_aws_arguments,
    check_image,
    clients,
)

PART_MiB = 10
DAY = 86400
# Presigned URLs of SigV4 last at most 7 days.
MAX_PRESIGN = 7 * DAY


def _aws(parser):
    add_aws_arguments(parser)
    parser.add_argument("-I", "--access-key-id", help=argparse.SUPPRESS)
    parser.add_argument("-S", "--secret-key", help=argparse.SUPPRESS)
    parser.add_argument("-U", "--url", dest="url", help="the service's URL (as --endpoint-url)")
    parser.add_argument("--show-empty-fields", action="store_true", help=argparse.SUPPRESS)


def _clients(args):
    if args.url and not args.endpoint_url:
        args.endpoint_url = args.url
    if args.access_key_id:
        os.environ["AWS_ACCESS_KEY_ID"] = args.access_key_id
    if args.secret_key:
        os.environ["AWS_SECRET_ACCESS_KEY"] = args.secret_key
    return clients(args)


# ---- output lines, as euca2ools prints them ------------------------------------------------------------

def conversion_task_lines(task):
    """euca2ools' print_conversion_task: a TaskType line, then a DISKIMAGE line per disk."""
    bits = []
    if task.get("ImportVolume"):
        bits += ["TaskType", "IMPORTVOLUME"]
    if task.get("ImportInstance"):
        bits += ["TaskType", "IMPORTINSTANCE"]
    for name, key in (("TaskId", "ConversionTaskId"), ("ExpirationTime", "ExpirationTime"),
                      ("Status", "State"), ("StatusMessage", "StatusMessage")):
        if task.get(key):
            bits += [name, str(task[key])]
    lines = []
    if task.get("ImportVolume"):
        lines.append("\t".join(bits))
        lines.append(_disk_line(task["ImportVolume"]))
    if task.get("ImportInstance"):
        if task["ImportInstance"].get("InstanceId"):
            bits += ["InstanceID", task["ImportInstance"]["InstanceId"]]
        lines.append("\t".join(bits))
        lines += [_disk_line(v) for v in task["ImportInstance"].get("Volumes") or []]
    return lines


def _disk_line(container):
    bits = ["DISKIMAGE"]
    image, volume = container.get("Image") or {}, container.get("Volume") or {}
    for name, value in (("DiskImageFormat", image.get("Format")), ("DiskImageSize", image.get("Size")),
                        ("VolumeId", volume.get("Id")), ("VolumeSize", volume.get("Size")),
                        ("AvailabilityZone", container.get("AvailabilityZone")),
                        ("ApproximateBytesConverted", container.get("BytesConverted")),
                        ("Status", container.get("Status")), ("StatusMessage", container.get("StatusMessage"))):
        if value:
            bits += [name, str(value)]
    return "\t".join(bits)


# ---- the upload ---------------------------------------------------------------------------------------------

def _location(url):
    """(bucket, key) of a path-style presigned URL."""
    path = urllib.parse.unquote(urllib.parse.urlsplit(url).path).lstrip("/")
    bucket, _, key = path.partition("/")
    if not bucket or not key:
        raise ClientError(f"the manifest URL {url.split('?')[0]} is not https://HOST/BUCKET/KEY")
    return bucket, key


def _describe(ec2, task_id):
    found = ec2.describe_conversion_tasks(ConversionTaskIds=[task_id])["ConversionTasks"]
    if not found:
        raise ClientError(f"no conversion task {task_id}")
    return found[0]


def _container(task):
    if task.get("ImportVolume"):
        return task["ImportVolume"]
    return task["ImportInstance"]["Volumes"][0]


def _exists(s3, bucket, key):
    try:
        return s3.head_object(Bucket=bucket, Key=key)
    except AWSError as e:
        if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _make_manifest(s3, container, source, bucket, manifest_key, expires, part_size):
    size = os.path.getsize(source)
    seconds = min(expires * DAY, MAX_PRESIGN)

    def presign(method, key):
        return s3.generate_presigned_url(method, Params={"Bucket": bucket, "Key": key}, ExpiresIn=seconds)
    prefix = manifest_key.rsplit("/", 1)[0]
    parts = []
    for index, start in enumerate(range(0, size, part_size)):
        key = f"{prefix}/{os.path.basename(source)}.part.{index}"
        parts.append(import_manifest.Part(index, start, min(start + part_size, size) - 1, key,
                                          presign("head_object", key), presign("get_object", key),
                                          presign("delete_object", key)))
    return import_manifest.ImportManifest(
        container["Image"]["Format"].upper(), int(container["Image"]["Size"]), int(container["Volume"]["Size"]),
        parts, presign("delete_object", manifest_key), ("euca-import-volume", "imaging-service", "2010-11-15"))


def resume(ec2, s3, task_id, source, expires=30, part_size=PART_MiB << 20, show_progress=True):
    """euca-resume-import: the manifest (the one on the store, or a new one), then every part
    that a HEAD does not find, each with its Content-MD5.  Returns how many parts were sent."""
    task = _describe(ec2, task_id)
    container = _container(task)
    bucket, manifest_key = _location(container["Image"]["ImportManifestUrl"])
    size = os.path.getsize(source)
    if _exists(s3, bucket, manifest_key):
        body = s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()
        try:
            manifest = import_manifest.parse(body)
        except import_manifest.ManifestError as e:
            raise ClientError(f"the import manifest s3://{bucket}/{manifest_key} is not usable: {e}") from None
    else:
        manifest = _make_manifest(s3, container, source, bucket, manifest_key, expires, part_size)
        s3.put_object(Bucket=bucket, Key=manifest_key, Body=import_manifest.build(manifest))
    if manifest.parts[-1].end + 1 != size:
        raise ClientError(f'file "{source}" is not the same size as the file the import started with '
                          f"(expected: {manifest.parts[-1].end + 1}, actual: {size})")
    missing = [p for p in manifest.parts if not _present(s3, bucket, p)]
    with tqdm(total=sum(p.size for p in missing), desc=f"upload {task_id}", unit="B", unit_scale=True,
              unit_divisor=1024, file=sys.stderr, disable=not show_progress, dynamic_ncols=True) as bar, \
            open(source, "rb") as f:
        for part in missing:
            f.seek(part.start)
            data = f.read(part.size)
            md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
            s3.put_object(Bucket=bucket, Key=part.key, Body=data, ContentMD5=md5)
            bar.update(len(data))
    return len(missing)


def _present(s3, bucket, part):
    """A part already uploaded whole (HEAD first: a resumed upload sends only what is missing)."""
    head = _exists(s3, bucket, part.key)
    return head is not None and head.get("ContentLength") == part.size


# ---- the commands ----------------------------------------------------------------------------------------

def _image_bytes(args, source):
    if args.image_size:
        return int(args.image_size)
    if args.format.upper() == "RAW":
        return os.path.getsize(source)
    raise ClientError(f"argument --image-size is required for {args.format.upper()} files")


def _submit_legacy(args, ec2, s3, call):
    fmt = args.format.upper()
    if fmt not in ("VMDK", "RAW", "VHD"):
        raise ClientError(f"argument -f/--format: {args.format!r} is not vmdk, raw or vhd")
    if args.expires < 1:
        raise ClientError("argument -x/--expires: value must be positive")
    check_image(args.source, fmt.lower())
    image_bytes = _image_bytes(args, args.source)
    volume_size = args.volume_size or math.ceil(image_bytes / 2 ** 30)
    manifest_url = args.manifest_url
    if not manifest_url:
        try:
            s3.head_bucket(Bucket=args.bucket)
        except AWSError:
            s3.create_bucket(Bucket=args.bucket)
        key = f"{uuid.uuid4()}/{os.path.basename(args.source)}.manifest.xml"
        if args.prefix:
            key = f"{args.prefix.rstrip('/')}/{key}"
        manifest_url = s3.generate_presigned_url("get_object", Params={"Bucket": args.bucket, "Key": key},
                                                 ExpiresIn=min(args.expires * DAY, MAX_PRESIGN))
    image = {"Format": fmt, "Bytes": image_bytes, "ImportManifestUrl": manifest_url}
    task = call(image, volume_size)
    if not args.no_upload:
        resume(ec2, s3, task["ConversionTaskId"], args.source, args.expires, show_progress=args.show_progress)
    return task


def cmd_import_volume(args, ec2, s3):
    def call(image, volume_size):
        params = {"Image": image, "Volume": {"Size": volume_size}, "AvailabilityZone": args.availability_zone}
        if args.description:
            params["Description"] = args.description
        return ec2.import_volume(**params)["ConversionTask"]
    task = _submit_legacy(args, ec2, s3, call)
    print("\n".join(conversion_task_lines(task)))
    return 0


def cmd_import_instance(args, ec2, s3):
    def call(image, volume_size):
        launch = {"Architecture": args.architecture, "InstanceType": args.instance_type}
        if args.availability_zone:
            launch["Placement"] = {"AvailabilityZone": args.availability_zone}
        for name, value in (("KeyName", args.key), ("SubnetId", args.subnet),
                            ("PrivateIpAddress", args.private_ip_address)):
            if value:
                launch[name] = value
        if args.group:
            launch["GroupNames"] = args.group
        params = {"Platform": args.platform, "LaunchSpecification": launch,
                  "DiskImages": [{"Image": image, "Volume": {"Size": volume_size},
                                  **({"Description": args.description} if args.description else {})}]}
        if args.description:
            params["Description"] = args.description
        return ec2.import_instance(**params)["ConversionTask"]
    task = _submit_legacy(args, ec2, s3, call)
    print("\n".join(conversion_task_lines(task)))
    return 0


def cmd_resume_import(args, ec2, s3):
    if args.expires < 1:
        raise ClientError("argument -x/--expires: value must be positive")
    resume(ec2, s3, args.task, args.source, args.expires, part_size=args.part_size << 20,
           show_progress=args.show_progress)
    return 0


def cmd_describe(args, ec2, s3):
    kwargs = {"ConversionTaskIds": args.tasks} if args.tasks else {}
    for task in ec2.describe_conversion_tasks(**kwargs)["ConversionTasks"]:
        print("\n".join(conversion_task_lines(task)))
    return 0


def cmd_cancel(args, ec2, s3):
    params = {"ConversionTaskId": args.task}
    if args.reason:
        params["ReasonMessage"] = args.reason
    ec2.cancel_conversion_task(**params)
    return 0


def cmd_delete_disk_image(args, ec2, s3):
    """Delete the uploaded parts and the manifest of a task (not while it is active)."""
    task = _describe(ec2, args.task)
    if task.get("State") == "active" and not args.ignore_active_task:
        raise ClientError(f"import task {args.task} is still active; cancel it first or use --ignore-active-task")
    bucket, manifest_key = _location(_container(task)["Image"]["ImportManifestUrl"])
    if not _exists(s3, bucket, manifest_key):
        raise ClientError(f"the import manifest s3://{bucket}/{manifest_key} does not exist (deleted already?)")
    manifest = import_manifest.parse(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read())
    for part in manifest.parts:
        s3.delete_object(Bucket=bucket, Key=part.key)
    s3.delete_object(Bucket=bucket, Key=manifest_key)
    return 0


def _legacy_args(p):
    p.add_argument("source", metavar="FILE", help="file containing the disk image to import (required)")
    p.add_argument("-f", "--format", required=True, help='the image\'s format ("vmdk", "raw", or "vhd") (required)')
    p.add_argument("-s", "--volume-size", type=int, metavar="GiB", help="size of the volume to import to, in GiB")
    p.add_argument("--image-size", metavar="BYTES", help="size of the image (required for non-raw files)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("-b", "--bucket", help="the bucket to upload the volume to")
    where.add_argument("--manifest-url", metavar="URL", help="a pre-signed URL that points to the import manifest")
    p.add_argument("--prefix", help="a prefix to add to the names of the volume parts as they are uploaded")
    p.add_argument("-x", "--expires", metavar="DAYS", type=int, default=30,
                   help="how long the import manifest should remain valid, in days (default: 30; "
                        "presigned URLs last at most 7)")
    p.add_argument("--no-upload", action="store_true",
                   help="start the import process, but do not upload the volume (see euca-resume-import)")
    p.add_argument("-d", "--description", help="a description for the import task (not the volume)")
    p.add_argument("--show-progress", action="store_true", default=sys.stderr.isatty(),
                   help="show a progress bar of the upload")


COMMANDS = {}


def _command(name, description):
    def register(build):
        COMMANDS[name] = (description, build)
        return build
    return register


@_command("euca-import-volume", "Import a file to a volume in the cloud")
def _p_import_volume(p):
    _legacy_args(p)
    p.add_argument("-z", "--availability-zone", required=True, metavar="ZONE",
                   help="the zone in which to create the volume (required)")
    return cmd_import_volume


@_command("euca-import-instance", "Import an instance into the cloud")
def _p_import_instance(p):
    _legacy_args(p)
    p.add_argument("-t", "--instance-type", required=True, metavar="INSTANCETYPE",
                   help="the type of instance to import to (required)")
    p.add_argument("-a", "--architecture", required=True, choices=("i386", "x86_64", "arm64"),
                   help="the architecture of the image (required)")
    p.add_argument("-p", "--platform", required=True, choices=("Windows", "Linux"),
                   help="the operating system of the image (required)")
    p.add_argument("-z", "--availability-zone", metavar="ZONE", help="the zone in which to create the instance")
    p.add_argument("-g", "--group", action="append", help="name of a security group for the instance")
    p.add_argument("-k", "--key", metavar="KEYPAIR", help="the key pair for the instance")
    p.add_argument("--subnet", metavar="SUBNET")
    p.add_argument("--private-ip-address", metavar="ADDRESS")
    return cmd_import_instance


@_command("euca-resume-import", "Perform the upload step of an import task")
def _p_resume(p):
    p.add_argument("source", metavar="FILE", help="file containing the disk image to import (required)")
    p.add_argument("-t", "--task", required=True, help="the ID of the import task to resume (required)")
    p.add_argument("-x", "--expires", metavar="DAYS", type=int, default=30,
                   help="how long the import manifest should remain valid, in days (default: 30)")
    p.add_argument("--part-size", metavar="MiB", type=int, default=PART_MiB, help=argparse.SUPPRESS)
    p.add_argument("--show-progress", action="store_true", default=sys.stderr.isatty())
    return cmd_resume_import


@_command("euca-describe-conversion-tasks", "Show information about import operations")
def _p_describe(p):
    p.add_argument("tasks", metavar="TASK", nargs="*", help="limit results to specific tasks")
    return cmd_describe


@_command("euca-cancel-conversion-task", "Cancel an import task")
def _p_cancel(p):
    p.add_argument("task", metavar="TASK-ID", help="ID of the import task to cancel (required)")
    p.add_argument("--reason", help=argparse.SUPPRESS)
    return cmd_cancel


@_command("euca-delete-disk-image", "Delete a disk image used for an import task")
def _p_delete(p):
    p.add_argument("-t", "--task", required=True, help="ID of the task to delete the image from (required)")
    p.add_argument("--ignore-active-task", action="store_true",
                   help="delete the disk image even if the import task is active")
    return cmd_delete_disk_image


def run(name, argv=None):
    description, build = COMMANDS[name]
    p = argparse.ArgumentParser(prog=name, description=description)
    _aws(p)
    handler = build(p)
    args = p.parse_args(argv)
    try:
        ec2, s3 = _clients(args)
        return handler(args, ec2, s3)
    except ClientError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except AWSError as e:
        err = e.response.get("Error", {})
        print(f"{name}: error ({err.get('Code')}): {err.get('Message')}", file=sys.stderr)
        return 1
    except (BotoCoreError, import_manifest.ManifestError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1


def import_volume():
    return run("euca-import-volume")


def import_instance():
    return run("euca-import-instance")


def resume_import():
    return run("euca-resume-import")


def describe_conversion_tasks():
    return run("euca-describe-conversion-tasks")


def cancel_conversion_task():
    return run("euca-cancel-conversion-task")


def delete_disk_image():
    return run("euca-delete-disk-image")


if __name__ == "__main__":
    sys.exit(run(sys.argv[1], sys.argv[2:]))
