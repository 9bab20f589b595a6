"""Schemathesis hooks for the gateway's OpenAPI run (tests/tests/it/schema.rs).

Records are generated from the document's CallRecord schema with any company_id; the
test's API key writes for one company only (403 otherwise, as documented). In the
positive run this hook gives every generated record that company, so schema-valid
records reach validation and the publish, and "schema-valid request rejected" means a
real disagreement between the document and the server.

A generated case may name a Content-Encoding the document lists (gzip, deflate, zstd) for
a body the generator did not compress: the server rightly answers 400 ("not valid zstd").
The generator cannot compress, so the header is taken off generated cases whose body is
not encoded; the compressed paths are tested with real compressed bodies in
tests/tests/it/encoding.rs.
"""
import os

import schemathesis

COMPANY = os.environ["CALLCAP_COMPANY_ID"]


def _own(record):
    """The key's company, and end_time not before start_time: a rule across two fields
    that JSON Schema cannot state (the server answers 400 naming end_time)."""
    if isinstance(record, dict):
        record["company_id"] = COMPANY
        if record.get("start_time") is not None and record.get("end_time") is not None:
            record["end_time"] = record["start_time"]


@schemathesis.hook
def map_body(ctx, body):
    if isinstance(body, dict) and isinstance(body.get("calls"), list):
        for record in body["calls"]:
            _own(record)
    else:
        _own(body)
    return body


@schemathesis.hook
def map_headers(ctx, headers):
    if headers and str(headers.get("Content-Encoding", "identity")).lower() != "identity":
        del headers["Content-Encoding"]
    return headers
