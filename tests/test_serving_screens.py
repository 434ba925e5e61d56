"""The gateway's screens in-process: JSON parsed with limits, multipart part headers checked."""

from __future__ import annotations

import json

import pytest

from serving.jsonlimits import JSONLimitError, JSONLimits, nesting_depth, parse_limited
from serving.multipart import MultipartScreen

LIMITS = JSONLimits(max_bytes=1000, max_depth=5, max_number_chars=20)


@pytest.mark.parametrize(("body", "depth"), [
    (b"5", 0), (b"[]", 1), (b'{"a": [[1], [2, [3]]]}', 4),
    (b'["[[[[[[", "]]"]', 1),  # brackets inside strings do not count
    (b'["a\\"[[[[", "\\\\", [[0]]]', 3),  # nor after escaped quotes and backslashes
])
def test_nesting_depth_skips_strings(body: bytes, depth: int) -> None:
    assert nesting_depth(body) == depth
    json.loads(body)  # the examples are valid JSON


@pytest.mark.parametrize(("body", "status", "word"), [
    (b"[" * 6 + b"]" * 6, 400, "nested"), (b"[1e400]", 400, "out of range"), (b"[" + b"1" * 21 + b"]", 400, "characters"),
    (b"[0.5, ", 400, "not valid json"), (b"[" + b" " * 1000 + b"]", 413, "max_json_bytes"),
])
def test_bodies_beyond_the_limits_are_refused(body: bytes, status: int, word: str) -> None:
    with pytest.raises(JSONLimitError) as caught:
        parse_limited(body, LIMITS)
    assert caught.value.status == status and word in caught.value.error.lower()


def test_a_good_body_parses() -> None:
    assert parse_limited(b'{"images": [{"image": [[0.25, 1]], "scale": 4}]}', LIMITS)["images"][0]["scale"] == 4


def _screened(parts: list[bytes], fields: tuple[str, ...] = ("file", "scale"), chunk: int = 7) -> MultipartScreen:
    body = b"".join(b"--b\r\n" + part + b"\r\n" for part in parts) + b"--b--\r\n"
    screen = MultipartScreen(b"b", fields, "/upscale")
    for start in range(0, len(body), chunk):  # part headers straddle chunks
        screen.feed(body[start:start + chunk], final=start + chunk >= len(body))
    return screen


FILE = b'Content-Disposition: form-data; name="file"; filename="Doe_Jane.png"\r\n\r\nPNG'


@pytest.mark.parametrize(("parts", "word"), [
    ([b'Content-Disposition: form-data; name="File"; filename="a.png"\r\n\r\nx'], "case-sensitive"),
    ([b'Content-Disposition: form-data; filename="a.png"\r\n\r\nx'], "no field name"),
    ([FILE, b'Content-Disposition: form-data; name="scale"\r\n\r\n2', b'Content-Disposition: form-data; name="scale"\r\n\r\n4'],
     "twice"),
    ([FILE, b'Content-Disposition: form-data; name="scale"; filename="g.png"\r\n\r\nx'], "carries a file"),
    ([FILE, b'Content-Disposition: form-data; name="extra"; filename="g.png"\r\n\r\nx'], "unknown field"),
    ([b'Content-Disposition: form-data; name="file"; filename="a.png"; x="' + b"a" * 5000 + b'"\r\n\r\nx'], "header"),
])
def test_malformed_parts_are_refused(parts: list[bytes], word: str) -> None:
    rejection = _screened(parts).rejection
    assert rejection is not None and rejection[0] == 400 and word in rejection[1], rejection


def test_a_good_body_passes_with_neutral_file_names() -> None:
    body = b"--b\r\n" + FILE + b"\r\n--b\r\nContent-Disposition: form-data; name=\"scale\"\r\n\r\n2\r\n--b--\r\n"
    screen = MultipartScreen(b"b", ("file", "scale"), "/upscale")
    out = b"".join(screen.feed(body[i:i + 5], final=i + 5 >= len(body)) for i in range(0, len(body), 5))
    assert screen.rejection is None and b'filename="upload.png"' in out and b"Doe" not in out
