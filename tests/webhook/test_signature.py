import base64
import hashlib
import hmac
import time

import pytest
from hubspot.utils.signature import Signature
from werkzeug.datastructures import Headers

from webhook.signature import (
    MAX_TIMESTAMP_SKEW,
    SignatureError,
    hubspot_decoded_uri,
    sign_v1,
    sign_v2,
    sign_v3,
    verify_signature,
)

# HubSpot's published test vectors, as listed in HUBSPOT.md section 2.
SECRET = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"
URI = "https://www.example.com/webhook_uri"

V1_BODY = (
    b'[{"eventId":1,"subscriptionId":12345,"portalId":62515,'
    b'"occurredAt":1564113600000,"subscriptionType":"contact.creation",'
    b'"attemptNumber":0,"objectId":123,"changeSource":"CRM","changeFlag":"NEW",'
    b'"appId":54321}]'
)
V1_SIGNATURE = "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de"

V2_GET_SIGNATURE = "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e"
V2_POST_BODY = b'{"example_field":"example_value"}'
V2_POST_SIGNATURE = "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900"

V3_BODY = b"{'example_field':'example_value'}"
V3_TIMESTAMP = "1693657560000"
V3_SIGNATURE = "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y="
V3_NOW = 1693657560.0 + 2  # Two seconds after HubSpot signed the vector.

SKEW_SECONDS = MAX_TIMESTAMP_SKEW.total_seconds()


def hmac_base64(message: bytes, secret: str = SECRET) -> str:
    """The v3 digest of an exact signed string, computed without the module."""
    digest = hmac.new(secret.encode(), message, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def v3_headers(
    signature: str = V3_SIGNATURE, timestamp: str = V3_TIMESTAMP
) -> dict[str, str]:
    return {
        "X-HubSpot-Signature-v3": signature,
        "X-HubSpot-Request-Timestamp": timestamp,
    }


def v1_headers(signature: str = V1_SIGNATURE) -> dict[str, str]:
    return {"X-HubSpot-Signature": signature, "X-HubSpot-Signature-Version": "v1"}


def verify(**overrides) -> str:
    """verify_signature on HubSpot's v3 vector, with some arguments replaced."""
    arguments = {
        "secret": SECRET,
        "method": "POST",
        "uri": URI,
        "body": V3_BODY,
        "headers": v3_headers(),
        "now": V3_NOW,
    }
    arguments.update(overrides)
    return verify_signature(**arguments)


def refusal_reason(**overrides) -> str:
    with pytest.raises(SignatureError) as refused:
        verify(**overrides)
    return refused.value.reason


# HubSpot's vectors


def test_v1_matches_hubspot_vector():
    assert sign_v1(SECRET, V1_BODY) == V1_SIGNATURE


def test_v2_matches_hubspot_vector_for_get_without_body():
    assert sign_v2(SECRET, "GET", URI, b"") == V2_GET_SIGNATURE


def test_v2_matches_hubspot_vector_for_post():
    assert sign_v2(SECRET, "POST", URI, V2_POST_BODY) == V2_POST_SIGNATURE


def test_v3_matches_hubspot_vector():
    assert sign_v3(SECRET, "POST", URI, V3_BODY, V3_TIMESTAMP) == V3_SIGNATURE


# Accepting genuine requests


def test_accepts_hubspot_v1_vector():
    version = verify(body=V1_BODY, headers=v1_headers())

    assert version == "v1"


def test_accepts_hubspot_v2_vector_for_get_without_body():
    headers = {
        "X-HubSpot-Signature": V2_GET_SIGNATURE,
        "X-HubSpot-Signature-Version": "v2",
    }

    assert verify(method="GET", body=b"", headers=headers) == "v2"


def test_accepts_hubspot_v2_vector_for_post():
    headers = {
        "X-HubSpot-Signature": V2_POST_SIGNATURE,
        "X-HubSpot-Signature-Version": "v2",
    }

    assert verify(body=V2_POST_BODY, headers=headers) == "v2"


def test_accepts_hubspot_v3_vector():
    assert verify() == "v3"


def test_v3_reads_the_clock_when_no_time_is_given():
    timestamp = str(int(time.time() * 1000))
    signature = sign_v3(SECRET, "POST", URI, V3_BODY, timestamp)

    version = verify_signature(
        secret=SECRET,
        method="POST",
        uri=URI,
        body=V3_BODY,
        headers=v3_headers(signature, timestamp),
    )

    assert version == "v3"


def test_signs_the_body_bytes_without_decoding_them():
    body = b'{"name":"\xff\xfe not utf-8"}'
    timestamp = V3_TIMESTAMP
    signature = sign_v3(SECRET, "POST", URI, body, timestamp)

    assert signature == hmac_base64(b"POST" + URI.encode() + body + b"1693657560000")
    assert sign_v1(SECRET, body) == hashlib.sha256(SECRET.encode() + body).hexdigest()
    assert verify(body=body, headers=v3_headers(signature)) == "v3"


# Refusing forged requests


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(V1_BODY, v1_headers(), id="v1"),
        pytest.param(
            V2_POST_BODY,
            {
                "X-HubSpot-Signature": V2_POST_SIGNATURE,
                "X-HubSpot-Signature-Version": "v2",
            },
            id="v2",
        ),
        pytest.param(V3_BODY, v3_headers(), id="v3"),
    ],
)
def test_rejects_tampered_body(body, headers):
    tampered = body.replace(b"example_value", b"example_valuf").replace(
        b'"objectId":123', b'"objectId":124'
    )

    assert refusal_reason(body=tampered, headers=headers) == "signature_mismatch"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(V1_BODY, v1_headers(), id="v1"),
        pytest.param(V3_BODY, v3_headers(), id="v3"),
    ],
)
def test_rejects_signature_made_with_another_secret(body, headers):
    other_secret = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"

    reason = refusal_reason(secret=other_secret, body=body, headers=headers)

    assert reason == "signature_mismatch"


def test_v2_rejects_request_sent_to_another_uri():
    headers = {
        "X-HubSpot-Signature": V2_POST_SIGNATURE,
        "X-HubSpot-Signature-Version": "v2",
    }

    reason = refusal_reason(
        uri="https://www.example.com/other_uri", body=V2_POST_BODY, headers=headers
    )

    assert reason == "signature_mismatch"


def test_v3_rejects_another_method():
    assert refusal_reason(method="PUT") == "signature_mismatch"


def test_v3_rejects_timestamp_other_than_the_signed_one():
    headers = v3_headers(timestamp="1693657561000")

    assert refusal_reason(headers=headers) == "signature_mismatch"


# v3 timestamps


def test_v3_rejects_stale_timestamp():
    now = int(V3_TIMESTAMP) / 1000 + SKEW_SECONDS + 1

    assert refusal_reason(now=now) == "stale_timestamp"


def test_v3_accepts_timestamp_just_inside_the_window_in_the_past():
    now = int(V3_TIMESTAMP) / 1000 + SKEW_SECONDS - 1

    assert verify(now=now) == "v3"


def test_v3_rejects_timestamp_from_the_future():
    now = int(V3_TIMESTAMP) / 1000 - SKEW_SECONDS - 1

    assert refusal_reason(now=now) == "future_timestamp"


def test_v3_accepts_timestamp_just_inside_the_window_in_the_future():
    now = int(V3_TIMESTAMP) / 1000 - SKEW_SECONDS + 1

    assert verify(now=now) == "v3"


@pytest.mark.parametrize("offset", [SKEW_SECONDS, -SKEW_SECONDS])
def test_v3_accepts_timestamp_exactly_at_the_edge_of_the_window(offset):
    now = int(V3_TIMESTAMP) / 1000 + offset

    assert verify(now=now) == "v3"


def test_v3_window_can_be_narrowed():
    now = int(V3_TIMESTAMP) / 1000 + 61

    assert verify(now=now) == "v3"
    assert refusal_reason(now=now, max_skew=MAX_TIMESTAMP_SKEW / 5) == (
        "stale_timestamp"
    )


def test_v3_checks_the_timestamp_before_the_signature():
    now = int(V3_TIMESTAMP) / 1000 + SKEW_SECONDS + 1

    assert refusal_reason(now=now, body=b"forged") == "stale_timestamp"


def test_v3_rejects_missing_timestamp():
    headers = {"X-HubSpot-Signature-v3": V3_SIGNATURE}

    assert refusal_reason(headers=headers) == "missing_timestamp"


@pytest.mark.parametrize(
    "timestamp",
    [
        "",
        "soon",
        "1693657560000.0",
        "1.69365756e12",
        "-1693657560000",
        "+1693657560000",
        " 1693657560000",
        "1_693_657_560_000",
        "١٦٩٣٦٥٧٥٦٠٠٠٠",  # Arabic-Indic digits, which int() would accept.
        "9" * 5000,  # More digits than int() parses by default.
    ],
)
def test_v3_rejects_timestamp_that_is_not_milliseconds_as_digits(timestamp):
    assert refusal_reason(headers=v3_headers(timestamp=timestamp)) == (
        "malformed_timestamp"
    )


def test_v3_rejects_absurdly_large_timestamp_as_from_the_future():
    assert refusal_reason(headers=v3_headers(timestamp="9" * 400)) == (
        "future_timestamp"
    )


# v3 URI decoding

DECODED_ESCAPES = [
    ("%3A", ":"),
    ("%2F", "/"),
    ("%3F", "?"),
    ("%40", "@"),
    ("%21", "!"),
    ("%24", "$"),
    ("%27", "'"),
    ("%28", "("),
    ("%29", ")"),
    ("%2A", "*"),
    ("%2C", ","),
    ("%3B", ";"),
]


@pytest.mark.parametrize(("escape", "character"), DECODED_ESCAPES)
def test_v3_signs_the_decoded_character_of_escape(escape, character):
    uri = f"https://www.example.com/webhook_uri?next=a{escape}b"
    signed_uri = f"https://www.example.com/webhook_uri?next=a{character}b"
    expected = hmac_base64(b"POST" + signed_uri.encode() + V3_BODY + b"1693657560000")

    assert sign_v3(SECRET, "POST", uri, V3_BODY, V3_TIMESTAMP) == expected
    assert verify(uri=uri, headers=v3_headers(expected)) == "v3"


@pytest.mark.parametrize(("escape", "character"), DECODED_ESCAPES)
def test_v3_decodes_escape_in_lowercase_hex(escape, character):
    assert hubspot_decoded_uri(f"/a{escape.lower()}b") == f"/a{character}b"


@pytest.mark.parametrize("escape", ["%20", "%25", "%2B", "%3D", "%26", "%23", "%7E"])
def test_v3_signs_other_escapes_as_sent(escape):
    uri = f"https://www.example.com/webhook_uri?q=a{escape}b"
    expected = hmac_base64(b"POST" + uri.encode() + V3_BODY + b"1693657560000")

    assert hubspot_decoded_uri(uri) == uri
    assert sign_v3(SECRET, "POST", uri, V3_BODY, V3_TIMESTAMP) == expected


def test_v3_decodes_in_one_pass():
    assert hubspot_decoded_uri("/a%253Ab") == "/a%253Ab"
    assert hubspot_decoded_uri("/a%3A3Ab") == "/a:3Ab"


def test_v3_leaves_incomplete_escapes_alone():
    assert hubspot_decoded_uri("/a%3") == "/a%3"
    assert hubspot_decoded_uri("/a%zz%") == "/a%zz%"


def test_v3_decodes_every_escape_of_a_query_string():
    uri = "https://www.example.com/hook?redirect=https%3A%2F%2Fx.test%2Fp%3Fq%3D1"

    assert hubspot_decoded_uri(uri) == (
        "https://www.example.com/hook?redirect=https://x.test/p?q%3D1"
    )


def test_v3_signs_the_query_string():
    uri = "https://www.example.com/webhook_uri?portal=62515&mode=a%2Cb"
    signature = sign_v3(SECRET, "POST", uri, V3_BODY, V3_TIMESTAMP)

    assert verify(uri=uri, headers=v3_headers(signature)) == "v3"
    assert refusal_reason(headers=v3_headers(signature)) == "signature_mismatch"


def test_v2_signs_the_uri_as_sent():
    uri = "https://www.example.com/webhook_uri?next=a%3Ab"
    expected = hashlib.sha256(
        SECRET.encode() + b"POST" + uri.encode() + V2_POST_BODY
    ).hexdigest()

    assert sign_v2(SECRET, "POST", uri, V2_POST_BODY) == expected


# Which version decides


def test_v3_decides_even_beside_a_valid_v1():
    headers = v1_headers() | v3_headers(signature=hmac_base64(b"forged"))

    assert refusal_reason(body=V1_BODY, headers=headers) == "signature_mismatch"


def test_v3_decides_even_beside_a_valid_v1_when_the_timestamp_is_missing():
    headers = v1_headers() | {"X-HubSpot-Signature-v3": V3_SIGNATURE}

    assert refusal_reason(body=V1_BODY, headers=headers) == "missing_timestamp"


def test_valid_v3_is_accepted_beside_a_bad_v1():
    headers = v3_headers() | v1_headers(signature="0" * 64)

    assert verify(headers=headers) == "v3"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(V1_BODY, v1_headers(), id="v1"),
        pytest.param(
            V2_POST_BODY,
            {
                "X-HubSpot-Signature": V2_POST_SIGNATURE,
                "X-HubSpot-Signature-Version": "v2",
            },
            id="v2",
        ),
    ],
)
def test_require_v3_refuses_valid_older_signatures(body, headers):
    reason = refusal_reason(body=body, headers=headers, require_v3=True)

    assert reason == "v3_required"


def test_require_v3_accepts_v3():
    assert verify(require_v3=True) == "v3"


# Missing and unusual headers


def test_rejects_request_without_any_signature():
    assert refusal_reason(headers={}) == "missing_signature"


def test_rejects_request_without_any_signature_when_v3_is_required():
    assert refusal_reason(headers={}, require_v3=True) == "v3_required"


def test_rejects_signature_without_version():
    headers = {"X-HubSpot-Signature": V1_SIGNATURE}

    assert refusal_reason(body=V1_BODY, headers=headers) == "unknown_signature_version"


@pytest.mark.parametrize("version", ["v3", "v4", "1", ""])
def test_rejects_unknown_signature_version(version):
    headers = {
        "X-HubSpot-Signature": V1_SIGNATURE,
        "X-HubSpot-Signature-Version": version,
    }

    assert refusal_reason(body=V1_BODY, headers=headers) == "unknown_signature_version"


def test_reads_signature_version_in_any_case():
    headers = {"X-HubSpot-Signature": V1_SIGNATURE, "X-HubSpot-Signature-Version": "V1"}

    assert verify(body=V1_BODY, headers=headers) == "v1"


def test_reads_header_names_in_any_case():
    v3 = {
        "x-hubspot-signature-V3": V3_SIGNATURE,
        "X-HUBSPOT-REQUEST-TIMESTAMP": V3_TIMESTAMP,
    }
    v1 = {"x-hubspot-signature": V1_SIGNATURE, "X-Hubspot-Signature-VERSION": "v1"}

    assert verify(headers=v3) == "v3"
    assert verify(body=V1_BODY, headers=v1) == "v1"


def test_reads_werkzeug_headers():
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("x-hubspot-signature-v3", V3_SIGNATURE),
            ("x-hubspot-request-timestamp", V3_TIMESTAMP),
        ]
    )

    assert verify(headers=headers) == "v3"


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        pytest.param(V1_BODY, v1_headers(signature="é" * 64), id="v1"),
        pytest.param(V3_BODY, v3_headers(signature="😀" * 11), id="v3"),
        pytest.param(V3_BODY, v3_headers(signature="\udcff" * 44), id="surrogate"),
    ],
)
def test_rejects_non_ascii_signature_without_crashing(body, headers):
    assert refusal_reason(body=body, headers=headers) == "signature_mismatch"


def test_rejects_empty_v3_signature():
    assert refusal_reason(headers=v3_headers(signature="")) == "signature_mismatch"


def test_rejects_uppercase_hex_v1_signature():
    headers = v1_headers(signature=V1_SIGNATURE.upper())

    assert refusal_reason(body=V1_BODY, headers=headers) == "signature_mismatch"


def test_signature_error_keeps_its_reason():
    error = SignatureError("stale_timestamp")

    assert error.reason == "stale_timestamp"
    assert str(error) == "stale_timestamp"


# HubSpot's own SDK as an independent oracle

ORACLE_BODIES = [
    "",
    "[]",
    V1_BODY.decode(),
    '[{"objectId":1,"propertyValue":"Zoë Šimić 東京 😀"}]',
]

# (URI as the app sees it, URI as HubSpot signs it for v3)
ORACLE_URIS = [
    (URI, URI),
    (
        "https://hooks.example.com/hubspot?portal=62515&x=1",
        "https://hooks.example.com/hubspot?portal=62515&x=1",
    ),
    (
        "https://hooks.example.com/hubspot?next=%2Fdeals%3Fid%3D1%26a%3A%40b",
        "https://hooks.example.com/hubspot?next=/deals?id%3D1%26a:@b",
    ),
    (
        "https://hooks.example.com/a%28b%29%2a%2c%3b%21%24%27?q=%20%25",
        "https://hooks.example.com/a(b)*,;!$'?q=%20%25",
    ),
]


@pytest.mark.parametrize("body", ORACLE_BODIES)
def test_v1_agrees_with_hubspot_sdk(body):
    expected = Signature.get_signature(SECRET, body, "v1")

    assert sign_v1(SECRET, body.encode()) == expected


@pytest.mark.parametrize("body", ORACLE_BODIES)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
@pytest.mark.parametrize(("uri", "signed_uri"), ORACLE_URIS)
def test_v2_agrees_with_hubspot_sdk(body, method, uri, signed_uri):
    expected = Signature.get_signature(
        SECRET, body, "v2", http_uri=uri, http_method=method
    )

    assert sign_v2(SECRET, method, uri, body.encode()) == expected


@pytest.mark.parametrize("body", ORACLE_BODIES)
@pytest.mark.parametrize("method", ["GET", "POST", "PUT"])
@pytest.mark.parametrize(("uri", "signed_uri"), ORACLE_URIS)
def test_v3_agrees_with_hubspot_sdk(body, method, uri, signed_uri):
    expected = Signature.get_signature(
        SECRET,
        body,
        "v3",
        http_uri=signed_uri,
        http_method=method,
        timestamp=V3_TIMESTAMP,
    )

    assert sign_v3(SECRET, method, uri, body.encode(), V3_TIMESTAMP) == expected
    assert (
        verify(method=method, uri=uri, body=body.encode(), headers=v3_headers(expected))
        == "v3"
    )
