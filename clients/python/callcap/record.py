"""The record's shape, checked before it is queued: the API document's required field and
types, so that a mistake is an exception at ``capture`` rather than a 400 minutes later.

The gateway checks everything again (lengths, formats, the API key's company); this
check is the part a caller can act on at once, and it never refuses what the gateway
would take.
"""

import re
import uuid

OUTCOMES = ("converted", "follow_up", "not_answered", "completed", "not_interested")
CALL_STATUSES = (
    "completed", "busy", "no-answer", "failed", "canceled",
    "queued", "initiated", "ringing", "in-progress",
)
_UUID_FIELDS = ("company_id", "lead_id", "employee_id")
_STRING_FIELDS = (
    "notes", "call_date", "caller_number", "recipient_number", "recording_url",
    "start_time", "end_time", "external_call_id", "external_system",
    "next_follow_up", "next_follow_up_time",
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class RecordError(ValueError):
    """The record cannot be sent as it is: ``field`` names what to fix."""

    def __init__(self, field, message):
        super().__init__(message)
        self.field = field


def check(record):
    """Raises :class:`RecordError` for the first field the gateway would refuse by type."""
    if not isinstance(record, dict):
        raise RecordError(None, "a record is a dict of the API document's fields")
    if record.get("company_id") is None:
        raise RecordError("company_id", "company_id is required")
    for name in _UUID_FIELDS:
        value = record.get(name)
        if value is None or isinstance(value, uuid.UUID):
            continue
        if not isinstance(value, str):
            raise RecordError(name, "%s must be a UUID" % name)
        try:
            uuid.UUID(value)
        except ValueError:
            raise RecordError(name, "%s must be a UUID" % name) from None
    for name in _STRING_FIELDS:
        value = record.get(name)
        if value is not None and not isinstance(value, str):
            raise RecordError(name, "%s must be a string" % name)
    duration = record.get("duration_seconds")
    if duration is not None and (isinstance(duration, bool) or not isinstance(duration, int) or duration < 0):
        raise RecordError("duration_seconds", "duration_seconds must be a whole number of seconds, 0 or more")
    outcome = record.get("outcome")
    if outcome is not None and outcome not in OUTCOMES:
        raise RecordError("outcome", "outcome must be one of " + ", ".join(OUTCOMES))
    status = record.get("call_status")
    if status is not None and status not in CALL_STATUSES:
        raise RecordError("call_status", "call_status must be one of " + ", ".join(CALL_STATUSES))
    follow = record.get("auto_call_followup")
    if follow is not None and not isinstance(follow, bool):
        raise RecordError("auto_call_followup", "auto_call_followup must be true or false")
    details = record.get("call_details")
    if details is not None and not isinstance(details, dict):
        raise RecordError("call_details", "call_details must be an object")
    day = record.get("next_follow_up")
    if day is not None and not _DATE.match(day):
        raise RecordError("next_follow_up", "next_follow_up must be a date (YYYY-MM-DD)")


def with_identity(record):
    """The record to queue: a copy, ``company_id`` as text, and an ``external_call_id``
    generated once when it has none, so that every resend of it is the same record (the
    gateway derives the stored id from ``external_call_id``: a resend updates the row it
    made, never a second one)."""
    out = dict(record)
    out["company_id"] = str(out["company_id"])
    for name in ("lead_id", "employee_id"):
        if out.get(name) is not None:
            out[name] = str(out[name])
    if not out.get("external_call_id"):
        out["external_call_id"] = "callcap-py-" + uuid.uuid4().hex
    return out
