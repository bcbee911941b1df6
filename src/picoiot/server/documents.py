"""JSON document helpers shared by config and state: deep merge with null-deletes, delta, size and depth limits."""
from __future__ import annotations

import copy
import json
from typing import Any

from .refusals import Malformed, TooLarge


def merge(base: dict, patch: dict) -> dict:
    """A new dict: `patch` deep-merged into `base`; a None value in `patch` removes the key."""
    out = copy.deepcopy(base)
    _merge_into(out, patch)
    return out


def _merge_into(dst: dict, patch: dict) -> None:
    for k, v in patch.items():
        if v is None:
            dst.pop(k, None)
        elif isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge_into(dst[k], v)
        elif isinstance(v, dict):
            dst[k] = strip_nulls(v)
        else:
            dst[k] = copy.deepcopy(v)


def overlay(base: dict, patch: dict) -> dict:
    """Merge two *override* documents: like merge(), but a None is kept (it deletes the key when the overrides are
    later applied to the defaults)."""
    out = copy.deepcopy(base)
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = overlay(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def strip_nulls(d: dict) -> dict:
    return {k: strip_nulls(v) if isinstance(v, dict) else copy.deepcopy(v) for k, v in d.items() if v is not None}


def delta(desired: dict, reported: dict) -> dict:
    """Fields of `desired` that differ from `reported`, recursing into objects present on both sides."""
    out = {}
    for k, v in desired.items():
        r = reported.get(k, _MISSING)
        if isinstance(v, dict) and isinstance(r, dict):
            sub = delta(v, r)
            if sub:
                out[k] = sub
        elif v != r:
            out[k] = v
    return out


_MISSING = object()


def stamp(meta: dict, patch: dict, ts: int) -> dict:
    """Metadata mirrors the document's shape with `{"timestamp": ts}` at each leaf written by `patch`."""
    out = copy.deepcopy(meta)
    _stamp_into(out, patch, ts)
    return out


def _stamp_into(meta: dict, patch: dict, ts: int) -> None:
    for k, v in patch.items():
        if v is None:
            meta.pop(k, None)
        elif isinstance(v, dict) and v:
            node = meta.get(k)
            if not isinstance(node, dict) or "timestamp" in node:
                node = meta[k] = {}
            _stamp_into(node, v, ts)
        else:
            meta[k] = {"timestamp": ts}


def depth(obj: Any) -> int:
    """Nesting depth of objects/arrays: a scalar is 0, {"a": 1} is 1."""
    if isinstance(obj, dict):
        return 1 + max((depth(v) for v in obj.values()), default=0)
    if isinstance(obj, list):
        return 1 + max((depth(v) for v in obj), default=0)
    return 0


def encoded_size(obj: Any) -> int:
    return len(json.dumps(obj, separators=(",", ":")).encode())


#: how deep a device type's JSON schema may nest (the built-in ones: 7)
SCHEMA_DEPTH = 12


def check_depth(doc: Any, max_depth: int, what: str = "document") -> None:
    d = depth(doc)
    if d > max_depth:
        raise Malformed(f"{what} too deep", {"depth": d, "max_depth": max_depth})


def check_limits(doc: Any, max_bytes: int, max_depth: int, what: str = "document") -> None:
    check_depth(doc, max_depth, what)
    size = encoded_size(doc)
    if size > max_bytes:
        raise TooLarge(f"{what} too large", {"size": size, "max_bytes": max_bytes})
