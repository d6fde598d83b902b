"""EC2 errors: the code, the message and the HTTP status, as the EC2 error XML."""

import uuid
from xml.sax.saxutils import escape

# Codes that are not 400 (AWS's own statuses).
STATUS = {
    "AuthFailure": 401,
    "SignatureDoesNotMatch": 403,
    "IncompleteSignature": 400,
    "RequestExpired": 400,
    "DryRunOperation": 412,
    "UnauthorizedOperation": 403,
    "InternalError": 500,
    "ServiceUnavailable": 503,
}


class EC2Error(Exception):
    def __init__(self, code, message, status=None):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message
        self.status = status or STATUS.get(code, 400)

    def to_xml(self, request_id=None):
        request_id = request_id or str(uuid.uuid4())
        return ('<?xml version="1.0" encoding="UTF-8"?>\n'
                f"<Response><Errors><Error><Code>{escape(self.code)}</Code>"
                f"<Message>{escape(self.message)}</Message></Error></Errors>"
                f"<RequestID>{escape(request_id)}</RequestID></Response>").encode()


def missing(name):
    return EC2Error("MissingParameter", f"The request must contain the parameter {name}")


def invalid(name, value, why):
    return EC2Error("InvalidParameterValue", f"Value ({value}) for parameter {name} is invalid. {why}")
