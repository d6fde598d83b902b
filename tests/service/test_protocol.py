"""Round trips through botocore's own EC2 serializer and parser, for every operation
the service answers: botocore's request -> our parser gives back the parameters; our XML
response -> botocore's parser gives back the values.  Sample values fill every member of
the shapes (lists of two, nested structures), so a member our code misnames fails."""

import datetime
import os

import botocore.parsers
import botocore.serialize
import fixtures
import testtools
from dateutil.tz import tzutc

from imaging_service import ec2api
from imaging_service.errors import EC2Error
from imaging_service.operations import HANDLERS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sample(shape, name="x", depth=0):
    kind = shape.type_name
    if kind == "structure":
        if depth > 6:
            return {}
        return {k: sample(m, k, depth + 1) for k, m in shape.members.items()}
    if kind == "list":
        return [sample(shape.member, name, depth + 1) for _ in range(2)]
    if kind == "map":
        return {"k1": sample(shape.value, name, depth + 1)}
    if kind == "string":
        return shape.enum[-1] if shape.enum else f"{name} <&> 'v'"
    if kind == "integer":
        return 7
    if kind == "long":
        return 2 ** 40 + 3
    if kind == "boolean":
        return True
    if kind in ("double", "float"):
        return 1.5
    if kind == "timestamp":
        return datetime.datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=tzutc())
    if kind == "blob":
        return b"\x00blob"
    raise AssertionError(kind)


class TestRoundTrips(testtools.TestCase):

    def test_every_operation_request(self):
        serializer = botocore.serialize.create_serializer("ec2")
        for action in HANDLERS:
            op = ec2api.service_model().operation_model(action)
            params = sample(op.input_shape) if op.input_shape else {}
            body = dict(serializer.serialize_to_request(params, op)["body"])
            self.assertEqual((body.pop("Action"), body.pop("Version")), (action, ec2api.API_VERSION))
            self.assertEqual(params, ec2api.parse_request(op, body), action)

    def test_every_operation_response(self):
        parser = botocore.parsers.create_parser("ec2")
        for action in HANDLERS:
            op = ec2api.service_model().operation_model(action)
            data = sample(op.output_shape) if op.output_shape else {}
            xml = ec2api.serialize_response(op, data, request_id="req-1")
            parsed = parser.parse({"body": xml, "headers": {}, "status_code": 200}, op.output_shape)
            self.assertEqual("req-1", parsed.pop("ResponseMetadata")["RequestId"])
            self.assertEqual(data, parsed, action)

    def test_error_xml(self):
        op = ec2api.service_model().operation_model("DescribeConversionTasks")
        xml = EC2Error("InvalidConversionTaskId", "The task x <does not> exist").to_xml("req-2")
        parsed = botocore.parsers.create_parser("ec2").parse(
            {"body": xml, "headers": {}, "status_code": 400}, op.output_shape)
        self.assertEqual({"Code": "InvalidConversionTaskId", "Message": "The task x <does not> exist"},
                         parsed["Error"])
        self.assertEqual("req-2", parsed["ResponseMetadata"]["RequestId"])


class TestParserErrors(testtools.TestCase):

    def parse(self, action, form):
        return ec2api.parse_request(ec2api.service_model().operation_model(action), form)

    def assertCode(self, code, action, form):
        e = self.assertRaises(EC2Error, self.parse, action, form)
        self.assertEqual(code, e.code)
        return e

    def test_missing_required(self):
        e = self.assertCode("MissingParameter", "ImportVolume", {"Image.Format": "RAW"})
        self.assertIn("Image.Bytes", e.message)
        e = self.assertCode("MissingParameter", "ImportVolume", {
            "Image.Format": "RAW", "Image.Bytes": "1", "Image.ImportManifestUrl": "u"})
        self.assertIn("Volume", e.message)

    def test_bad_integer_and_boolean_and_enum(self):
        self.assertCode("InvalidParameterValue", "DescribeImportImageTasks", {"MaxResults": "ten"})
        self.assertCode("InvalidParameterValue", "DescribeImportImageTasks", {"DryRun": "yes"})
        e = self.assertCode("InvalidParameterValue", "ImportVolume", {
            "AvailabilityZone": "z", "Image.Format": "QCOW9", "Image.Bytes": "1",
            "Image.ImportManifestUrl": "u", "Volume.Size": "1"})
        self.assertIn("Image.Format", e.message)

    def test_control_characters_refused(self):
        self.assertCode("InvalidParameterValue", "ImportImage", {"Description": "a\x00b"})

    def test_unknown_parameter(self):
        self.assertCode("UnknownParameter", "DescribeImportImageTasks", {"Bogus": "1"})

    def test_list_numbering(self):
        self.assertEqual({"ImportTaskIds": ["a", "b"]},
                         self.parse("DescribeImportImageTasks", {"ImportTaskId.2": "b", "ImportTaskId.1": "a"}))
        self.assertCode("InvalidParameterValue", "DescribeImportImageTasks", {"ImportTaskId.x": "a"})

    def test_invalid_action(self):
        e = self.assertRaises(EC2Error, ec2api.operation, "RunInstances", HANDLERS)
        self.assertEqual("InvalidAction", e.code)


class TestDocs(testtools.TestCase):

    def test_settings_table_is_current(self):
        from imaging_service import config
        with open(os.path.join(ROOT, "docs", "service.md")) as f:
            text = f.read()
        current = config.BEGIN + "\n" + config.markdown() + config.END in text
        self.assertTrue(current, "docs/service.md's settings table is stale: "
                                 "python -m imaging_service.config --update docs/service.md")

    def test_every_operation_documented(self):
        with open(os.path.join(ROOT, "docs", "service.md")) as f:
            text = f.read()
        for action in HANDLERS:
            self.assertIn(f"`{action}`", text)


class TestConfig(testtools.TestCase):

    def test_flag_over_environment_over_file_over_default(self):
        from imaging_service import config
        path = self.useFixture(fixtures.TempDir()).join("service.yaml")
        with open(path, "w") as f:
            f.write("port: 9000\nregion: eu-west-1\nmax_active_tasks: 5\n")
        env = {"IMAGING_SERVICE_REGION": "us-west-2", "IMAGING_SERVICE_MAX_ACTIVE_TASKS": "7"}
        s = config.resolve({"config": path, "max_active_tasks": "9", "state_dir": "/srv/s"}, environ=env)
        self.assertEqual((9000, "us-west-2", 9), (s.port, s.region, s.max_active_tasks))
        self.assertEqual(("/srv/s/secret.key", "sqlite:////srv/s/service.db"), (s.key_file, s.database_url))
        self.assertEqual(datetime.timedelta(minutes=180), s.task_timeout)

    def test_errors_name_where(self):
        from imaging_service import config
        e = self.assertRaises(config.ConfigError, config.resolve, {}, environ={"IMAGING_SERVICE_PORT": "x"})
        self.assertIn("IMAGING_SERVICE_PORT: 'x' is not a whole number", str(e))
        path = self.useFixture(fixtures.TempDir()).join("bad.yaml")
        with open(path, "w") as f:
            f.write("prot: 1\n")
        e = self.assertRaises(config.ConfigError, config.resolve, {"config": path}, environ={})
        self.assertIn("unknown settings prot", str(e))
