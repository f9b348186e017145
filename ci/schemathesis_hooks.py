"""A schemathesis check: every JSON reply of the API keeps otad's envelope."""

from __future__ import annotations

import schemathesis

ENVELOPE = ["success", "errorCode", "errorMsg", "data"]
# Not enveloped by design: the xiaozhi board protocol, health probes, metrics text, this document.
_RAW = ("/xiaozhi/ota", "/healthz", "/metrics", "/api/v2/openapi.json")


@schemathesis.check
def otad_envelope(ctx, response, case):
    path = case.operation.path
    if path.startswith(_RAW) or not response.headers.get("Content-Type", [""])[0].startswith("application/json"):
        return None
    body = response.json()
    if not isinstance(body, dict) or list(body) != ENVELOPE:
        raise AssertionError(f"reply is not the envelope {ENVELOPE}: {str(body)[:200]}")
    if body["success"] is not (response.status_code == 200 and body["errorCode"] == 200):
        raise AssertionError(f"success={body['success']} does not match errorCode {body['errorCode']}")
    return None
