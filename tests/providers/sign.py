"""Signs a provider callback with the provider's own published SDK, for the gateway's tests.

Reads one JSON request on stdin, writes the request to send on stdout:
  in:  {"provider": "twilio|plivo|vonage|exotel", "secret": str, "url": str,
        "form": {name: value} | "json": object,
        "nonce": str (plivo), "also_sign_with": [secret, ...] (plivo: more signatures),
        "algorithm": "HMAC_SHA256" (twilio), "port_in_signed_url": bool (twilio),
        "claims": {...} (vonage: claims added to or replacing the defaults)}
  out: {"url": str, "headers": {name: value}, "body": str, "content_type": str}

The signature is computed by the SDK (twilio.request_validator.RequestValidator,
plivo.utils.signature_v3, PyJWT as Vonage's SDK uses it) and checked back with the SDK's
own validator, so a test never sends what the provider's code would not.
"""

import hashlib
import json
import sys
import time
import urllib.parse
import uuid


def twilio(req):
    from twilio.request_validator import RequestValidator, add_port

    validator = RequestValidator(req["secret"])
    url = req["url"]
    algorithm = req.get("algorithm")
    headers = {}
    if algorithm:
        headers["X-Twilio-Webhooks-Signature-Settings"] = "key=webhooks_sharedkey_test,algorithm=" + algorithm
    if "json" in req:
        body = json.dumps(req["json"])
        url = url + ("&" if "?" in url else "?") + "bodySHA256=" + validator.compute_hash(body)
        signed_url = add_port(urllib.parse.urlparse(url)) if req.get("port_in_signed_url") else url
        signature = validator.compute_signature(signed_url, {}, algorithm)
        assert validator.validate(url, body, signature, algorithm), "twilio SDK refuses its own signature"
        content_type = "application/json"
    else:
        params = req["form"]
        body = urllib.parse.urlencode(params)
        signed_url = add_port(urllib.parse.urlparse(url)) if req.get("port_in_signed_url") else url
        signature = validator.compute_signature(signed_url, params, algorithm)
        assert validator.validate(url, params, signature, algorithm), "twilio SDK refuses its own signature"
        content_type = "application/x-www-form-urlencoded"
    headers["X-Twilio-Signature"] = signature
    return {"url": url, "headers": headers, "body": body, "content_type": content_type}


def plivo(req):
    from plivo.utils.signature_v3 import construct_post_url, get_signature_v3, validate_v3_signature

    params = dict(req["form"])
    nonce = req.get("nonce") or str(uuid.uuid4().int)[:20]
    signatures = []
    for secret in req.get("also_sign_with", []) + [req["secret"]]:
        base = construct_post_url(req["url"], dict(params))
        signatures.append(get_signature_v3(secret, base, nonce).decode())
    header = ",".join(signatures)
    assert validate_v3_signature("POST", req["url"], nonce, req["secret"], header, dict(params)), \
        "plivo SDK refuses its own signature"
    return {
        "url": req["url"],
        "headers": {"X-Plivo-Signature-V3": header, "X-Plivo-Signature-V3-Nonce": nonce},
        "body": urllib.parse.urlencode(params),
        "content_type": "application/x-www-form-urlencoded",
    }


def vonage(req):
    import jwt
    from vonage_jwt.verify_jwt import verify_signature

    body = json.dumps(req["json"])
    claims = {
        "iat": int(time.time()),
        "jti": str(uuid.uuid4()),
        "iss": "Vonage",
        "payload_hash": hashlib.sha256(body.encode()).hexdigest(),
        "api_key": "abcd1234",
        "application_id": "aaaaaaaa-bbbb-cccc-dddd-0123456789ab",
    }
    claims.update(req.get("claims", {}))
    token = jwt.encode(claims, req["secret"], algorithm="HS256")
    if "exp" not in claims:
        assert verify_signature(token, req["secret"]), "vonage SDK refuses its own token"
    return {
        "url": req["url"],
        "headers": {"Authorization": "Bearer " + token},
        "body": body,
        "content_type": "application/json",
    }


def exotel(req):
    return {
        "url": req["url"],
        "headers": {},
        "body": urllib.parse.urlencode(req["form"]),
        "content_type": "application/x-www-form-urlencoded",
    }


def main():
    req = json.load(sys.stdin)
    out = {"twilio": twilio, "plivo": plivo, "vonage": vonage, "exotel": exotel}[req["provider"]](req)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
