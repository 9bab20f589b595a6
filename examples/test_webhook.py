#!/usr/bin/env python3
"""Checks a Call Capture integration end to end.

Sends the API document's Example 1 (minimal) and Example 2 (complete) with your key and
says in plain words what happened.

    CALLCAP_URL=https://calls.example.com CALLCAP_API_KEY=cc_live_... \\
        CALLCAP_COMPANY_ID=<uuid> python3 test_webhook.py
    python3 test_webhook.py --url https://calls.example.com --key cc_live_... --company <uuid>

Python 3.8 or newer, standard library only. Exits 0 when both records were created, 1
when one was refused or the service could not be reached, 2 on bad usage. Example 2 is
sent with a fresh external_call_id each run, so it never updates a real call.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

ADVICE = {
    400: "fix the field named above and send again",
    401: "check the x-api-key value; a revoked or expired key must be replaced by a new one",
    403: "company_id must be the company your API key was issued for",
    408: "the body arrived too slowly; check the network between you and the service",
    413: "the record is too large; shorten notes or call_details",
    415: "send the header Content-Type: application/json",
    429: "you are over your rate limit; wait for Retry-After and send again",
    503: "the service could not confirm the record; send it again after Retry-After (a resend is safe)",
}
for _status in (301, 302, 303, 307, 308):
    ADVICE[_status] = ("use the URL of the service itself: a redirect is not followed, since it would "
                       "send your API key and the record to another address")

# The most of an answer read; the rest is not downloaded.
MAX_ANSWER_BYTES = 64 * 1024


class NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: it would carry the API key (and the body) elsewhere. The
    3xx answer is reported as it is."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


OPENER = urllib.request.build_opener(NoRedirects)


def printable(value):
    """Server text made safe to print: control characters escaped (no terminal escape
    sequence from the server reaches the screen), at most 500 characters."""
    text = str(value)
    shown = "".join(f"\\u{{{ord(c):x}}}" if (ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F) else c
                    for c in text[:500])
    return shown + ("…" if len(text) > 500 else "")


def options():
    p = argparse.ArgumentParser(description="Send the API document's Example 1 and 2 and report what happened.")
    p.add_argument("--url", default=os.environ.get("CALLCAP_URL", "http://127.0.0.1:8080"),
                   help="the service's base URL (or CALLCAP_URL); default http://127.0.0.1:8080")
    p.add_argument("--key", default=os.environ.get("CALLCAP_API_KEY"),
                   help="your API key (or CALLCAP_API_KEY)")
    p.add_argument("--company", default=os.environ.get("CALLCAP_COMPANY_ID"),
                   help="the company id the key belongs to (or CALLCAP_COMPANY_ID)")
    opts = p.parse_args()
    if not opts.key:
        p.error("no API key: pass --key or set CALLCAP_API_KEY")
    if not opts.company:
        p.error("no company id: pass --company or set CALLCAP_COMPANY_ID")
    opts.url = opts.url.rstrip("/")
    return opts


def send(opts, name, record):
    url = f"{opts.url}/functions/v1/webhook-call-capture"
    req = urllib.request.Request(
        url,
        data=json.dumps(record).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "x-api-key": opts.key},
    )
    try:
        with OPENER.open(req, timeout=15) as resp:
            status, headers, raw = resp.status, resp.headers, resp.read(MAX_ANSWER_BYTES)
    except urllib.error.HTTPError as e:
        status, headers, raw = e.code, e.headers, e.read(MAX_ANSWER_BYTES)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        print(f"✗ {name}: could not reach {url}: {reason}")
        print("  What to do: check the URL and that this machine can reach it.")
        return False
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    data = body.get("data")
    if status == 201 and body.get("success") is True and isinstance(data, dict):
        print(f"✓ {name}: created, call_history_id {printable(data.get('call_history_id'))} "
              f"(accepted at {printable(data.get('created_at'))})")
        return True
    print(f"✗ {name}: refused with {status} {printable(body.get('error', ''))}: "
          f"{printable(body.get('message', '(no message)'))}")
    if 300 <= status < 400 and headers.get("Location"):
        print(f"  The server redirects to {printable(headers['Location'])}")
    details = body.get("details") if isinstance(body.get("details"), list) else []
    for d in details[:20]:
        if isinstance(d, dict):
            print(f"  field {printable(d.get('field'))}: {printable(d.get('message'))}")
    if headers.get("Retry-After"):
        print(f"  Retry-After: {printable(headers['Retry-After'])}")
    print(f"  What to do: {ADVICE.get(status, 'see the API document for this status')}.")
    return False


def main():
    opts = options()
    example1 = {
        "company_id": opts.company,
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 180,
        "outcome": "completed",
    }
    # Lead and employee ids in the document are placeholders: fresh UUIDs stand in.
    example2 = {
        "company_id": opts.company,
        "lead_id": str(uuid.uuid4()),
        "employee_id": str(uuid.uuid4()),
        "outcome": "follow_up",
        "notes": "Customer interested in premium package. Needs time to discuss with spouse.",
        "call_date": "2025-11-25T10:30:00Z",
        "caller_number": "+919876543210",
        "recipient_number": "+919123456789",
        "duration_seconds": 320,
        "recording_url": "https://your-system.com/recordings/12345.mp3",
        "call_status": "completed",
        "start_time": "2025-11-25T10:30:00Z",
        "end_time": "2025-11-25T10:35:20Z",
        "external_call_id": f"TEST-WEBHOOK-{int(time.time() * 1000)}",
        "external_system": "test_webhook.py",
        "next_follow_up": "2025-11-27",
        "next_follow_up_time": "14:00:00",
        "auto_call_followup": True,
        "call_details": {
            "campaign_id": "CAMP-001",
            "agent_name": "John Doe",
            "disposition": "interested",
            "tags": ["premium", "follow-up-needed"],
        },
    }
    print(f"Testing {opts.url} for company {opts.company}")
    ok1 = send(opts, "Example 1 (minimal record)", example1)
    ok2 = send(opts, "Example 2 (complete record)", example2)
    if ok1 and ok2:
        print("Your integration works: both records were accepted and will be stored.")
        return 0
    print("Your integration is not working yet: see the lines marked ✗ above.")
    return 1


if __name__ == "__main__":
    sys.exit(main())
