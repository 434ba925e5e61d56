"""Multipart bodies screened part by part before BentoML parses them.

BentoML's serde answers 500 for parts it does not expect (a part named ``File`` for a ``file``
argument, a part without ``name``, a file in a text field) and for a part header over
python-multipart's limit, and it silently keeps one of two ``scale`` fields. The screen sees
every part header as the body streams through and refuses such a body with a 400 that names the
part; it also replaces every client file name with a neutral one (a file name can hold a
patient's name).
"""

from __future__ import annotations

import re
from collections.abc import Collection

Rejection = tuple[int, str, str]
"""(status, error, fix) of a refused request."""

_DISPOSITION = re.compile(rb'(?im)^content-disposition:[^\r\n]*')
_PARAMETER = re.compile(rb'(?i);\s*(name|filename\*?)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\r\n]*)')
_SAFE_SUFFIX = re.compile(r"(\.[A-Za-z0-9]{1,8}){1,2}$")
_FIELD_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
# python-multipart refuses a header line over 4096 + 128 bytes and more than 8 header lines
# (DEFAULT_MAX_HEADER_SIZE, DEFAULT_MAX_HEADER_COUNT), which BentoML turns into a 500.
MAX_PART_HEADER_BYTES = 4096
MAX_PART_HEADER_LINES = 8
FILE_FIELD = "file"


def neutral_file_name(name: str) -> str:
    """``upload`` plus the client's extension (``.dcm``, ``.nii.gz``): the rest of a client's
    file name can be a patient's name and any length, so it never reaches a path or a log."""
    suffix = _SAFE_SUFFIX.search(name[-20:])
    return "upload" + (suffix.group(0).lower() if suffix else "")


def _shown(name: str) -> str:
    """A field name fit for an error message (a client's text: only short, plain names are echoed)."""
    return f"`{name}`" if _FIELD_NAME.match(name) else "(an unusual name)"


class MultipartScreen:
    """Streams a multipart body through, checking and rewriting each part's header.

    ``fields``: the route's form fields (None: any). Refused, as :data:`rejection`: a part
    without a name, a name that is not a field (case included: ``File`` is not ``file``), a
    field sent twice, a file in any field but ``file``, text in ``file``, and a part header
    over :data:`MAX_PART_HEADER_BYTES` or :data:`MAX_PART_HEADER_LINES`. Every ``filename``
    becomes :func:`neutral_file_name`. Part headers may straddle chunks, so a chunk's tail that
    could begin a delimiter or hold an unfinished header is carried into the next one.
    """

    def __init__(self, boundary: bytes, fields: Collection[str] | None = None, route: str = "") -> None:
        self.delimiter = b"--" + boundary
        self.fields = None if fields is None else tuple(fields)
        self.route = route
        self.carry = b""
        self.seen: set[str] = set()
        self.closed = False  # the closing delimiter (--boundary--) was seen
        self.rejection: Rejection | None = None

    def feed(self, chunk: bytes, final: bool) -> bytes:
        data = self.carry + chunk
        self.carry = b""
        out: list[bytes] = []
        position = 0
        while True:
            found = data.find(self.delimiter, position)
            if found < 0:
                break
            header_start = found + len(self.delimiter)
            header_end = data.find(b"\r\n\r\n", header_start)
            if header_end < 0:
                if data.startswith(b"--", header_start):
                    self.closed = True
                    break  # the closing delimiter, then at most an epilogue
                if len(data) - header_start > MAX_PART_HEADER_BYTES + 4:
                    self._refuse_header(len(data) - header_start)
                elif not final:
                    out.append(data[position:found])
                    self.carry = data[found:]
                    return b"".join(out)
                break
            if header_end - header_start > MAX_PART_HEADER_BYTES:
                self._refuse_header(header_end - header_start)
                break
            out.append(data[position:header_start])
            out.append(self._rewritten(data[header_start:header_end]))
            position = header_end
        keep = 0 if final else min(len(data) - position, len(self.delimiter))
        out.append(data[position:len(data) - keep])
        self.carry = data[len(data) - keep:]
        return b"".join(out)

    def _refuse(self, error: str, fix: str) -> None:
        if self.rejection is None:
            self.rejection = (400, error, fix)

    def _refuse_header(self, size: int) -> None:
        self._refuse(f"a multipart part header is over {MAX_PART_HEADER_BYTES} bytes (at least {size})",
                     "send each field with a short header (Content-Disposition and Content-Type only), as "
                     "curl -F and HTTP libraries do")

    def _rewritten(self, header: bytes) -> bytes:
        if header.startswith(b"--"):
            self.closed = True
            return header  # the closing delimiter: no part follows
        if header.count(b"\r\n") > MAX_PART_HEADER_LINES:
            self._refuse(f"a multipart part has more than {MAX_PART_HEADER_LINES} header lines",
                         "send each field with Content-Disposition (and Content-Type) only")
        disposition = _DISPOSITION.search(header)
        parameters = {} if disposition is None else {key.lower(): value for key, value in
                                                     _PARAMETER.findall(disposition.group(0))}
        name = parameters.get(b"name", b"").strip(b'"').decode("latin-1")
        has_file = b"filename" in parameters or b"filename*" in parameters
        self._check_field(name, has_file)
        if disposition is None or not has_file:
            return header
        line = disposition.group(0)
        original = (parameters.get(b"filename") or parameters.get(b"filename*") or b"").strip(b'"')
        neutral = neutral_file_name(original.decode("latin-1")).encode()
        stripped = _PARAMETER.sub(lambda m: b"" if m.group(1).lower().startswith(b"filename") else m.group(0), line)
        new_line = stripped + b'; filename="' + neutral + b'"'
        return header[:disposition.start()] + new_line + header[disposition.end():]

    def _check_field(self, name: str, has_file: bool) -> None:
        fields = self.fields
        if not name:
            self._refuse("a multipart part has no field name (Content-Disposition: form-data; name=...)",
                         f"name every part: the image in `{FILE_FIELD}`, the options by their names (docs/serving.md)")
            return
        if fields is not None and name not in fields:
            same = [field for field in fields if field.lower() == name.lower()]
            if same:
                self._refuse(f"unknown field {_shown(name)}: field names are case-sensitive", f"name it `{same[0]}`")
            else:
                self._refuse(f"unknown field {_shown(name)} for {self.route or 'this route'} (the image goes in "
                             f"`{FILE_FIELD}`)",
                             f"send only the fields {', '.join(fields)} (the image in `{FILE_FIELD}`)")
            return
        if name in self.seen:
            self._refuse(f"field {_shown(name)} sent twice", f"send each field once (one image per request in `{FILE_FIELD}`)")
            return
        self.seen.add(name)
        if name == FILE_FIELD and not has_file:
            self._refuse("the `file` field holds text, not a file (sent without a file name)",
                         "attach the file itself: curl -F file=@ct.dcm (with the @), or "
                         "requests.post(url, files={'file': open('ct.dcm', 'rb')})")
        elif name != FILE_FIELD and has_file:
            self._refuse(f"field {_shown(name)} carries a file; only `{FILE_FIELD}` takes one",
                         f"send {_shown(name)} as a plain value (curl -F {name if _FIELD_NAME.match(name) else 'scale'}=4, "
                         "without @)")
