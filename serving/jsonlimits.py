"""JSON request bodies parsed with limits: total size, nesting depth, the length of each number.

``json.loads`` alone accepts ``1e400`` (as ``inf``, which then overflows wherever it becomes an
int) and recurses once per nesting level (50,000 levels raise ``RecursionError`` deep in the
scanner, which the gateway did not catch): either one left a connection without an answer.
:func:`parse_limited` checks the depth on the raw bytes before parsing (numpy, no recursion,
a few ms per MB) and refuses numbers too long to be pixel values or scales, so every malformed
body gets a 4xx in milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

_OPENERS = (ord("["), ord("{"))
_CLOSERS = (ord("]"), ord("}"))


@dataclass(frozen=True)
class JSONLimits:
    """``max_bytes``: the whole body; ``max_depth``: nested arrays/objects; ``max_number_chars``:
    the text of one number (a float32 needs ~16 characters, so 64 is generous)."""

    max_bytes: int
    max_depth: int = 16
    max_number_chars: int = 64


class JSONLimitError(ValueError):
    """A body that is not JSON, or breaks a limit: ``status`` (400/413), ``error`` and ``fix``."""

    def __init__(self, status: int, error: str, fix: str) -> None:
        self.status, self.error, self.fix = status, error, fix
        super().__init__(f"{error}. Fix: {fix}")


def nesting_depth(body: bytes) -> int:
    """The deepest nesting of arrays and objects in ``body``, brackets inside strings not counted.

    Escapes are neutralised first (``\\\\`` then ``\\"``, left to right as JSON reads them), so
    every quote left delimits a string; a running XOR of the quotes marks the bytes inside one.
    """
    plain = body.replace(b"\\\\", b"__").replace(b'\\"', b"__")
    data = np.frombuffer(plain, dtype=np.uint8)
    if data.size == 0:
        return 0
    inside = np.bitwise_xor.accumulate((data == ord('"')).astype(np.uint8))
    opens = ((data == _OPENERS[0]) | (data == _OPENERS[1])) & (inside == 0)
    closes = ((data == _CLOSERS[0]) | (data == _CLOSERS[1])) & (inside == 0)
    positions = np.flatnonzero(opens | closes)
    if positions.size == 0:
        return 0
    steps = np.where(opens[positions], 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _number_guard(limit: int, kind: type) -> Any:
    def parse(text: str) -> Any:
        if len(text) > limit:
            raise JSONLimitError(400, f"a number in the body has {len(text)} characters, over the {limit} allowed",
                                 "send pixel values and scales as ordinary numbers (e.g. 0.25, 4)")
        value = kind(text)
        if kind is float and not np.isfinite(value):
            raise JSONLimitError(400, f"the number {text} is out of range (it overflows a float)",
                                 "send pixel values in [0, 1] and scales as small integers (e.g. 4)")
        return value

    return parse


def parse_limited(body: bytes, limits: JSONLimits) -> Any:
    """``body`` parsed as JSON within ``limits``.

    Raises:
        JSONLimitError: 413 over ``max_bytes``, 400 too deep, a number too long or out of
            range, or not JSON at all.
    """
    if len(body) > limits.max_bytes:
        raise JSONLimitError(413, f"JSON body of {len(body)} bytes, over serving.max_json_bytes = {limits.max_bytes}",
                             "send fewer or smaller images per request (base64 `data` is 4x more compact than lists)")
    depth = nesting_depth(body)
    if depth > limits.max_depth:
        raise JSONLimitError(400, f"JSON nested {depth} levels deep, over the {limits.max_depth} allowed",
                             'send {"images": [{"image": [[...], ...], "scale": 4}]} (5 levels)')
    try:
        return json.loads(body, parse_float=_number_guard(limits.max_number_chars, float),
                          parse_int=_number_guard(limits.max_number_chars, int))
    except JSONLimitError:
        raise
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise JSONLimitError(400, f"the request body is not valid JSON ({str(err)[:120]})",
                             'send JSON like {"images": [{"image": [[0.0, 0.5], [0.5, 1.0]], "scale": 4}]}') from None
