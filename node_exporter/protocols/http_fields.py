"""The few values we keep from an HTTP head, cleaned for privacy and bounded cardinality.

Only the method, the path (query and fragment cut off), a route template, the status,
a validated W3C ``traceparent`` and ``x-request-id`` leave the parser; every other
header value is dropped where it is read.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final

MAX_PATH: Final = 1024  # characters of path kept; longer paths are cut, not rejected
MAX_SEGMENTS: Final = 8  # route segments kept; deeper paths end in "/{rest}"
MAX_REQUEST_ID: Final = 128
ID: Final = "{id}"
REST: Final = "{rest}"

_DIGITS = re.compile(r"[0-9]+")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_HAS_DIGIT = re.compile(r"[0-9]")
_HAS_ALPHA = re.compile(r"[A-Za-z]")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_VISIBLE_ASCII = re.compile(rb"[\x21-\x7e]+")


def is_id_segment(seg: str) -> bool:
    """True for path segments that are identifiers rather than names.

    Numbers, UUIDs, hex of 12+ characters with a digit (object ids, hashes), mixed
    letter-digit tokens of 16+ characters (base62/base64 ids) and anything over 40
    characters. Short words like ``v1`` or ``users`` stay, so routes remain readable.
    """
    if not seg:
        return False
    if _DIGITS.fullmatch(seg) or _UUID.fullmatch(seg) or len(seg) > 40:
        return True
    has_digit = _HAS_DIGIT.search(seg) is not None
    if len(seg) >= 12 and has_digit and _HEX.fullmatch(seg):
        return True
    return len(seg) >= 16 and has_digit and _HAS_ALPHA.search(seg) is not None


@lru_cache(maxsize=16384)  # paths repeat; the cache is bounded, and this is pure
def route_template(path: str) -> str:
    """``/users/42/orders/7f3c…`` -> ``/users/{id}/orders/{id}``, at most MAX_SEGMENTS deep."""
    if not path.startswith("/"):
        return path  # "*" or a CONNECT authority: already low-cardinality
    segments = path[1:].split("/", MAX_SEGMENTS)
    out = [ID if is_id_segment(seg) else seg for seg in segments[:MAX_SEGMENTS]]
    if len(segments) > MAX_SEGMENTS:
        out.append(REST)
    return "/" + "/".join(out)


def target_path(method: bytes, target: bytes) -> str | None:
    """The path of a request-target without query or fragment; None if the form is invalid."""
    if method == b"CONNECT":
        raw = target  # authority-form, host:port
    elif target == b"*" or target.startswith(b"/"):
        raw = target
    else:
        m = _ABSOLUTE.match(target)  # absolute-form, sent to proxies
        if m is None:
            return None
        raw = target[m.end() :] or b"/"
        if not raw.startswith(b"/"):
            raw = b"/" + raw
    for sep in (b"?", b"#"):
        cut = raw.find(sep)
        if cut >= 0:
            raw = raw[:cut]
    return raw[: MAX_PATH * 4].decode("utf-8", "backslashreplace")[:MAX_PATH]


def valid_traceparent(value: bytes) -> str:
    """The W3C trace-context ``traceparent`` if well-formed, else ""."""
    m = _TRACEPARENT.match(value)
    if m is None or m[1] == b"ff" or m[2] == b"0" * 32 or m[3] == b"0" * 16:
        return ""
    # Version 00 is exactly 55 characters; later versions may append "-…" fields.
    if (m[1] == b"00" and len(value) != 55) or (len(value) > 55 and value[55:56] != b"-"):
        return ""
    return value[:55].decode("ascii")


def request_id(value: bytes) -> str:
    """``x-request-id`` if it is visible ASCII, cut to MAX_REQUEST_ID."""
    if not _VISIBLE_ASCII.fullmatch(value):
        return ""
    return value[:MAX_REQUEST_ID].decode("ascii")
