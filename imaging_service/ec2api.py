"""The EC2 Query protocol, driven by botocore's EC2 service model.

parse_request turns the form parameters of a request (`Action`, `Version`,
`DiskContainer.1.UserBucket.S3Bucket=...`) into the nested parameters that
boto3 was given, by walking the operation's input shape (the inverse of
botocore's EC2Serializer).  serialize_response turns a handler's result
(the dict that boto3 would return) into the EC2 XML response by walking the
output shape.  No shape is written by hand here.
"""

import base64
import datetime
import functools
import re
import uuid
from xml.sax.saxutils import escape

import botocore.session
from botocore.utils import parse_timestamp

from imaging_service.errors import EC2Error, invalid, missing

API_VERSION = "2016-11-15"
# Values the model's enums lack but clients send: ImportInstance's Platform was Windows or
# Linux (euca2ools, older AWS); today's model lists only Windows.
EXTRA_ENUM = {"PlatformValues": ("Linux",)}


@functools.lru_cache(maxsize=1)
def service_model():
    return botocore.session.get_session().get_service_model("ec2")


def namespace():
    return service_model().metadata["xmlNamespace"].rstrip("/") + "/"


def operation(action, supported):
    """The operation model of a supported Action, else InvalidAction."""
    if action not in supported:
        raise EC2Error("InvalidAction", f"The action {action or '(none)'} is not valid for this web service.")
    return service_model().operation_model(action)


def query_name(shape, default):
    """The name a member has on the wire (botocore's EC2Serializer._get_serialized_name)."""
    if "queryName" in shape.serialization:
        return shape.serialization["queryName"]
    if "name" in shape.serialization:
        name = shape.serialization["name"]
        return name[0].upper() + name[1:]
    return default


# Characters XML 1.0 cannot carry: a value echoed in a response must not break it.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


class _Node:
    __slots__ = ("children", "value")

    def __init__(self):
        self.value, self.children = None, {}


def _tree(form):
    root = _Node()
    for key, value in form.items():
        node = root
        for part in key.split("."):
            node = node.children.setdefault(part, _Node())
        node.value = value
    return root


def parse_request(op_model, form):
    """Form parameters (without Action, Version and signature fields) -> the operation's
    parameters; MissingParameter / InvalidParameterValue / UnknownParameter on bad input."""
    shape = op_model.input_shape
    if shape is None:
        return {}
    return _parse(shape, _tree(form), "")


def _parse(shape, node, path):
    kind = shape.type_name
    if kind == "structure":
        if node.value not in (None, ""):
            raise invalid(path, node.value, "It is a structure.")
        names = {query_name(member, key): (key, member) for key, member in shape.members.items()}
        out = {}
        for name, child in node.children.items():
            if name not in names:
                raise EC2Error("UnknownParameter", f"The parameter {path}{name} is not recognized")
            key, member = names[name]
            out[key] = _parse(member, child, f"{path}{name}.")
        for key in shape.required_members:
            if key not in out:
                raise missing(path + query_name(shape.members[key], key))
        return out
    where = path.rstrip(".")
    if kind == "list":
        if not node.children:
            return []
        if not all(k.isdigit() for k in node.children):
            raise invalid(where, ",".join(node.children), "List members are numbered: Name.1, Name.2.")
        return [_parse(shape.member, node.children[k], f"{path}{k}.")
                for k in sorted(node.children, key=int)]
    if node.children or node.value is None:
        raise invalid(where, ",".join(node.children), f"It is a {kind}.")
    return _scalar(shape, node.value, where)


def _scalar(shape, text, where):
    kind = shape.type_name
    try:
        if kind == "string":
            if _NOT_XML.search(text):
                raise ValueError("It holds control characters.")
            if shape.enum and text not in shape.enum and text not in EXTRA_ENUM.get(shape.name, ()):
                raise ValueError("It must be one of: " + ", ".join(shape.enum) + ".")
            return text
        if kind in ("integer", "long"):
            return int(text)
        if kind in ("float", "double"):
            return float(text)
        if kind == "boolean":
            if text.lower() not in ("true", "false"):
                raise ValueError("It must be true or false.")
            return text.lower() == "true"
        if kind == "timestamp":
            return parse_timestamp(text)
        if kind == "blob":
            return base64.b64decode(text, validate=True)
    except (ValueError, TypeError) as e:
        reason = str(e) if str(e).startswith("It ") else f"It is not a valid {kind}."
        raise invalid(where, text, reason) from None
    raise invalid(where, text, f"{kind} parameters are not supported.")


def serialize_response(op_model, data, request_id=None):
    """The operation's result dict -> EC2 XML bytes (<ActionResponse xmlns=...>)."""
    root = f"{op_model.name}Response"
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<{root} xmlns="{namespace()}">',
           f"<requestId>{escape(request_id or str(uuid.uuid4()))}</requestId>"]
    if op_model.output_shape is not None:
        _writer(op_model.output_shape)(out, data or {})
    out.append(f"</{root}>")
    return "".join(out).encode()


# One writer per output shape, made once from the model (walking the model for every
# response cost more than the rest of a describe call): writer(out, value) appends the
# XML of the value's content (its element's tags are the parent's, as members name them).
_WRITERS = {}


def _writer(shape):
    name = shape.name
    found = _WRITERS.get(name)
    if found is None:
        if shape.type_name == "structure":
            found = _structure_writer(shape)  # registers itself first: shapes may recurse
        else:
            found = _WRITERS[name] = _make_writer(shape)
    return found


def _structure_writer(shape):
    members = []  # filled after registration, so that a recursive shape finds this writer
    known = frozenset(shape.members)
    where = shape.name

    def write(out, data):
        if not known.issuperset(data):
            raise KeyError(f"{where} has no members {sorted(set(data) - known)}")
        for key, tags, write_value in members:
            value = data.get(key)
            if value is None:
                continue
            if tags is None:  # a flattened list: its items are the members' elements
                write_value(out, value)
            else:
                out.append(tags[0])
                write_value(out, value)
                out.append(tags[1])

    _WRITERS[shape.name] = write
    for key, member in shape.members.items():
        name = member.serialization.get("name", key)
        if member.type_name == "list" and member.serialization.get("flattened"):
            members.append((key, None, _list_writer(member.member, member.member.serialization.get("name", name))))
        else:
            members.append((key, (f"<{name}>", f"</{name}>"), _writer(member)))
    return write


def _list_writer(item_shape, item):
    open_tag, close_tag, write_item = f"<{item}>", f"</{item}>", _writer(item_shape)

    def write(out, values):
        for v in values:
            out.append(open_tag)
            write_item(out, v)
            out.append(close_tag)
    return write


def _make_writer(shape):
    kind = shape.type_name
    if kind == "list":
        return _list_writer(shape.member, shape.member.serialization.get("name", "member"))
    if kind == "map":
        key_name = shape.key.serialization.get("name", "key")
        value_name = shape.value.serialization.get("name", "value")
        write_key, write_value = _writer(shape.key), _writer(shape.value)

        def write_map(out, value):
            for k, v in value.items():
                out.append(f"<entry><{key_name}>")
                write_key(out, k)
                out.append(f"</{key_name}><{value_name}>")
                write_value(out, v)
                out.append(f"</{value_name}></entry>")
        return write_map
    if kind == "boolean":
        return lambda out, value: out.append("true" if value else "false")
    if kind == "timestamp":
        return lambda out, value: out.append(iso8601(value))
    if kind == "blob":
        return lambda out, value: out.append(base64.b64encode(value).decode())
    return lambda out, value: out.append(escape(str(value)))


def iso8601(value):
    if isinstance(value, datetime.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(datetime.UTC)
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return str(value)
