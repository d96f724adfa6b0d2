"""Verify that a webhook request really comes from HubSpot.

HubSpot signs each request with the app's client secret, in one of three ways:

- v1: SHA-256 of ``secret + body``, lowercase hex, in ``X-HubSpot-Signature``
  with ``X-HubSpot-Signature-Version: v1`` (legacy CRM webhook deliveries);
- v2: SHA-256 of ``secret + METHOD + URI + body``, lowercase hex, in the same
  headers with version ``v2`` (workflow webhook actions);
- v3: base64 HMAC-SHA256 keyed by the secret over ``METHOD + URI + body +
  timestamp``, in ``X-HubSpot-Signature-v3`` beside
  ``X-HubSpot-Request-Timestamp`` (milliseconds since the epoch).

When a v3 signature is present it alone decides. v1 and v2 carry no timestamp,
so a captured request stays valid for ever and can be replayed; v1 does not
even cover the URL. Falling back to them after a failed v3 check would let
anyone replaying an old delivery defeat the timestamp by spoiling the v3
header. A v3 timestamp more than ``MAX_TIMESTAMP_SKEW`` away from our clock, in
either direction, is refused.

``SignatureError.reason`` names the cause for the log; the client only ever
learns that the request was refused.
"""

import base64
import hashlib
import hmac
import re
import time
from collections.abc import Mapping
from datetime import timedelta

MAX_TIMESTAMP_SKEW = timedelta(minutes=5)

_SIGNATURE_HEADER = "x-hubspot-signature"
_SIGNATURE_VERSION_HEADER = "x-hubspot-signature-version"
_SIGNATURE_V3_HEADER = "x-hubspot-signature-v3"
_TIMESTAMP_HEADER = "x-hubspot-request-timestamp"

# The only escapes HubSpot decodes before signing a v3 URI; every other escape
# is signed as sent.
_V3_DECODED_ESCAPES = {
    "3A": ":",
    "2F": "/",
    "3F": "?",
    "40": "@",
    "21": "!",
    "24": "$",
    "27": "'",
    "28": "(",
    "29": ")",
    "2A": "*",
    "2C": ",",
    "3B": ";",
}
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")


class SignatureError(Exception):
    """A request whose signature does not prove it comes from HubSpot.

    ``reason`` is a stable snake_case cause for the log, never shown to the
    client: ``missing_timestamp``, ``malformed_timestamp``, ``stale_timestamp``,
    ``future_timestamp``, ``v3_required``, ``missing_signature``,
    ``unknown_signature_version`` or ``signature_mismatch``.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def hubspot_decoded_uri(uri: str) -> str:
    """Decode the escapes HubSpot decodes before signing a v3 URI, and no others.

    One pass from left to right, so ``%253A`` stays ``%253A``.
    """

    def decode(match: re.Match[str]) -> str:
        return _V3_DECODED_ESCAPES.get(match[1].upper(), match[0])

    return _ESCAPE.sub(decode, uri)


def sign_v1(secret: str, body: bytes) -> str:
    return hashlib.sha256(secret.encode() + body).hexdigest()


def sign_v2(secret: str, method: str, uri: str, body: bytes) -> str:
    """Sign with v2; ``uri`` is signed exactly as given, without decoding."""
    return hashlib.sha256((secret + method + uri).encode() + body).hexdigest()


def sign_v3(secret: str, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """Sign with v3; ``uri`` is the full URL HubSpot called, still escaped."""
    message = (method + hubspot_decoded_uri(uri)).encode() + body + timestamp.encode()
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


def verify_signature(
    *,
    secret: str,
    method: str,
    uri: str,
    body: bytes,
    headers: Mapping[str, str],
    require_v3: bool = False,
    max_skew: timedelta = MAX_TIMESTAMP_SKEW,
    now: float | None = None,
) -> str:
    """Check the request's signature; return the version that verified it.

    ``uri`` is the full URL HubSpot called (scheme, host, path and query) and
    ``now`` the current time in seconds since the epoch. Raises
    ``SignatureError`` when the request cannot be trusted.
    """
    headers = {name.lower(): value for name, value in headers.items()}

    if _SIGNATURE_V3_HEADER in headers:
        _verify_v3(
            secret=secret,
            method=method,
            uri=uri,
            body=body,
            headers=headers,
            max_skew=max_skew,
            now=time.time() if now is None else now,
        )
        return "v3"

    if require_v3:
        raise SignatureError("v3_required")

    signature = headers.get(_SIGNATURE_HEADER)
    if signature is None:
        raise SignatureError("missing_signature")

    version = headers.get(_SIGNATURE_VERSION_HEADER, "").lower()
    if version == "v1":
        expected = sign_v1(secret, body)
    elif version == "v2":
        expected = sign_v2(secret, method, uri, body)
    else:
        raise SignatureError("unknown_signature_version")

    if not _digests_match(expected, signature):
        raise SignatureError("signature_mismatch")

    return version


def _verify_v3(
    *,
    secret: str,
    method: str,
    uri: str,
    body: bytes,
    headers: Mapping[str, str],
    max_skew: timedelta,
    now: float,
) -> None:
    timestamp = headers.get(_TIMESTAMP_HEADER)
    if timestamp is None:
        raise SignatureError("missing_timestamp")

    # Digits only: int() would also take signs, spaces, underscores and
    # non-ASCII digits, none of which HubSpot sends.
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise SignatureError("malformed_timestamp")
    try:
        sent_at_ms = int(timestamp)
    except ValueError:  # More digits than int() agrees to parse.
        raise SignatureError("malformed_timestamp") from None

    # Compare the int with floats rather than subtracting them: an absurdly
    # large timestamp would not fit in a float.
    now_ms = now * 1000
    max_skew_ms = max_skew / timedelta(milliseconds=1)
    if sent_at_ms < now_ms - max_skew_ms:
        raise SignatureError("stale_timestamp")
    if sent_at_ms > now_ms + max_skew_ms:
        raise SignatureError("future_timestamp")

    expected = sign_v3(secret, method, uri, body, timestamp)
    if not _digests_match(expected, headers[_SIGNATURE_V3_HEADER]):
        raise SignatureError("signature_mismatch")


def _digests_match(expected: str, received: str) -> bool:
    # compare_digest refuses str holding non-ASCII characters, so compare
    # bytes; surrogatepass encodes any str, and such a value simply differs.
    return hmac.compare_digest(
        expected.encode("ascii"), received.encode("utf-8", "surrogatepass")
    )
