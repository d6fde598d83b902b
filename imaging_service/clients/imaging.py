"""imaging: import a disk image into the imaging service (or any EC2 VM Import API) and
follow it.

  imaging import disk.vmdk --bucket B      upload, ImportImage, progress bars until it ends
  imaging list | status TASK | wait TASK | cancel TASK | logs TASK | export AMI --bucket B

Credentials and endpoints as the AWS CLI takes them: the environment, ~/.aws/credentials
profiles, --profile, --region, --endpoint-url (and --s3-endpoint-url for the upload).
Exit status: 0 success (for import and wait: the task completed), 1 failure or refusal,
2 bad usage.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import boto3.s3.transfer
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError
from botocore.exceptions import ClientError as AWSError
from tqdm import tqdm

from imaging_service.clients.common import (
    ClientError,
    add_aws_arguments,
    check_image,
    clients,
    session,
)

PART_SIZE = 8 * 1024 * 1024
# Every state a task ends in (ImportImage: completed/deleted; AWS's own waiter never stops on
# a failure, this one does).
TERMINAL = ("completed", "deleted", "cancelled", "failed", "error")


def _kind(task_id):
    return "snapshot" if task_id.startswith("import-snap-") else \
        "export" if task_id.startswith("export-") else "image"


def describe(ec2, task_id=None):
    """[{id, kind, status, progress, message, ...}] of one task or all of them."""
    out = []
    kinds = [_kind(task_id)] if task_id else ["image", "snapshot", "export"]
    for kind in kinds:
        ids = [task_id] if task_id else []
        if kind == "image":
            pages = _pages(ec2.describe_import_image_tasks, "ImportImageTasks", ImportTaskIds=ids)
            out += [_image_view(t) for t in pages]
        elif kind == "snapshot":
            pages = _pages(ec2.describe_import_snapshot_tasks, "ImportSnapshotTasks", ImportTaskIds=ids)
            out += [_snapshot_view(t) for t in pages]
        else:
            pages = _pages(ec2.describe_export_image_tasks, "ExportImageTasks", ExportImageTaskIds=ids)
            out += [_export_view(t) for t in pages]
    return out


def _pages(call, key, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if v}
    token = None
    while True:
        page = call(**kwargs, **({"NextToken": token} if token else {}))
        yield from page.get(key, [])
        token = page.get("NextToken")
        if not token:
            return


def _image_view(t):
    snap = (t.get("SnapshotDetails") or [{}])[0]
    return {"id": t["ImportTaskId"], "kind": "import-image", "status": t.get("Status"),
            "progress": int(t.get("Progress") or (100 if t.get("Status") == "completed" else 0)),
            "message": t.get("StatusMessage", ""), "result": t.get("ImageId", ""),
            "snapshot": snap.get("SnapshotId", ""), "size": snap.get("DiskImageSize"),
            "platform": t.get("Platform", ""), "description": t.get("Description", "")}


def _snapshot_view(t):
    d = t.get("SnapshotTaskDetail") or {}
    return {"id": t["ImportTaskId"], "kind": "import-snapshot", "status": d.get("Status"),
            "progress": int(d.get("Progress") or (100 if d.get("Status") == "completed" else 0)),
            "message": d.get("StatusMessage", ""), "result": d.get("SnapshotId", ""),
            "size": d.get("DiskImageSize"), "description": d.get("Description", "")}


def _export_view(t):
    s3 = t.get("S3ExportLocation") or {}
    return {"id": t["ExportImageTaskId"], "kind": "export-image", "status": t.get("Status"),
            "progress": int(t.get("Progress") or (100 if t.get("Status") == "completed" else 0)),
            "message": t.get("StatusMessage", ""), "result": f"s3://{s3.get('S3Bucket', '')}/{s3.get('S3Prefix', '')}",
            "image": t.get("ImageId", "")}


def one(ec2, task_id):
    found = describe(ec2, task_id)
    if not found:
        raise ClientError(f"no task {task_id}")
    return found[0]


def follow(ec2, task_id, quiet=False, interval=1.0, timeout=None):
    """Poll a task until it ends, with a progress bar on stderr; its last view."""
    bar = None if quiet else tqdm(total=100, desc="convert", unit="%", file=sys.stderr, dynamic_ncols=True,
                                  bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            view = one(ec2, task_id)
            if bar is not None:
                bar.update(max(0, view["progress"] - bar.n))
                bar.set_postfix_str(f"{view['status']}: {view['message']}"[:70], refresh=True)
            if view["status"] in TERMINAL:
                return view
            if deadline is not None and time.monotonic() > deadline:
                raise ClientError(f"{task_id} is still {view['status']} after {timeout} s")
            time.sleep(interval)
    finally:
        if bar is not None:
            bar.close()


def upload(s3, path, bucket, key, quiet=False):
    """Multipart upload, each part with its SHA-256 (x-amz-checksum-sha256, checked by the store
    as it arrives and kept with the object), with a progress bar (rate and ETA)."""
    size = os.path.getsize(path)
    try:
        s3.head_bucket(Bucket=bucket)
    except AWSError:
        s3.create_bucket(Bucket=bucket)
    config = boto3.s3.transfer.TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                              max_concurrency=4)
    with tqdm(total=size, desc="upload", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
              disable=quiet, dynamic_ncols=True) as bar:
        s3.upload_file(path, bucket, key, Config=config, Callback=bar.update,
                       ExtraArgs={"ChecksumAlgorithm": "SHA256"})


def default_bucket(ec2):
    """ACCOUNT-imports, the account from the service's DescribeAccountAttributes `account-id`
    (an attribute of this service; AWS's EC2 has none, so there --bucket is needed)."""
    try:
        found = ec2.describe_account_attributes()["AccountAttributes"]
    except AWSError as e:
        raise ClientError(f"cannot find your account for a default bucket ({e}); give --bucket") from None
    for attribute in found:
        if attribute.get("AttributeName") == "account-id" and attribute.get("AttributeValues"):
            return f"{attribute['AttributeValues'][0]['AttributeValue']}-imports"
    raise ClientError("the endpoint does not say which account you are (no account-id attribute); give --bucket")


def cmd_import(args, ec2, s3):
    fmt = args.format or os.path.splitext(args.file)[1].lstrip(".").lower() or "raw"
    if fmt == "img":
        fmt = "raw"
    check_image(args.file, fmt)
    bucket = args.bucket or default_bucket(ec2)
    key = args.key or f"{args.prefix or ''}{os.path.basename(args.file)}"
    upload(s3, args.file, bucket, key, quiet=args.quiet or args.json)
    container = {"Format": fmt.upper(), "UserBucket": {"S3Bucket": bucket, "S3Key": key}}
    if args.description:
        container["Description"] = args.description
    if args.snapshot:
        task_id = ec2.import_snapshot(DiskContainer=container, Description=args.description or "")["ImportTaskId"]
    else:
        params = {"DiskContainers": [container]}
        if args.platform:
            params["Platform"] = args.platform
        if args.architecture:
            params["Architecture"] = args.architecture
        if args.description:
            params["Description"] = args.description
        task_id = ec2.import_image(**params)["ImportTaskId"]
    if not (args.quiet or args.json):
        print(f"{task_id}: submitted (s3://{bucket}/{key})", file=sys.stderr)
    if args.no_wait:
        view = one(ec2, task_id)
    else:
        view = follow(ec2, task_id, quiet=args.quiet or args.json)
    return _print_end(args, view, wait=not args.no_wait)


def _print_end(args, view, wait=True):
    if args.json:
        print(json.dumps(view))
    else:
        print(_line(view))
    return 0 if not wait or view["status"] == "completed" else 1


def _line(v):
    return "\t".join(str(x) for x in (v["id"], v["status"], f"{v['progress']}%", v.get("result") or "-",
                                      v.get("message") or ""))


def cmd_list(args, ec2, s3):
    views = describe(ec2)
    if args.json:
        print(json.dumps(views))
    else:
        for v in views:
            print(_line(v))
    return 0


def cmd_status(args, ec2, s3):
    return _print_end(args, one(ec2, args.task), wait=False)


def cmd_wait(args, ec2, s3):
    return _print_end(args, follow(ec2, args.task, quiet=args.quiet or args.json, timeout=args.timeout))


def cmd_cancel(args, ec2, s3):
    answer = ec2.cancel_import_task(ImportTaskId=args.task, CancelReason=args.reason or "cancelled with imaging")
    view = {"id": answer.get("ImportTaskId", args.task), "previous": answer.get("PreviousState"),
            "status": answer.get("State")}
    print(json.dumps(view) if args.json else f"{view['id']}\t{view['previous']} -> {view['status']}")
    return 0


def task_log(args, ec2, task_id):
    """The service's event log of a task (GET /tasks/TASK/log.json, signed with SigV4 as the
    EC2 API): {"log": [[when, what, detail, level]], "events": [...], "inspection": {...}}."""
    credentials = session(args).get_credentials()
    if credentials is None:
        raise SystemExit("imaging: error: no AWS credentials (environment, ~/.aws/credentials or --profile)")
    url = f"{ec2.meta.endpoint_url.rstrip('/')}/tasks/{urllib.parse.quote(task_id)}/log.json"
    request = AWSRequest(method="GET", url=url, data=b"")
    request.headers["X-Amz-Content-SHA256"] = hashlib.sha256(b"").hexdigest()
    SigV4Auth(credentials.get_frozen_credentials(), "ec2", ec2.meta.region_name).add_auth(request)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=dict(request.headers)), timeout=60) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        with e:
            try:
                found = json.load(e)
            except ValueError:
                found = {"message": f"HTTP {e.code}"}
        raise SystemExit(f"imaging: error: {task_id}: {found.get('message') or found}") from None


def cmd_logs(args, ec2, s3):
    """What the API tells of a task, one fact a line (--follow: each change until it ends), then
    the toolkit's event log the service kept (hooks with result and duration, validators) and
    the inspection report."""
    last = None
    while True:
        view = one(ec2, args.task)
        line = f"{time.strftime('%H:%M:%S')} {view['status']} {view['progress']}% {view['message']}"
        if line.split(" ", 1)[1] != last:
            if not args.json:
                print(line, flush=True)
            last = line.split(" ", 1)[1]
        if not args.follow or view["status"] in TERMINAL:
            break
        time.sleep(1)
    found = task_log(args, ec2, args.task)
    if args.json:
        print(json.dumps({**view, "log": found["log"], "events": found["events"],
                          "inspection": found["inspection"]}))
        return 0
    for when, what, detail, _level in found["log"]:
        print(f"{when or '        '} {what}: {detail}")
    if found.get("inspection"):
        print("inspection report:")
        print(json.dumps(found["inspection"], indent=2, sort_keys=True))
    return 0


def cmd_export(args, ec2, s3):
    params = {"ImageId": args.image, "DiskImageFormat": args.format.upper(),
              "S3ExportLocation": {"S3Bucket": args.bucket, **({"S3Prefix": args.prefix} if args.prefix else {})}}
    task_id = ec2.export_image(**params)["ExportImageTaskId"]
    if args.no_wait:
        return _print_end(args, one(ec2, task_id), wait=False)
    return _print_end(args, follow(ec2, task_id, quiet=args.quiet or args.json))


def parser():
    p = argparse.ArgumentParser(prog="imaging", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    common = argparse.ArgumentParser(add_help=False)
    add_aws_arguments(common)
    common.add_argument("--json", action="store_true", help="print JSON (no progress bars)")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")
    imp = verbs.add_parser("import", parents=[common], help="upload FILE, import it, follow it to its end")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("-f", "--format", help="RAW, VMDK, VHD, VHDX or QCOW2 (default: the file's extension)")
    imp.add_argument("-b", "--bucket", default=os.environ.get("IMAGING_BUCKET"),
                     help="bucket to upload to, made if missing (or IMAGING_BUCKET; default: ACCOUNTID-imports, "
                     "the account as the imaging service tells it); on the service's embedded store an "
                     "account's buckets are named ACCOUNTID-...")
    imp.add_argument("--key", help="object key (default: PREFIX + the file's name)")
    imp.add_argument("--prefix", help="key prefix")
    imp.add_argument("--snapshot", action="store_true", help="ImportSnapshot instead of ImportImage")
    imp.add_argument("-p", "--platform", choices=["Linux", "Windows"], help="the image's platform")
    imp.add_argument("-a", "--architecture", help="x86_64, i386 or arm64")
    imp.add_argument("-d", "--description")
    imp.add_argument("--no-wait", action="store_true", help="submit and return at once")
    imp.set_defaults(run=cmd_import)
    listing = verbs.add_parser("list", parents=[common], help="every task of the account")
    listing.set_defaults(run=cmd_list)
    for name, run, text in (("status", cmd_status, "one task's state"),
                            ("wait", cmd_wait, "wait until the task ends (exit 0 only when it completed)"),
                            ("cancel", cmd_cancel, "cancel a task"),
                            ("logs", cmd_logs, "what the service says of a task")):
        sub = verbs.add_parser(name, parents=[common], help=text)
        sub.add_argument("task", metavar="TASK")
        sub.set_defaults(run=run)
        if name == "wait":
            sub.add_argument("--timeout", type=float, help="give up after this many seconds (exit 1)")
        if name == "cancel":
            sub.add_argument("--reason")
        if name == "logs":
            sub.add_argument("-f", "--follow", action="store_true", help="print each change until the task ends")
    exp = verbs.add_parser("export", parents=[common], help="export an image (ami-...) to a bucket")
    exp.add_argument("image", metavar="IMAGE")
    exp.add_argument("-b", "--bucket", required=True)
    exp.add_argument("--prefix")
    exp.add_argument("-f", "--format", default="VMDK", help="VMDK, VHD or RAW")
    exp.add_argument("--no-wait", action="store_true")
    exp.set_defaults(run=cmd_export)
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        ec2, s3 = clients(args)
        return args.run(args, ec2, s3)
    except ClientError as e:
        print(f"imaging: error: {e}", file=sys.stderr)
        return 1
    except AWSError as e:
        err = e.response.get("Error", {})
        print(f"imaging: error: {err.get('Code')}: {err.get('Message')}", file=sys.stderr)
        return 1
    except BotoCoreError as e:
        print(f"imaging: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
