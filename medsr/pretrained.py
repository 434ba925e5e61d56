"""Published weights as a pipeline input, the way :mod:`medsr.data` treats data.

A model entry in params.yaml names its starting checkpoint (per scale, since each scale is its own
file)::

    train:
      models:
        rlfn:
          x4: {init: {file: rlfn_x4.pth, url: https://..., sha256: 8c7e..., licence: Apache-2.0,
                      source: "github bytedance/RLFN @ bccfde9: model_zoo/rlfn_x4.pth"}}

:func:`fetch_checkpoint` makes ``pretrained/<file>`` exist with exactly that sha256: a file already
placed there is checked and kept; otherwise it is downloaded, resumably (the bytes so far wait in
``pretrained/.partial/<file>.part`` and a rerun asks the server for the rest with an HTTP Range
request), checked, and only then moved onto its final name. A file with another sha256 is refused
with a message naming it, never used. Offline with no file, the error is one line saying which
file to put where, with its sha256 (the ``pretrained`` stage then exits 1). :func:`load_published`
turns the verified file into MedSR's grey generator (:mod:`medsr.models.published`).

These models are off by default (not in ``train.models``): a fresh machine has no weights and may
have no network, and ``make run`` must still pass there; a model whose weights are missing cannot
be skipped quietly either, because its training and benchmark outputs would then depend on a file
that is not a declared input. Adding the entry is the one switch.
"""

from __future__ import annotations

import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from medsr.data.sources.errors import SourceError
from medsr.data.sources.transfer import HASH_CHUNK, sha256_file, with_retries

PRETRAINED_ROOT = Path("pretrained")
PARTIAL_DIR = ".partial"
INIT_KEYS = ("file", "url", "sha256", "licence", "source")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TRANSIENT_HTTP = frozenset({408, 425, 429})
_TIMEOUT_SECONDS = 60.0

# (request, timeout=...) -> a response with .status, .read(n) and a context manager: urlopen's shape.
Opener = Callable[..., Any]


@dataclass(frozen=True)
class CheckpointInit:
    """A published checkpoint a model starts from: where it comes from and what it must hash to."""

    file: str
    url: str
    sha256: str
    licence: str
    source: str

    @classmethod
    def from_mapping(cls, value: Any, where: str) -> CheckpointInit:
        """Parse ``train.models.<name>...init``; ``where`` names that key in every error.

        Raises:
            ValueError: a key is missing or unknown, a value is empty, ``file`` is not a bare file
                name, ``url`` is not http(s), or ``sha256`` is not 64 lower-case hex digits.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{where} must map {', '.join(INIT_KEYS)}, got {value!r}")
        missing = [key for key in INIT_KEYS if not str(value.get(key) or "").strip()]
        unknown = sorted(set(value) - set(INIT_KEYS))
        if missing or unknown:
            raise ValueError(f"{where}: missing {missing or 'nothing'}, unknown {unknown or 'nothing'}; "
                             f"it needs exactly {', '.join(INIT_KEYS)}")
        init = cls(**{key: str(value[key]).strip() for key in INIT_KEYS})
        if Path(init.file).name != init.file or init.file.startswith("."):
            raise ValueError(f"{where}.file must be a file name inside pretrained/, got {init.file!r}")
        if not init.url.startswith(("https://", "http://")):
            raise ValueError(f"{where}.url must be an http(s) URL, got {init.url!r}")
        if not _SHA256.fullmatch(init.sha256):
            raise ValueError(f"{where}.sha256 must be 64 lower-case hex digits, got {init.sha256!r}")
        return init

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _github(repository: str, commit: str, path: str) -> tuple[str, str]:
    return f"https://github.com/{repository}/raw/{commit}/{path}", f"github {repository} @ {commit}: {path}"


# The published checkpoints MedSR knows (../shared/pretrained/SOURCES.md), by (architecture, scale):
# what a params.yaml `init` entry for them says, and what benchmarks/bench_pretrained.py checks.
KNOWN_CHECKPOINTS: dict[tuple[str, int], CheckpointInit] = {
    (name, scale): CheckpointInit(file, *_github(repository, commit, path)[:1], sha256, licence,
                                  _github(repository, commit, path)[1])
    for name, scale, file, repository, commit, path, licence, sha256 in [
        ("rlfn", 2, "rlfn_x2.pth", "bytedance/RLFN", "bccfde91bf8b2de80789ec033a029e6f2a932330",
         "model_zoo/rlfn_x2.pth", "Apache-2.0", "eafe5d5feeb122022453595c06d79160facdc157ae88deb02a44c50f5eba2d41"),
        ("rlfn", 4, "rlfn_x4.pth", "bytedance/RLFN", "bccfde91bf8b2de80789ec033a029e6f2a932330",
         "model_zoo/rlfn_x4.pth", "Apache-2.0", "8c7edb57dfc89048bafba29d591d4c27d4099964b4a9e22df23d6dc257a637c0"),
        ("span", 4, "span_ch28_x4.pth", "Amazingren/NTIRE2024_ESR", "6404fa48dde4a4adbf241a51debdc661aef20449",
         "model_zoo/team38_span_ch28_slim.pth", "MIT",
         "6c80f05048313289c6526e5fc9726688d7bb3dfdd6ae3c8b1e7dd09f601e5971"),
        ("rfdn", 4, "rfdn_x4.pth", "njulj/RFDN", "7cf4e25b6633e81fd7e26891aeee2baca4f8f927",
         "trained_model/RFDN_AIM.pth", "MIT", "11af8ec8ebd68689e90ef1e29044f9804c72d3bd9f7573820b7b26035782760c"),
    ]
}


class _ChecksumMismatch(Exception):
    """Downloaded bytes that do not hash to the pinned sha256 (retried: the transfer may be bad)."""


def _is_transient(exc: BaseException) -> bool:
    """Network trouble, throttling, server errors and bad transfers; not 4xx or local-disk errors."""
    if isinstance(exc, _ChecksumMismatch):
        return True
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code in _TRANSIENT_HTTP or exc.code >= 500
    if isinstance(exc, (PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    return isinstance(exc, OSError)  # URLError, connection resets and timeouts derive from OSError


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _ChecksumMismatch):
        return str(exc)  # both digests, whole: the point of the message
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        return f"URLError: {exc.reason}"
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def place_hint(init: CheckpointInit, target: Path) -> str:
    """The one instruction for a user without network: which file goes where, with its sha256."""
    return f"put the file from {init.url} (sha256 {init.sha256}; {init.source}, {init.licence}) at {target}"


def find_checkpoint(init: CheckpointInit, root: Path = PRETRAINED_ROOT) -> Path:
    """``root/init.file``, checked against the pinned sha256; never downloads.

    Raises:
        SourceError: the file is missing (the message says which file to put where, or to run
            ``dvc repro pretrained``) or has another sha256 (the message names it and both digests).
    """
    target = root / init.file
    if not target.is_file():
        raise SourceError(f"{target} is missing: run `dvc repro pretrained`, or {place_hint(init, target)}")
    actual = sha256_file(target)
    if actual != init.sha256:
        raise SourceError(f"{target} has sha256 {actual}, expected {init.sha256}: not the checkpoint "
                          f"params.yaml names; delete it to download it again, or {place_hint(init, target)}")
    return target


def fetch_checkpoint(init: CheckpointInit, root: Path = PRETRAINED_ROOT, *, opener: Opener | None = None,
                     retries: int = 3, backoff_seconds: float = 2.0,
                     sleep: Callable[[float], Any] = time.sleep) -> dict[str, Any]:
    """Make ``root/init.file`` hold exactly the pinned checkpoint; return what was done.

    The result has ``path``, ``status`` (``found``: it was already there and matches;
    ``downloaded``) and the init's fields. ``opener`` is the HTTP client boundary
    (``urllib.request.urlopen`` by default).

    Raises:
        SourceError: a file already at the target has another sha256 (the message names the
            file, both digests and what to do); or the download failed for good (one line with
            :func:`place_hint`).
    """
    target = root / init.file
    result = {"path": str(target), **init.as_dict()}
    if target.is_file():
        find_checkpoint(init, root)  # checked: a file with another sha256 is refused, never replaced
        return {**result, "status": "found"}
    partial = root / PARTIAL_DIR / f"{init.file}.part"
    partial.parent.mkdir(parents=True, exist_ok=True)
    open_url = opener or urllib.request.urlopen

    def attempt() -> None:
        start = partial.stat().st_size if partial.is_file() else 0
        headers = {"Range": f"bytes={start}-"} if start else {}
        request = urllib.request.Request(init.url, headers=headers)
        try:
            response_cm = open_url(request, timeout=_TIMEOUT_SECONDS)
        except urllib.error.HTTPError as err:
            if err.code == 416 and start:  # the part already holds every byte (or more): check it afresh
                partial.unlink()
            raise
        with response_cm as response:
            resumed = start and getattr(response, "status", 200) == 206
            with partial.open("ab" if resumed else "wb") as sink:  # a server ignoring Range resends it all
                while chunk := response.read(HASH_CHUNK):
                    sink.write(chunk)
        actual = sha256_file(partial)
        if actual != init.sha256:
            partial.unlink()
            raise _ChecksumMismatch(f"the downloaded bytes have sha256 {actual}, expected {init.sha256}")
        os.replace(partial, target)

    with_retries(attempt, what=f"downloading {target}", retries=retries, backoff_seconds=backoff_seconds,
                 sleep=sleep, is_transient=_is_transient, describe=_describe,
                 permanent_hint=lambda _exc: place_hint(init, target),
                 exhausted_hint=f"{place_hint(init, target)}, or rerun to resume the download")
    return {**result, "status": "downloaded"}


def load_published(name: str, scale: int, path: Path) -> Any:
    """MedSR's grey generator ``name`` at ``scale`` holding the published RGB checkpoint at ``path``.

    Raises:
        ValueError: ``name`` is not an architecture with published weights, or the file does not
            load strictly into it (another architecture, scale or variant).
    """
    import torch

    from medsr.models import model_spec
    from medsr.models.published import GreyPublishedGenerator

    generator_class = model_spec(name).generator
    if not issubclass(generator_class, GreyPublishedGenerator):
        raise ValueError(f"model {name!r} has no published-weights layout (medsr/models/published.py)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    return generator_class.from_published(state, scale)


def initial_state(model: str, scale: int, init_entry: Mapping[str, Any],
                  root: Path = PRETRAINED_ROOT) -> dict[str, Any]:
    """The grey generator's state dict to start training ``model`` x``scale`` from: the checkpoint
    that ``init_entry`` names, found in ``root`` and checked against its sha256 (never downloaded
    here: the ``pretrained`` stage does that, so training is offline and its input is declared).

    Raises:
        SourceError: the file is missing (the message says which file to put where, or to run
            ``dvc repro pretrained``) or has another sha256.
    """
    init = CheckpointInit.from_mapping(init_entry, f"train.models.{model} (x{scale}).init")
    return load_published(model, scale, find_checkpoint(init, root)).state_dict()


def checkpoint_inits(params: Mapping[str, Any]) -> list[tuple[str, int, CheckpointInit]]:
    """``(model, scale, init)`` for every model in ``train.models`` and scale in ``degrade.scales``
    whose resolved settings (the training config's precedence) name an ``init``."""
    from medsr.training.config import TrainConfig

    found = []
    for model in (params.get("train") or {}).get("models") or {}:
        for scale in params["degrade"]["scales"]:
            init = TrainConfig.from_params(dict(params), model, int(scale)).init
            if init is not None:
                found.append((model, int(scale), CheckpointInit.from_mapping(
                    init, f"train.models.{model} (x{scale}).init")))
    return found


def pretrained_stage(params: Mapping[str, Any], root: Path = PRETRAINED_ROOT, *,
                     opener: Opener | None = None) -> dict[str, Any]:
    """DVC stage ``pretrained``: fetch or find every checkpoint ``train.models`` names.

    With none named (the default) it only makes ``root`` exist, so the stage's output is there.
    Retries follow ``data.download`` (the data downloads' settings).
    """
    download = (params.get("data") or {}).get("download") or {}
    root.mkdir(parents=True, exist_ok=True)
    fetched = [{"model": model, "scale": scale,
                **fetch_checkpoint(init, root, opener=opener, retries=int(download.get("retries", 3)),
                                   backoff_seconds=float(download.get("backoff_seconds", 2.0)))}
               for model, scale, init in checkpoint_inits(params)]
    return {"checkpoints": fetched}


def enable_commented_entry(text: str, model: str = "rlfn") -> str:
    """``params.yaml`` text with its commented-out ``# <model>:`` entry under ``train.models``
    switched on (the documented one switch; comments elsewhere and the layout are kept). Text
    where the entry is already on comes back unchanged.

    Raises:
        ValueError: the text has neither the commented entry nor an enabled one.
    """
    lines, out, inside, found = text.splitlines(), [], False, False
    for line in lines:
        if line.strip() == f"# {model}:":
            inside = found = True
        if inside and line.startswith("    # "):
            out.append("    " + line[len("    # "):])
            continue
        inside = False
        out.append(line)
    if not found:
        if re.search(rf"^    {re.escape(model)}:", text, flags=re.MULTILINE):
            return text
        raise ValueError(f"params.yaml has no commented-out `# {model}:` entry under train.models to switch on; "
                         "copy it from the repository's params.yaml")
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")
