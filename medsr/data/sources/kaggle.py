"""Kaggle source: fetch only the image files params.yaml asks for, resumably and verified.

Rather than pulling a whole archive (NIH Chest X-ray is 42 GB), the dataset's file listing is
read, filtered (image suffixes, the ``include`` substring), sorted by name and cut to
``max_images``; each chosen file is then downloaded on its own with
``KaggleApi.dataset_download_file``.

Guarantees
----------
* Resumable: ``dest/.medsr-manifest.json`` records every completed file (relative path, size,
  sha256). A rerun re-hashes what is on disk, skips what still matches and fetches the rest.
  Each run writes the manifest once as a new file (one JSON line), appends one line per completed
  file and rewrites it whole once at the end: the cost per file does not grow with the count
  (rewriting it after every file was quadratic: ~1.4 TB of JSON at NIH's 112,120 files), and the
  append goes to this run's own inode, never to one DVC's hard-linked cache shares.
  When the manifest already covers the same request and every file matches, nothing on the
  network is touched (no listing, no credentials needed), so a finished download reruns
  offline.
* Atomic: each attempt downloads into its own folder under ``dest/.medsr-partial`` and the
  verified file is moved onto its final name with ``os.replace``; a crash or a failed attempt
  never leaves a half-written file under a final name.
* Verified: the size is checked against the listing (the Kaggle listing carries
  ``total_bytes`` but no checksum); zipped deliveries are also checked by the zip's CRC-32.
  A mismatch is retried like a transient error.
* Retried: connection errors, timeouts, HTTP 408/425/429/5xx and integrity mismatches are retried
  ``retries`` times with ``backoff_seconds * 2**attempt``; HTTP 401/403/404 and anything else
  fail at once.

kaggle 2.2.4 traps handled here: ``import kaggle`` authenticates at import and prints an
18-line help text on failure, and ``authenticate()`` then calls ``exit(1)``; so credentials
are checked first, the package is imported inside :func:`download_kaggle`, its stdout is
swallowed and ``SystemExit`` is caught. ``dataset_download_file`` writes to
``path/<basename of the download URL>`` (directories dropped, sometimes ``<name>.zip``),
which is why every attempt gets a fresh, empty folder.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, TypeVar

from tqdm import tqdm

from medsr.atomic import write_text
from medsr.data.sources.errors import SourceError
from medsr.data.sources.transfer import HASH_CHUNK, sha256_file, with_retries

__all__ = [
    "CredentialsMissing",
    "DownloadReport",
    "IMAGE_SUFFIXES",
    "KaggleClient",
    "MANIFEST_NAME",
    "PATIENTS_NAME",
    "SourceError",
    "download_kaggle",
    "kaggle_credentials_present",
]

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".dcm", ".nii", ".nii.gz", ".tif", ".tiff")
MANIFEST_NAME = ".medsr-manifest.json"
PATIENTS_NAME = "patients.csv"
STAGING_NAME = ".medsr-partial"
NIH_PREFIX = "nih-chest-xrays/"
NIH_SAMPLE_LABELS = "sample_labels.csv"
NIH_FULL_LABELS = "Data_Entry_2017.csv"
NIH_IMAGE_COLUMN = "Image Index"
NIH_PATIENT_COLUMN = "Patient ID"
LISTING_PAGE_SIZE = 200
MANIFEST_VERSION = 1

_TRANSIENT_HTTP_STATUSES = frozenset({408, 425, 429})
_ZIP_MAGIC = b"PK\x03\x04"

_T = TypeVar("_T")


class CredentialsMissing(SourceError):
    """No Kaggle credentials were found in the environment or the Kaggle config files."""


class _IntegrityError(Exception):
    """A delivered file does not match the listing (truncated, corrupt, missing): retry it."""


class KaggleClient(Protocol):
    """The part of ``kaggle.api.kaggle_api_extended.KaggleApi`` (2.2.x) this module uses.

    ``dataset_list_files`` returns a page object with ``files`` (items carrying ``name`` and
    ``total_bytes``), ``next_page_token`` ("" on the last page) and ``error_message``.
    ``dataset_download_file`` writes the file (or ``<name>.zip``) into the folder ``path``.
    """

    def authenticate(self) -> None: ...

    def dataset_list_files(self, dataset: str, page_token: str | None = None, page_size: int = 20) -> Any: ...

    def dataset_download_file(
        self, dataset: str, file_name: str, path: str | None = None, force: bool = False, quiet: bool = True
    ) -> Any: ...


@dataclass
class DownloadReport:
    """What one :func:`download_kaggle` call left in ``dest``.

    ``files`` lists every file the source keeps there, relative to ``dest`` in POSIX form:
    the chosen images in name order, then (NIH only) the label CSV. ``patients.csv`` and the
    manifest are derived files and not listed. ``bytes`` counts what this call downloaded.
    """

    files: list[str] = field(default_factory=list)
    downloaded: int = 0
    skipped: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class _RemoteFile:
    """One entry of the dataset listing."""

    name: str  # path inside the dataset, as listed (POSIX separators)
    size: int  # bytes per the listing; 0 when the listing does not say


# ---------------------------------------------------------------------------------------------
# Credentials


def kaggle_credentials_present(env: Mapping[str, str] | None = None, home: Path | None = None) -> bool:
    """Whether the kaggle package would find credentials, checked without importing it.

    Mirrors kaggle 2.2.4's own lookup: an API token (``KAGGLE_API_TOKEN``, or
    ``~/.kaggle/access_token``), a legacy key (``KAGGLE_USERNAME`` + ``KAGGLE_KEY``, or
    ``kaggle.json`` in ``KAGGLE_CONFIG_DIR``, else ``~/.kaggle``, else
    ``$XDG_CONFIG_HOME/kaggle``; file and variables may each supply one half), or an OAuth
    login (``~/.kaggle/credentials.json`` from ``kaggle auth login``).
    """
    env = os.environ if env is None else env
    if home is None:
        home = Path(env["HOME"]) if env.get("HOME") else Path.home()

    token = env.get("KAGGLE_API_TOKEN", "").strip()
    if token:
        # kaggle accepts the variable as the token itself or as the path of a token file.
        token_path = Path(token)
        with contextlib.suppress(OSError, ValueError):
            if token_path.is_file():
                return bool(token_path.read_text(encoding="utf-8").strip())
        return True

    # The token file is looked up in ~/.kaggle whatever KAGGLE_CONFIG_DIR says (kagglesdk).
    for token_name in ("access_token", "access_token.txt"):
        if _read_stripped(home / ".kaggle" / token_name):
            return True

    legacy_config = _read_json_object(_kaggle_config_dir(env, home) / "kaggle.json")
    if env.get("KAGGLE_USERNAME"):
        legacy_config["username"] = env["KAGGLE_USERNAME"]
    if env.get("KAGGLE_KEY"):
        legacy_config["key"] = env["KAGGLE_KEY"]
    if legacy_config.get("username") and legacy_config.get("key"):
        return True

    return bool(_read_json_object(home / ".kaggle" / "credentials.json").get("refresh_token"))


def _kaggle_config_dir(env: Mapping[str, str], home: Path) -> Path:
    """The folder where kaggle 2.2.4 looks for ``kaggle.json``."""
    if env.get("KAGGLE_CONFIG_DIR"):
        return Path(env["KAGGLE_CONFIG_DIR"])
    legacy_dir = home / ".kaggle"
    if legacy_dir.exists():
        return legacy_dir
    xdg_config_home = Path(env["XDG_CONFIG_HOME"]) if env.get("XDG_CONFIG_HOME") else home / ".config"
    return xdg_config_home / "kaggle"


def _read_stripped(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return payload if isinstance(payload, dict) else {}


def _credentials_missing_message(dataset: str) -> str:
    return (
        f"Kaggle credentials not found (needed for dataset {dataset!r}): set KAGGLE_API_TOKEN "
        "or save the token to ~/.kaggle/access_token, or set KAGGLE_USERNAME and KAGGLE_KEY "
        "or put them in ~/.kaggle/kaggle.json (or in $KAGGLE_CONFIG_DIR/kaggle.json); "
        "or set data.sources.<modality>.kind to sample in params.yaml to use the embedded sample data"
    )


class _QuietKaggleApi:
    """Forwards to a real ``KaggleApi`` with its stdout swallowed.

    KaggleApi prints the auth help text and a "Dataset URL: ..." line for every single-file
    download; that would bury the progress bar and the one-line errors.
    """

    def __init__(self, api: Any) -> None:
        self._api = api

    def authenticate(self) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            self._api.authenticate()

    def dataset_list_files(self, dataset: str, page_token: str | None = None, page_size: int = 20) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self._api.dataset_list_files(dataset, page_token=page_token, page_size=page_size)

    def dataset_download_file(
        self, dataset: str, file_name: str, path: str | None = None, force: bool = False, quiet: bool = True
    ) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            return self._api.dataset_download_file(dataset, file_name, path=path, force=force, quiet=quiet)


def _open_kaggle_client(dataset: str) -> KaggleClient:
    """Build the real client, after making sure credentials exist (see the module docstring)."""
    if not kaggle_credentials_present():
        raise CredentialsMissing(_credentials_missing_message(dataset))
    try:
        # Importing any kaggle submodule runs kaggle/__init__.py, which authenticates.
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi

            api = KaggleApi()
    except (Exception, SystemExit) as exc:
        raise SourceError(
            f"cannot load the kaggle package for dataset {dataset!r} ({_describe(exc)}): "
            "install the project requirements (kaggle==2.2.4)"
        ) from exc
    return _QuietKaggleApi(api)


# ---------------------------------------------------------------------------------------------
# Retries and error classification


def _http_status(exc: BaseException) -> int | None:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return status if isinstance(status, int) else None


def _is_transient(exc: BaseException) -> bool:
    """Whether retrying ``exc`` may help (network trouble, throttling, server errors, corruption)."""
    if isinstance(exc, _IntegrityError):
        return True
    status = _http_status(exc)
    if status is not None:
        return status in _TRANSIENT_HTTP_STATUSES or 500 <= status < 600
    if isinstance(exc, SystemExit):
        return False
    # Local file-system problems will not go away by waiting.
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return False
    # requests' and the builtin connection/timeout errors all derive from OSError.
    if isinstance(exc, OSError):
        return True
    # urllib3 protocol errors (e.g. a connection reset mid-body) do not derive from OSError.
    if type(exc).__module__.startswith("urllib3"):
        return True
    # KaggleApi.download_file raises a bare ValueError when the body is shorter than announced.
    return isinstance(exc, ValueError) and "does not match expected size" in str(exc)


_URL_PATTERN = re.compile(r"https?://\S+")


def _describe(exc: BaseException) -> str:
    """A short one-line description of ``exc`` without URLs (signed download URLs carry tokens)."""
    status = _http_status(exc)
    if status is not None:
        return f"HTTP {status}"
    if isinstance(exc, SystemExit):
        return f"the kaggle client exited with code {exc.code}"
    text = " ".join(_URL_PATTERN.sub("<url>", str(exc)).split())
    if len(text) > 200:
        text = text[:197] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _permanent_hint(exc: BaseException) -> str:
    status = _http_status(exc)
    if status in (401, 403):
        return (
            "check the Kaggle credentials and that the dataset's rules were accepted on kaggle.com, "
            "or set data.sources.<modality>.kind to sample in params.yaml"
        )
    if status == 404:
        return "check data.sources.<modality>.kaggle.dataset (owner/slug) in params.yaml"
    return "see the error above; set data.sources.<modality>.kind to sample in params.yaml to work offline"


def _with_retries(
    action: Callable[[], _T], *, what: str, retries: int, backoff_seconds: float, sleep: Callable[[float], Any]
) -> _T:
    """Run ``action``; retry transient failures with exponential backoff, else raise SourceError."""
    return with_retries(action, what=what, retries=retries, backoff_seconds=backoff_seconds, sleep=sleep,
                        is_transient=_is_transient, describe=_describe, permanent_hint=_permanent_hint,
                        exhausted_hint="check the network, then rerun to resume (completed files are kept)")


# ---------------------------------------------------------------------------------------------
# Listing and selection


def _list_remote_files(
    client: KaggleClient, dataset: str, *, retries: int, backoff_seconds: float, sleep: Callable[[float], Any]
) -> list[_RemoteFile]:
    """Every file of the dataset listing, following page tokens."""
    remote_files: list[_RemoteFile] = []
    page_token: str | None = None
    seen_tokens: set[str] = set()
    while True:
        token = page_token
        page = _with_retries(
            lambda: client.dataset_list_files(dataset, page_token=token, page_size=LISTING_PAGE_SIZE),
            what=f"listing the files of Kaggle dataset {dataset!r}",
            retries=retries,
            backoff_seconds=backoff_seconds,
            sleep=sleep,
        )
        error_message = str(_first_attribute(page, ("error_message", "errorMessage"), "") or "")
        if error_message:
            raise SourceError(
                f"Kaggle refused to list dataset {dataset!r} ({' '.join(error_message.split())}): "
                "check data.sources.<modality>.kaggle.dataset in params.yaml"
            )
        entries = list(_first_attribute(page, ("files", "dataset_files", "datasetFiles"), None) or [])
        for entry in entries:
            name = _first_attribute(entry, ("name",), None)
            if not name:
                continue
            size = _first_attribute(entry, ("total_bytes", "totalBytes", "size"), 0)
            remote_files.append(_RemoteFile(name=str(name), size=int(size or 0)))
        next_token = str(_first_attribute(page, ("next_page_token", "nextPageToken"), "") or "")
        # An empty page or a repeated token would otherwise loop forever (a known listing bug).
        if not next_token or not entries or next_token in seen_tokens:
            return remote_files
        seen_tokens.add(next_token)
        page_token = next_token


def _first_attribute(obj: Any, names: Iterable[str], default: Any) -> Any:
    for name in names:
        value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
        if value is not None:
            return value
    return default


def _is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_SUFFIXES)


def _select_images(remote_files: list[_RemoteFile], *, max_images: int, include: str | None) -> list[_RemoteFile]:
    chosen = [
        remote for remote in remote_files if _is_image_name(remote.name) and (not include or include in remote.name)
    ]
    chosen.sort(key=lambda remote: remote.name)
    return chosen[:max_images]


def _is_nih(dataset: str) -> bool:
    return dataset.startswith(NIH_PREFIX)


def _select_nih_labels(dataset: str, remote_files: list[_RemoteFile]) -> _RemoteFile:
    """The NIH label CSV: sample_labels.csv for the sample, Data_Entry_2017.csv for the full set."""
    slug = dataset.split("/")[1]
    preferred = (NIH_SAMPLE_LABELS, NIH_FULL_LABELS) if slug == "sample" else (NIH_FULL_LABELS, NIH_SAMPLE_LABELS)
    for label_name in preferred:
        # The shallowest copy wins where a dataset carries the CSV twice.
        candidates = sorted(
            (remote for remote in remote_files if PurePosixPath(remote.name).name == label_name),
            key=lambda remote: (remote.name.count("/"), remote.name),
        )
        if candidates:
            return candidates[0]
    raise SourceError(
        f"Kaggle dataset {dataset!r} lists no {preferred[0]}, needed to split by patient: "
        "use nih-chest-xrays/sample or nih-chest-xrays/data in data.sources.xray.kaggle.dataset"
    )


def _relative_target(dataset: str, name: str) -> str:
    """The listing name as a safe path relative to ``dest`` (no absolute paths, no ``..``)."""
    path = PurePosixPath(name.replace("\\", "/"))
    parts = path.parts
    if (
        not parts
        or path.is_absolute()
        or any(part in ("", ".", "..") for part in parts)
        or parts[0] == STAGING_NAME
        or path.as_posix() in (MANIFEST_NAME, PATIENTS_NAME)
    ):
        raise SourceError(f"Kaggle dataset {dataset!r} lists an unsafe file name {name!r}: refusing to write it")
    return path.as_posix()


# ---------------------------------------------------------------------------------------------
# Manifest


def _load_manifest(dest: Path) -> dict[str, Any]:
    """The manifest as one object: its first JSON line, then the records appended after it."""
    try:
        lines = (dest / MANIFEST_NAME).read_text(encoding="utf-8").splitlines()
    except OSError:
        lines = []
    try:
        manifest = json.loads("\n".join(lines))  # a whole document (a finished run, or version 1's indented one)
    except ValueError:
        manifest = _journaled_manifest(lines)
    manifest = manifest if isinstance(manifest, dict) else {}
    files = manifest.get("files")
    if manifest.get("version") != MANIFEST_VERSION or not isinstance(files, dict):
        return {"version": MANIFEST_VERSION, "files": {}}
    return manifest


def _journaled_manifest(lines: list[str]) -> dict[str, Any]:
    """A manifest whose run appended ``{"file", "record"}`` lines after its first line."""
    try:
        manifest = json.loads(lines[0]) if lines else {}
    except ValueError:
        return {}
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        return {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
        except ValueError:
            break  # the line a crash cut short: the files recorded before it stand, the rest are re-hashed
        if isinstance(entry, dict) and isinstance(entry.get("file"), str):
            files[entry["file"]] = entry.get("record")
    return manifest


def _write_manifest(dest: Path, manifest: dict[str, Any]) -> None:
    """The whole manifest as one JSON line, under a new inode (written aside and moved)."""
    write_text(dest / MANIFEST_NAME, json.dumps(manifest, sort_keys=True) + "\n")


def _matches_record(dest: Path, relative: str, record: Any) -> bool:
    """Whether ``dest/relative`` still holds exactly the bytes the manifest recorded."""
    if not isinstance(record, dict):
        return False
    path = dest / relative
    try:
        if not path.is_file() or path.stat().st_size != record.get("size"):
            return False
        return sha256_file(path) == record.get("sha256")
    except OSError:
        return False


def _request_key(dataset: str, max_images: int, include: str | None) -> dict[str, Any]:
    return {"dataset": dataset, "max_images": max_images, "include": include}


# ---------------------------------------------------------------------------------------------
# One file


def _fetch_file(client: KaggleClient, dataset: str, remote: _RemoteFile, dest: Path, staging: Path) -> dict[str, Any]:
    """Download one file into a fresh staging folder, verify it, move it into place.

    Returns the manifest record. Raises _IntegrityError for a bad delivery; whatever happens,
    the staging folder is removed and the final name is either untouched or complete.
    """
    relative = _relative_target(dataset, remote.name)
    staging.mkdir(parents=True, exist_ok=True)
    attempt_dir = Path(tempfile.mkdtemp(prefix="attempt-", dir=staging))
    try:
        client.dataset_download_file(dataset, remote.name, path=str(attempt_dir), force=True, quiet=True)
        delivered = _delivered_file(attempt_dir, remote)
        payload, archive_size = _unzip_if_zipped(delivered, remote, attempt_dir)
        size = payload.stat().st_size
        # Kaggle lists a zipped file's own size; accept the archive's size as well, since the
        # zip's CRC-32 has already vouched for the extracted bytes.
        if remote.size and remote.size not in (size, archive_size):
            raise _IntegrityError(f"{remote.name}: got {size} bytes, the listing says {remote.size}")
        record = {"size": size, "sha256": sha256_file(payload), "listed_size": remote.size}
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(payload, target)
        return record
    finally:
        shutil.rmtree(attempt_dir, ignore_errors=True)


def _delivered_file(attempt_dir: Path, remote: _RemoteFile) -> Path:
    """The one file the client wrote into ``attempt_dir`` (its name follows the download URL)."""
    # KaggleApi keeps a "<file>.kaggle-partial" resume marker beside unfinished downloads.
    delivered = [
        path for path in attempt_dir.rglob("*") if path.is_file() and not path.name.endswith(".kaggle-partial")
    ]
    if len(delivered) == 1:
        return delivered[0]
    basename = PurePosixPath(remote.name).name
    for wanted in (basename, f"{basename}.zip"):
        for path in delivered:
            if path.name == wanted:
                return path
    if not delivered:
        raise _IntegrityError(f"{remote.name}: the download finished but delivered no file")
    raise _IntegrityError(f"{remote.name}: the download delivered {len(delivered)} files, expected one")


def _unzip_if_zipped(delivered: Path, remote: _RemoteFile, attempt_dir: Path) -> tuple[Path, int | None]:
    """Return (path of the payload, size of the zip it came from or None if not zipped)."""
    if remote.name.lower().endswith(".zip"):
        return delivered, None
    with delivered.open("rb") as stream:
        starts_like_zip = stream.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC
    # Kaggle wraps large files as "<name>.zip"; some arrive zipped under their plain name.
    if not (delivered.name.lower().endswith(".zip") or starts_like_zip):
        return delivered, None
    archive_size = delivered.stat().st_size
    basename = PurePosixPath(remote.name).name
    extracted = attempt_dir / f".extracted-{basename}"
    try:
        with zipfile.ZipFile(delivered) as archive:
            members = [info for info in archive.infolist() if not info.is_dir()]
            named = [info for info in members if PurePosixPath(info.filename).name == basename]
            if named:
                member = named[0]
            elif len(members) == 1:
                member = members[0]
            else:
                raise _IntegrityError(f"{remote.name}: the zip delivered holds no file of that name")
            # Stream rather than extractall: no path traversal from member names, and the
            # CRC-32 is checked as the last bytes are read.
            limit = remote.size + 1 if remote.size else None
            with archive.open(member) as source, extracted.open("wb") as sink:
                _copy_limited(source, sink, limit)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise _IntegrityError(f"{remote.name}: the zip delivered is corrupt ({exc})") from exc
    delivered.unlink()
    return extracted, archive_size


def _copy_limited(source: BinaryIO, sink: BinaryIO, limit: int | None) -> None:
    """Copy ``source`` to ``sink``; stop past ``limit`` bytes so a zip bomb cannot fill the disk."""
    copied = 0
    while True:
        chunk = source.read(HASH_CHUNK)
        if not chunk:
            return
        sink.write(chunk)
        copied += len(chunk)
        if limit is not None and copied >= limit:
            return


# ---------------------------------------------------------------------------------------------
# NIH patients table


def _write_nih_patients(dest: Path, labels_relative: str, image_relatives: list[str], dataset: str) -> None:
    """Write ``dest/patients.csv`` (``path,patient_id``) from the NIH label CSV."""
    labels_path = dest / labels_relative
    patient_by_image: dict[str, str] = {}
    with labels_path.open(newline="", encoding="utf-8-sig") as stream:
        reader = csv.DictReader(stream)
        columns = {name.strip(): name for name in reader.fieldnames or []}
        if NIH_IMAGE_COLUMN not in columns or NIH_PATIENT_COLUMN not in columns:
            raise SourceError(
                f"{labels_relative} of Kaggle dataset {dataset!r} lacks the columns "
                f"{NIH_IMAGE_COLUMN!r} and {NIH_PATIENT_COLUMN!r}: delete {dest} and download again"
            )
        image_column, patient_column = columns[NIH_IMAGE_COLUMN], columns[NIH_PATIENT_COLUMN]
        for row in reader:
            image_name = (row.get(image_column) or "").strip()
            patient_id = (row.get(patient_column) or "").strip()
            if image_name and patient_id:
                patient_by_image[image_name] = patient_id

    output = io.StringIO()
    writer = csv.writer(output, lineterminator="\n")
    writer.writerow(["path", "patient_id"])
    for image_relative in sorted(image_relatives):
        image_name = PurePosixPath(image_relative).name
        if image_name not in patient_by_image:
            raise SourceError(
                f"{image_relative} has no row in {labels_relative} of Kaggle dataset {dataset!r}, so it "
                f"cannot be split by patient: delete {dest} and download again"
            )
        writer.writerow([image_relative, patient_by_image[image_name]])
    write_text(dest / PATIENTS_NAME, output.getvalue())


# ---------------------------------------------------------------------------------------------
# Entry point


def download_kaggle(
    dataset: str,
    dest: Path,
    *,
    max_images: int,
    include: str | None = None,
    retries: int = 3,
    backoff_seconds: float = 2.0,
    client: KaggleClient | None = None,
    sleep: Callable[[float], Any] = time.sleep,
) -> DownloadReport:
    """Fetch the first ``max_images`` image files (by name) of a Kaggle dataset into ``dest``.

    Only image files (``IMAGE_SUFFIXES``) whose listed name contains ``include`` are chosen;
    they keep their dataset-relative paths under ``dest``. For NIH Chest X-ray
    (``nih-chest-xrays/...``) the label CSV is fetched too and ``dest/patients.csv``
    (``path,patient_id``) is written so the split can be done by patient. Files left over
    from an earlier, different request (listed in the manifest only) are removed.

    ``client`` defaults to a real, authenticated ``KaggleApi``; ``sleep`` is injectable so
    the retry backoff can be tested without waiting. Raises :class:`CredentialsMissing` or
    :class:`SourceError` with a one-line message.
    """
    if not re.fullmatch(r"[^/\s]+/[^/\s]+(/\d+)?", dataset):
        raise SourceError(
            f"Kaggle dataset {dataset!r} is not 'owner/slug' (optionally '/version'): "
            "fix data.sources.<modality>.kaggle.dataset in params.yaml"
        )
    if max_images < 1:
        raise SourceError(f"max_images for Kaggle dataset {dataset!r} is {max_images}: set it to 1 or more")
    if retries < 0 or backoff_seconds < 0:
        raise SourceError("data.download.retries and data.download.backoff_seconds must not be negative")

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = dest / STAGING_NAME
    shutil.rmtree(staging, ignore_errors=True)  # leftovers of a crashed run are never complete

    manifest = _load_manifest(dest)
    request = _request_key(dataset, max_images, include)
    finished = _finished_report(dest, manifest, request, dataset)
    if finished is not None:
        log.info("Kaggle dataset %s: all %d files already present and verified", dataset, len(finished.files))
        return finished

    if client is None:
        client = _open_kaggle_client(dataset)
    retry_options = {"retries": retries, "backoff_seconds": backoff_seconds, "sleep": sleep}
    _with_retries(client.authenticate, what=f"authenticating with Kaggle for dataset {dataset!r}", **retry_options)

    remote_files = _list_remote_files(client, dataset, **retry_options)
    chosen = _select_images(remote_files, max_images=max_images, include=include)
    if not chosen:
        raise SourceError(
            f"Kaggle dataset {dataset!r} lists no image file{f' containing {include!r}' if include else ''}: "
            "fix data.sources.<modality>.kaggle.include or dataset in params.yaml"
        )
    labels = _select_nih_labels(dataset, remote_files) if _is_nih(dataset) else None
    wanted = chosen + ([labels] if labels else [])
    relatives = [_relative_target(dataset, remote.name) for remote in wanted]

    records: dict[str, Any] = dict(manifest["files"])
    _remove_stale_files(dest, records, keep=set(relatives))
    earlier_request = manifest.get("request")
    if labels is None and isinstance(earlier_request, dict) and _is_nih(str(earlier_request.get("dataset", ""))):
        # The patients.csv an earlier NIH request wrote would describe files no longer here.
        (dest / PATIENTS_NAME).unlink(missing_ok=True)
    manifest = {
        "version": MANIFEST_VERSION,
        "request": request,
        "complete": False,
        "order": relatives,
        "files": records,
    }
    _write_manifest(dest, manifest)

    report = DownloadReport(files=relatives)
    try:
        with (dest / MANIFEST_NAME).open("a", encoding="utf-8") as journal, \
                tqdm(total=len(wanted), desc=f"kaggle {dataset}", unit="file", disable=len(wanted) < 2) as progress:
            for remote, relative in zip(wanted, relatives, strict=True):
                record = records.get(relative)
                remote_unchanged = (
                    isinstance(record, dict) and (not remote.size or record.get("listed_size") == remote.size)
                )
                if remote_unchanged and _matches_record(dest, relative, record):
                    report.skipped += 1
                else:
                    records.pop(relative, None)
                    record = _with_retries(
                        lambda remote=remote: _fetch_file(client, dataset, remote, dest, staging),
                        what=f"downloading {remote.name} from Kaggle dataset {dataset!r}",
                        **retry_options,
                    )
                    records[relative] = record
                    # Record progress file by file so an interrupted run resumes where it stopped:
                    # one appended line, flushed, whatever the number of files before it.
                    journal.write(json.dumps({"file": relative, "record": record}, sort_keys=True) + "\n")
                    journal.flush()
                    report.downloaded += 1
                    report.bytes += int(record["size"])
                progress.update(1)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    if labels is not None:
        _write_nih_patients(dest, relatives[-1], relatives[:-1], dataset)
    manifest["complete"] = True
    _write_manifest(dest, manifest)
    log.info(
        "Kaggle dataset %s: %d files (%d downloaded, %d already present, %d bytes fetched)",
        dataset,
        len(report.files),
        report.downloaded,
        report.skipped,
        report.bytes,
    )
    return report


def _finished_report(
    dest: Path, manifest: dict[str, Any], request: dict[str, Any], dataset: str
) -> DownloadReport | None:
    """A report for a completed earlier run of the same request whose files all still match."""
    order = manifest.get("order")
    if not (manifest.get("complete") and manifest.get("request") == request and isinstance(order, list) and order):
        return None
    if _is_nih(dataset) and not (dest / PATIENTS_NAME).is_file():
        return None
    records = manifest["files"]
    for relative in order:
        if not (isinstance(relative, str) and _matches_record(dest, relative, records.get(relative))):
            return None
    return DownloadReport(files=list(order), downloaded=0, skipped=len(order), bytes=0)


def _remove_stale_files(dest: Path, records: dict[str, Any], keep: set[str]) -> None:
    """Delete files an earlier request fetched that this one does not ask for.

    Only paths recorded in the manifest are touched, so nothing the user put in ``dest`` is lost.
    """
    for relative in [relative for relative in records if relative not in keep]:
        records.pop(relative)
        # A hand-edited manifest must not make us delete anything outside dest.
        path = PurePosixPath(relative)
        if path.is_absolute() or ".." in path.parts or not path.parts:
            continue
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            (dest / relative).unlink()
