"""Short content digests: the one way a dict or a list of strings becomes a 16-hex-digit id
(model and config hashes, manifest hashes and build fingerprints, source digests)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

__all__ = ["DIGEST_HEX", "canonical_json", "json_digest", "strings_digest"]

DIGEST_HEX = 16


def canonical_json(obj: Any) -> str:
    """Sorted keys, no spaces, ASCII: the same text for the same value on every machine."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def json_digest(obj: Any, *, canonical: bool = True) -> str:
    """sha256 of ``obj`` as JSON with sorted keys, first 16 hex digits.

    ``canonical=False`` hashes ``json.dumps(obj, sort_keys=True)`` (default spacing): the form
    model and config hashes have had since the first release, kept so that every existing
    checkpoint still matches its config.
    """
    text = canonical_json(obj) if canonical else json.dumps(obj, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:DIGEST_HEX]


def strings_digest(items: Iterable[str]) -> str:
    """sha256 of the strings, each followed by a NUL byte, first 16 hex digits (order matters)."""
    h = hashlib.sha256()
    for s in items:
        h.update(s.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()[:DIGEST_HEX]
