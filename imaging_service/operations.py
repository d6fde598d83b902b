"""The API's handlers: parameters (as ec2api parsed them from botocore's model)
in, the operation's result dict (as boto3 would return it) out.

Each handler checks what only it can (formats, sources, ids), submits or
reads tasks through tasks.py, and shows them through one view per task
kind.  Tenant isolation: every query is by the requesting account, so
another account's id answers exactly as an id that does not exist.
"""

import base64
import re

from imaging_service import tasks
from imaging_service.ec2api import iso8601
from imaging_service.errors import EC2Error, invalid, missing

IMAGE_FORMATS = ("vmdk", "vhd", "vhdx", "raw", "qcow2")
GiB = 1024 ** 3

# What a task kind's ids look like: a malformed id is InvalidConversionTaskId.Malformed.
ID_PATTERNS = {
    "import-image": re.compile(r"^import-ami-[0-9a-f]{8,17}$"),
    "import-snapshot": re.compile(r"^import-snap-[0-9a-f]{8,17}$"),
    "import-volume": re.compile(r"^import-vol-[0-9a-f]{8,17}$"),
    "import-instance": re.compile(r"^import-i-[0-9a-f]{8,17}$"),
    "export-image": re.compile(r"^export-ami-[0-9a-f]{8,17}$"),
}
LEGACY = ("import-volume", "import-instance")
RESOURCE_ERRORS = {  # kind: (id prefix, malformed code, not-found code)
    "image": ("ami", "InvalidAMIID.Malformed", "InvalidAMIID.NotFound"),
    "snapshot": ("snap", "InvalidSnapshotID.Malformed", "InvalidSnapshot.NotFound"),
    "volume": ("vol", "InvalidVolumeID.Malformed", "InvalidVolume.NotFound"),
}
STEP_TEXT = {"download": "downloading", "validate": "validating", "convert": "converting",
             "instance-validate": "booting", "store": "storing"}
# Internal state -> what legacy (ImportVolume/ImportInstance) callers see; a failed task shows
# `cancelled` with its reason, as Eucalyptus did, so that the ConversionTaskCompleted waiter stops.
LEGACY_STATE = {"waiting-upload": "active", "pending": "active", "converting": "active",
                "cancelling": "cancelling", "cancelled": "cancelled", "failed": "cancelled",
                "completed": "completed"}
# ... and what ImportImage/ImportSnapshot/ExportImage callers see (AWS: a failed task is `deleted`).
IMPORT_STATE = {"waiting-upload": "active", "pending": "active", "converting": "active",
                "cancelling": "deleting", "cancelled": "deleted", "failed": "deleted",
                "completed": "completed"}
TASK_STATE_FILTER = {}
for _internal, _shown in IMPORT_STATE.items():
    TASK_STATE_FILTER.setdefault(_shown, []).append(_internal)


class Context:
    """One request: the service (db, settings, allowed URLs), the caller, the request id."""

    def __init__(self, service, account, access_key, request_id):
        self.service, self.account, self.access_key, self.request_id = service, account, access_key, request_id
        self.db, self.settings = service.db, service.settings


# ---- views -------------------------------------------------------------------------------------

def status_message(task):
    if task.state in ("waiting-upload", "pending", "converting"):
        text = {"waiting-upload": "waiting for the upload", "pending": "pending"}.get(
            task.state, STEP_TEXT.get(task.step, "converting"))
        return f"{text}: {task.status_message}" if task.status_message else text
    return task.status_message or None


def _tags(params):
    return params.get("tags") or None


def _source_fields(params):
    source = params.get("source", {})
    if "url" in source:
        return {"Url": source["url"]}
    if "bucket" in source:
        return {"UserBucket": {"S3Bucket": source["bucket"], "S3Key": source["key"]}}
    return {}


def _active(task):
    return task.state in ("waiting-upload", "pending", "converting")


def image_task_view(task):
    p, r = task.params, task.result or {}
    detail = {"Description": p.get("disk_description"), "DeviceName": "/dev/sda1",
              "DiskImageSize": float(task.bytes_total) if task.bytes_total else None,
              "Format": p.get("format", "").upper() or None, "SnapshotId": r.get("snapshot_id"),
              "Status": IMPORT_STATE[task.state], "StatusMessage": status_message(task),
              "Progress": str(task.progress) if _active(task) else None, **_source_fields(p)}
    platform = r.get("platform") or p.get("platform")
    return {"ImportTaskId": task.id, "Architecture": r.get("architecture") or p.get("architecture"),
            "Description": p.get("description"), "ImageId": r.get("image_id"),
            "Platform": platform.capitalize() if platform and platform != "auto" else None,
            "LicenseType": p.get("license_type"), "BootMode": p.get("boot_mode"),
            "Progress": str(task.progress) if _active(task) else None,
            "Status": IMPORT_STATE[task.state], "StatusMessage": status_message(task),
            "SnapshotDetails": [{k: v for k, v in detail.items() if v is not None}],
            "Tags": _tags(p)}


def snapshot_task_view(task):
    p, r = task.params, task.result or {}
    detail = {"Description": p.get("disk_description"),
              "DiskImageSize": float(task.bytes_total) if task.bytes_total else None,
              "Format": p.get("format", "").upper() or None, "SnapshotId": r.get("snapshot_id"),
              "Status": IMPORT_STATE[task.state], "StatusMessage": status_message(task),
              "Progress": str(task.progress) if _active(task) else None, "Encrypted": False,
              **_source_fields(p)}
    return {"ImportTaskId": task.id, "Description": p.get("description"),
            "SnapshotTaskDetail": {k: v for k, v in detail.items() if v is not None}, "Tags": _tags(p)}


def export_task_view(task):
    p = task.params
    return {"ExportImageTaskId": task.id, "Description": p.get("description"), "ImageId": p["image_id"],
            "Progress": str(task.progress) if _active(task) else None,
            "S3ExportLocation": {"S3Bucket": p["bucket"], "S3Prefix": p.get("prefix")},
            "Status": IMPORT_STATE[task.state], "StatusMessage": status_message(task), "Tags": _tags(p)}


def _legacy_disk(task):
    p, r = task.params, task.result or {}
    return {"AvailabilityZone": p.get("availability_zone"), "BytesConverted": task.bytes_done or 0,
            "Description": p.get("disk_description"),
            "Image": {"Format": p["format"].upper(), "ImportManifestUrl": p["source"]["manifest_url"],
                      "Size": p.get("bytes")},
            "Volume": {"Id": r.get("volume_id"), "Size": p.get("volume_size")}}


def conversion_task_view(task):
    view = {"ConversionTaskId": task.id, "State": LEGACY_STATE[task.state],
            "StatusMessage": status_message(task) or (task.state if task.state == "failed" else None),
            "ExpirationTime": iso8601(task.expires_at) if task.expires_at else None,
            "Tags": _tags(task.params)}
    disk = _legacy_disk(task)
    if task.kind == "import-volume":
        view["ImportVolume"] = disk
    else:
        disk.pop("Description")
        disk.update(Status=view["State"], StatusMessage=view["StatusMessage"],
                    Description=task.params.get("disk_description"))
        view["ImportInstance"] = {"Description": task.params.get("description"),
                                  "InstanceId": (task.result or {}).get("instance_id"),
                                  "Platform": task.params.get("platform_shown"), "Volumes": [disk]}
    return view


VIEWS = {"import-image": image_task_view, "import-snapshot": snapshot_task_view,
         "import-volume": conversion_task_view, "import-instance": conversion_task_view,
         "export-image": export_task_view}


# ---- common checks -----------------------------------------------------------------------------

def dry_run(params):
    if params.get("DryRun"):
        raise EC2Error("DryRunOperation", "Request would have succeeded, but DryRun flag is set.")


def check_task_id(task_id, kinds):
    if not any(ID_PATTERNS[k].match(task_id or "") for k in kinds):
        raise EC2Error("InvalidConversionTaskId.Malformed", f"The task ID '{task_id}' is malformed.")


def not_found(task_id):
    return EC2Error("InvalidConversionTaskId", f"The task ID '{task_id}' does not exist.")


def _image_format(value, name):
    fmt = (value or "").lower()
    if not fmt:
        raise missing(name)
    if fmt not in IMAGE_FORMATS:
        raise invalid(name, value, f"Supported formats: {', '.join(f.upper() for f in IMAGE_FORMATS)}.")
    return fmt


def _source(ctx, container, prefix):
    """The task's source from a DiskContainer: a bucket object or a URL on the object store."""
    bucket = container.get("UserBucket")
    url = container.get("Url")
    if bucket and url:
        raise invalid(f"{prefix}.Url", url, "Give either UserBucket or Url, not both.")
    if bucket:
        if not bucket.get("S3Bucket"):
            raise missing(f"{prefix}.UserBucket.S3Bucket")
        if not bucket.get("S3Key"):
            raise missing(f"{prefix}.UserBucket.S3Key")
        source = {"bucket": bucket["S3Bucket"], "key": bucket["S3Key"]}
        # The checksums the store checked at upload, kept now: a part replaced later fails the fetch.
        recorded = ctx.service.record_integrity(ctx.access_key, source)
        if recorded:
            source["integrity"] = recorded
        return source
    if url:
        ctx.service.check_url(url, f"{prefix}.Url")
        return {"url": url}
    if container.get("SnapshotId"):
        raise invalid(f"{prefix}.SnapshotId", container["SnapshotId"], "Importing from a snapshot is not supported.")
    raise missing(f"{prefix}.UserBucket or {prefix}.Url")


def _platform(value, name):
    if value is None:
        return "auto"
    if value.lower() not in ("linux", "windows"):
        raise invalid(name, value, "It must be Linux or Windows.")
    return value.lower()


def _tag_params(params, resource_type):
    tags = []
    for spec in params.get("TagSpecifications") or []:
        if spec.get("ResourceType") not in (None, resource_type):
            raise invalid("TagSpecification.ResourceType", spec.get("ResourceType"),
                          f"Only {resource_type} can be tagged here.")
        tags += [{"Key": t.get("Key", ""), "Value": t.get("Value", "")} for t in spec.get("Tags") or []]
    return tags


def _no_encryption(params):
    """Results are stored as the object store keeps them; no KMS here: say so, never ignore it."""
    if params.get("Encrypted") or params.get("KmsKeyId"):
        raise EC2Error("InvalidParameterValue", "Encrypted imports (Encrypted, KmsKeyId) are not supported "
                                                "by this service.")


def _submit(ctx, kind, task_params, client_token=None, wait_for_upload=False):
    s = ctx.settings
    ctx.service.require_toolkit()
    task_params["access_key"] = ctx.access_key  # the worker reads user buckets with the user's key
    task = tasks.submit(ctx.db, ctx.account, kind, task_params, client_token=client_token,
                        wait_for_upload=wait_for_upload, max_active=s.max_active_tasks,
                        upload_expiry=s.upload_expiry)
    ctx.service.submitted(task.id)
    return task


def _states_from_filters(filters):
    states = []
    for f in filters or []:
        if f.get("Name") != "task-state":
            raise EC2Error("InvalidParameterValue", f"The filter '{f.get('Name')}' is invalid: "
                                                    "only task-state is supported.")
        for value in f.get("Values") or []:
            if value not in TASK_STATE_FILTER:
                raise invalid("Filter.Value", value, f"task-state is one of {', '.join(TASK_STATE_FILTER)}.")
            states += TASK_STATE_FILTER[value]
    return states or None


def _max_results(params, low=1, high=1000):
    value = params.get("MaxResults")
    if value is not None and not low <= value <= high:
        raise invalid("MaxResults", value, f"It must be between {low} and {high}.")
    return value


def _describe(ctx, params, kind, ids_name):
    ids = params.get(ids_name) or []
    for task_id in ids:
        check_task_id(task_id, (kind,))
    if params.get("NextToken"):
        try:
            tasks.decode_token(params["NextToken"])
        except ValueError as e:
            raise invalid("NextToken", params["NextToken"], str(e)) from None
    found, token = tasks.query(ctx.db, ctx.account, (kind,), ids=ids or None,
                               states=_states_from_filters(params.get("Filters")),
                               limit=_max_results(params), next_token=params.get("NextToken"))
    missing_ids = sorted(set(ids) - {t.id for t in found})
    if missing_ids and not params.get("NextToken") and not params.get("Filters") and not token:
        raise not_found(missing_ids[0])
    return [VIEWS[kind](t) for t in found], token


def _cancel(ctx, task_id, kinds, reason):
    done = tasks.cancel(ctx.db, ctx.account, task_id, reason=reason or "cancelled by the user", kinds=kinds)
    if done is None:
        raise not_found(task_id)
    return done


# ---- the operations ----------------------------------------------------------------------------

def import_image(ctx, params):
    containers = params.get("DiskContainers") or []
    if not containers:
        raise missing("DiskContainer")
    if len(containers) > 1:
        raise invalid("DiskContainer", len(containers), "This service imports one disk per image.")
    disk = containers[0]
    _no_encryption(params)
    task_params = {
        "source": _source(ctx, disk, "DiskContainer.1"),
        "format": _image_format(disk.get("Format"), "DiskContainer.1.Format"),
        "platform": _platform(params.get("Platform"), "Platform"),
        "architecture": params.get("Architecture") or "x86_64",
        "description": params.get("Description"), "disk_description": disk.get("Description"),
        "license_type": params.get("LicenseType"), "boot_mode": params.get("BootMode"),
        "tags": _tag_params(params, "import-image-task"),
    }
    if task_params["architecture"] not in ("x86_64", "i386", "arm64"):
        raise invalid("Architecture", task_params["architecture"], "It must be x86_64, i386 or arm64.")
    dry_run(params)
    task = _submit(ctx, "import-image", task_params, params.get("ClientToken"))
    view = image_task_view(task)
    view.pop("ImageId")
    return {k: v for k, v in view.items() if k not in ("BootMode",)}


def import_snapshot(ctx, params):
    disk = params.get("DiskContainer")
    if not disk:
        raise missing("DiskContainer")
    _no_encryption(params)
    task_params = {
        "source": _source(ctx, disk, "DiskContainer"),
        "format": _image_format(disk.get("Format"), "DiskContainer.Format"),
        "platform": "auto", "description": params.get("Description"),
        "disk_description": disk.get("Description"), "tags": _tag_params(params, "import-snapshot-task"),
    }
    dry_run(params)
    return snapshot_task_view(_submit(ctx, "import-snapshot", task_params, params.get("ClientToken")))


def describe_import_image_tasks(ctx, params):
    dry_run(params)
    views, token = _describe(ctx, params, "import-image", "ImportTaskIds")
    return {"ImportImageTasks": views, "NextToken": token}


def describe_import_snapshot_tasks(ctx, params):
    dry_run(params)
    views, token = _describe(ctx, params, "import-snapshot", "ImportTaskIds")
    return {"ImportSnapshotTasks": views, "NextToken": token}


def cancel_import_task(ctx, params):
    task_id = params.get("ImportTaskId")
    if not task_id:
        raise missing("ImportTaskId")
    check_task_id(task_id, ("import-image", "import-snapshot"))
    dry_run(params)
    previous, task = _cancel(ctx, task_id, ("import-image", "import-snapshot"), params.get("CancelReason"))
    return {"ImportTaskId": task.id, "PreviousState": IMPORT_STATE[previous], "State": IMPORT_STATE[task.state]}


def _legacy_image(ctx, image, prefix):
    url = image["ImportManifestUrl"]
    ctx.service.check_url(url, f"{prefix}.ImportManifestUrl")
    if image["Bytes"] <= 0:
        raise invalid(f"{prefix}.Bytes", image["Bytes"], "It must be the size of the image in bytes.")
    return {"source": {"manifest_url": url}, "format": image["Format"].lower(), "bytes": image["Bytes"]}


def _volume_size(volume, image_bytes, prefix):
    size = (volume or {}).get("Size")
    if size is None:
        raise missing(f"{prefix}.Size")
    if size <= 0 or size * GiB < image_bytes:
        raise invalid(f"{prefix}.Size", size, f"It must be at least the image's {image_bytes} bytes, in GiB.")
    return size


def import_volume(ctx, params):
    task_params = _legacy_image(ctx, params["Image"], "Image")
    task_params.update(volume_size=_volume_size(params.get("Volume"), task_params["bytes"], "Volume"),
                       availability_zone=params.get("AvailabilityZone") or f"{ctx.settings.region}a", platform="auto",
                       description=params.get("Description"), disk_description=params.get("Description"))
    dry_run(params)
    task = _submit(ctx, "import-volume", task_params, wait_for_upload=True)
    return {"ConversionTask": conversion_task_view(task)}


def import_instance(ctx, params):
    disks = params.get("DiskImages") or []
    if not disks:
        raise missing("DiskImage")
    if len(disks) > 1:
        raise invalid("DiskImage", len(disks), "This service imports one disk per instance.")
    disk = disks[0]
    if not disk.get("Image"):
        raise missing("DiskImage.1.Image")
    task_params = _legacy_image(ctx, disk["Image"], "DiskImage.1.Image")
    launch = params.get("LaunchSpecification") or {}
    zone = (launch.get("Placement") or {}).get("AvailabilityZone") or f"{ctx.settings.region}a"
    task_params.update(
        volume_size=_volume_size(disk.get("Volume"), task_params["bytes"], "DiskImage.1.Volume"),
        availability_zone=zone, platform=_platform(params["Platform"], "Platform"),
        platform_shown=params["Platform"], architecture=launch.get("Architecture") or "x86_64",
        instance_type=launch.get("InstanceType"), description=params.get("Description"),
        disk_description=disk.get("Description"))
    dry_run(params)
    task = _submit(ctx, "import-instance", task_params, wait_for_upload=True)
    return {"ConversionTask": conversion_task_view(task)}


def describe_conversion_tasks(ctx, params):
    ids = params.get("ConversionTaskIds") or []
    for task_id in ids:
        check_task_id(task_id, LEGACY)
    dry_run(params)
    found, _ = tasks.query(ctx.db, ctx.account, LEGACY, ids=ids or None)
    missing_ids = sorted(set(ids) - {t.id for t in found})
    if missing_ids:
        raise not_found(missing_ids[0])
    return {"ConversionTasks": [conversion_task_view(t) for t in found]}


def cancel_conversion_task(ctx, params):
    check_task_id(params["ConversionTaskId"], LEGACY)
    dry_run(params)
    _cancel(ctx, params["ConversionTaskId"], LEGACY, params.get("ReasonMessage"))
    return {}


def _resources(ctx, kind, ids):
    prefix, malformed, not_found_code = RESOURCE_ERRORS[kind]
    for rid in ids:
        if not re.match(rf"^{prefix}-[0-9a-f]{{8,17}}$", rid):
            raise EC2Error(malformed, f"Invalid id: \"{rid}\"")
    found = tasks.resources(ctx.db, ctx.account, kind, ids=ids or None)
    missing_ids = sorted(set(ids) - {r.id for r in found})
    if missing_ids:
        raise EC2Error(not_found_code, f"The {kind} id '{missing_ids[0]}' does not exist")
    return found


def _owned(ctx, owners):
    """Owners/OwnerIds: our resources are all the caller's; another owner has none here."""
    return not owners or any(o in ("self", ctx.account.id) for o in owners)


# Filter names of the Describe calls of resources, as AWS names them, and the response field
# (a path of keys) each one matches.  Values may use * and ? as AWS allows.
RESOURCE_FILTERS = {
    "image": {"image-id": ("ImageId",), "owner-id": ("OwnerId",), "state": ("State",),
              "architecture": ("Architecture",), "name": ("Name",), "description": ("Description",),
              "image-type": ("ImageType",), "is-public": ("Public",), "hypervisor": ("Hypervisor",),
              "platform": ("Platform",), "platform-details": ("PlatformDetails",),
              "root-device-type": ("RootDeviceType",), "root-device-name": ("RootDeviceName",),
              "virtualization-type": ("VirtualizationType",), "creation-date": ("CreationDate",),
              "block-device-mapping.device-name": ("BlockDeviceMappings", "DeviceName"),
              "block-device-mapping.volume-size": ("BlockDeviceMappings", "Ebs", "VolumeSize"),
              "block-device-mapping.encrypted": ("BlockDeviceMappings", "Ebs", "Encrypted")},
    "snapshot": {"snapshot-id": ("SnapshotId",), "owner-id": ("OwnerId",), "status": ("State",),
                 "progress": ("Progress",), "volume-size": ("VolumeSize",), "description": ("Description",),
                 "encrypted": ("Encrypted",), "start-time": ("StartTime",), "storage-tier": ("StorageTier",)},
    "volume": {"volume-id": ("VolumeId",), "status": ("State",), "size": ("Size",),
               "availability-zone": ("AvailabilityZone",), "volume-type": ("VolumeType",),
               "encrypted": ("Encrypted",), "create-time": ("CreateTime",)},
}
# MaxResults bounds of each call (AWS's).
RESOURCE_MAX = {"image": (1, 1000), "snapshot": (5, 1000), "volume": (5, 500)}


def _field_values(item, path):
    """The values at a path of keys, through lists (block device mappings)."""
    values = [item]
    for key in path:
        nxt = []
        for v in values:
            for one in (v if isinstance(v, list) else [v]):
                if isinstance(one, dict) and one.get(key) is not None:
                    nxt.append(one[key])
        values = nxt
    out = []
    for v in values:
        if isinstance(v, bool):
            out.append("true" if v else "false")
        elif hasattr(v, "isoformat"):
            out.append(iso8601(v))
        else:
            out.append(str(v))
    return out


def _wildcard(pattern):
    return re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern) + r"\Z",
                      re.DOTALL)


def _filtered(kind, items, filters):
    """AWS semantics: every filter must match, any of a filter's values; tag filters match
    nothing (results carry no tags here); an unknown name is InvalidParameterValue."""
    checks = []
    for f in filters or []:
        name = f.get("Name") or ""
        if name not in RESOURCE_FILTERS[kind] and not name.startswith("tag:") and name != "tag-key":
            raise EC2Error("InvalidParameterValue", f"The filter '{name}' is invalid: supported are "
                                                    f"{', '.join(sorted(RESOURCE_FILTERS[kind]))}.")
        patterns = [_wildcard(v) for v in f.get("Values") or []]
        checks.append((RESOURCE_FILTERS[kind].get(name), patterns))
    return [item for item in items
            if all(path is not None and any(p.match(v) for p in patterns for v in _field_values(item, path))
                   for path, patterns in checks)]


def _resource_page(ctx, params, kind, ids_name, items):
    """(page, NextToken) of the filtered items, in creation order; the token is the last id."""
    ids = params.get(ids_name) or []
    limit = params.get("MaxResults")
    if limit is not None:
        if ids:
            raise EC2Error("InvalidParameterCombination", f"The parameter {ids_name} cannot be used with "
                                                          "the parameter MaxResults")
        low, high = RESOURCE_MAX[kind]
        if not low <= limit <= high:
            raise invalid("MaxResults", limit, f"It must be between {low} and {high}.")
    items = _filtered(kind, items, params.get("Filters"))
    token = params.get("NextToken")
    if token:
        position = [i for i, item in enumerate(items) if item[_ID_FIELD[kind]] == _token_id(token)]
        if not position:
            raise invalid("NextToken", token, "It is not a NextToken of this call (or its item is gone).")
        items = items[position[0] + 1:]
    if limit and len(items) > limit:
        return items[:limit], base64.urlsafe_b64encode(items[limit - 1][_ID_FIELD[kind]].encode()).decode()
    return items, None


_ID_FIELD = {"image": "ImageId", "snapshot": "SnapshotId", "volume": "VolumeId"}


def _token_id(token):
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        return None


def describe_images(ctx, params):
    dry_run(params)
    if not _owned(ctx, params.get("Owners")):
        return {"Images": []}
    images = []
    for r in _resources(ctx, "image", params.get("ImageIds") or []):
        images.append({
            "ImageId": r.id, "OwnerId": r.account_id, "State": "available", "ImageType": "machine",
            "Architecture": r.architecture or "x86_64", "CreationDate": iso8601(r.created_at),
            "Description": r.description, "Name": r.id, "Public": False, "Hypervisor": "xen",
            "ImageLocation": f"{r.bucket}/{r.key}", "VirtualizationType": "hvm", "RootDeviceType": "ebs",
            "RootDeviceName": "/dev/sda1", "PlatformDetails": "Windows" if r.platform == "windows" else "Linux/UNIX",
            "Platform": "windows" if r.platform == "windows" else None,
            "BlockDeviceMappings": [{"DeviceName": "/dev/sda1",
                                     "Ebs": {"VolumeSize": max(1, -(-r.size // GiB)), "Encrypted": False,
                                             "DeleteOnTermination": True}}]})
    images, token = _resource_page(ctx, params, "image", "ImageIds", images)
    return {"Images": images, "NextToken": token}


def describe_snapshots(ctx, params):
    dry_run(params)
    if not _owned(ctx, params.get("OwnerIds")):
        return {"Snapshots": []}
    snapshots = [{
        "SnapshotId": r.id, "OwnerId": r.account_id, "State": "completed", "Progress": "100%",
        "StartTime": r.created_at, "VolumeSize": max(1, -(-r.size // GiB)), "Description": r.description,
        "Encrypted": False, "StorageTier": "standard", "FullSnapshotSizeInBytes": r.size}
        for r in _resources(ctx, "snapshot", params.get("SnapshotIds") or [])]
    snapshots, token = _resource_page(ctx, params, "snapshot", "SnapshotIds", snapshots)
    return {"Snapshots": snapshots, "NextToken": token}


def describe_volumes(ctx, params):
    dry_run(params)
    volumes = [{
        "VolumeId": r.id, "OwnerId": r.account_id, "Size": max(1, -(-r.size // GiB)), "State": "available",
        "CreateTime": r.created_at, "AvailabilityZone": (r.inspection or {}).get("availability_zone")
        or f"{ctx.settings.region}a", "VolumeType": "standard", "Encrypted": False, "Attachments": []}
        for r in _resources(ctx, "volume", params.get("VolumeIds") or [])]
    volumes, token = _resource_page(ctx, params, "volume", "VolumeIds", volumes)
    return {"Volumes": volumes, "NextToken": token}


def export_image(ctx, params):
    image = _resources(ctx, "image", [params["ImageId"]])[0]
    location = params["S3ExportLocation"]
    task_params = {"image_id": image.id, "source": {"bucket": image.bucket, "key": image.key},
                   "source_format": image.format, "format": params["DiskImageFormat"].lower(),
                   "bucket": location["S3Bucket"],
                   "prefix": location.get("S3Prefix") or "", "description": params.get("Description"),
                   "tags": _tag_params(params, "export-image-task")}
    dry_run(params)
    task = _submit(ctx, "export-image", task_params, params.get("ClientToken"))
    view = export_task_view(task)
    view["DiskImageFormat"] = params["DiskImageFormat"]
    return view


def describe_export_image_tasks(ctx, params):
    dry_run(params)
    views, token = _describe(ctx, params, "export-image", "ExportImageTaskIds")
    return {"ExportImageTasks": views, "NextToken": token}


def cancel_export_task(ctx, params):
    check_task_id(params["ExportTaskId"], ("export-image",))
    _cancel(ctx, params["ExportTaskId"], ("export-image",), "cancelled by the user")
    return {}


def describe_account_attributes(ctx, params):
    """AWS's standard attributes (this service has no VPCs: EC2-VPC, no default VPC) and one of
    its own, `account-id`: the caller's account, which `imaging import` needs to name its
    default bucket ACCOUNT-imports (there is no STS GetCallerIdentity here)."""
    dry_run(params)
    attributes = {"supported-platforms": ["VPC"], "default-vpc": ["none"], "account-id": [ctx.account.id]}
    names = params.get("AttributeNames") or list(attributes)
    unknown = [n for n in names if n not in attributes]
    if unknown:
        raise invalid("AttributeName", unknown[0], f"It must be one of {', '.join(attributes)}.")
    return {"AccountAttributes": [{"AttributeName": n, "AttributeValues": [{"AttributeValue": v}
                                                                           for v in attributes[n]]}
                                  for n in names]}


HANDLERS = {
    "DescribeAccountAttributes": describe_account_attributes,
    "ImportImage": import_image,
    "ImportSnapshot": import_snapshot,
    "DescribeImportImageTasks": describe_import_image_tasks,
    "DescribeImportSnapshotTasks": describe_import_snapshot_tasks,
    "CancelImportTask": cancel_import_task,
    "ImportVolume": import_volume,
    "ImportInstance": import_instance,
    "DescribeConversionTasks": describe_conversion_tasks,
    "CancelConversionTask": cancel_conversion_task,
    "DescribeImages": describe_images,
    "DescribeSnapshots": describe_snapshots,
    "DescribeVolumes": describe_volumes,
    "ExportImage": export_image,
    "DescribeExportImageTasks": describe_export_image_tasks,
    "CancelExportTask": cancel_export_task,
}
