"""The API document's Python example, standard library only, against CALLCAP_URL with
CALLCAP_API_KEY and CALLCAP_COMPANY_ID. No library: a 503 or a lost connection is the
caller's to retry (clients/python does that for you)."""
import json
import os
import sys
import urllib.error
import urllib.request
from datetime import datetime, timezone

call_data = {
    "company_id": os.environ["CALLCAP_COMPANY_ID"],
    "caller_number": "+919876543210",
    "recipient_number": "+919123456789",
    "duration_seconds": 180,
    "outcome": "follow_up",
    "notes": "Customer interested in service",
    "call_date": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    "external_call_id": "CALL-12345",
    "call_status": "completed",
}
req = urllib.request.Request(
    os.environ["CALLCAP_URL"] + "/functions/v1/webhook-call-capture",
    data=json.dumps(call_data).encode(), method="POST",
    headers={"Content-Type": "application/json", "x-api-key": os.environ["CALLCAP_API_KEY"]})
try:
    with urllib.request.urlopen(req, timeout=10) as resp:
        result = json.load(resp)
        print("Success! Call ID:", result["data"]["call_history_id"])
except urllib.error.HTTPError as e:
    print("Error:", json.load(e).get("message", "Unknown error"))
    sys.exit(1)
