#!/bin/sh
# The API document's curl example, against CALLCAP_URL with CALLCAP_API_KEY and
# CALLCAP_COMPANY_ID. No library: a 503 or a lost connection is the caller's to retry
# (clients/ does that for you).
curl -sS -X POST "$CALLCAP_URL/functions/v1/webhook-call-capture" \
  -H "Content-Type: application/json" \
  -H "x-api-key: $CALLCAP_API_KEY" \
  -d "{\"company_id\": \"$CALLCAP_COMPANY_ID\", \"caller_number\": \"+919876543210\", \"duration_seconds\": 180, \"outcome\": \"follow_up\", \"notes\": \"Customer interested in service\", \"external_call_id\": \"CALL-12345\", \"external_system\": \"YourDialer\"}"
