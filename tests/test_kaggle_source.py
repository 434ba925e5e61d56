"""Kaggle source: selection, resume, verification and retries against a fake client (no network)."""

from __future__ import annotations

import csv
import io
import json
import sys
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from medsr.data.sources.errors import SourceError
from medsr.data.sources.kaggle import (
    MANIFEST_NAME,
    PATIENTS_NAME,
    CredentialsMissing,
    DownloadReport,
    download_kaggle,
    kaggle_credentials_present,
)

DATASET = "someone/ct-scans"
NIH_SAMPLE = "nih-chest-xrays/sample"


def http_error(status: int) -> requests.HTTPError:
    """A requests HTTPError as kagglesdk raises it (raise_for_status keeps the response)."""
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status} error for url: https://storage.example/x?token=secret", response=response)


class FakeKaggle:
    """Implements the KaggleClient protocol from a dict of name -> bytes.

    Like KaggleApi 2.2.4, it lists in pages (here deliberately small and unsorted) and writes
    a download to ``path/<basename>`` or, for names in ``zipped``, ``path/<basename>.zip``.
    """

    def __init__(self, files: dict[str, bytes], *, zipped: set[str] | None = None, page_cap: int = 2) -> None:
        self.files = dict(files)
        self.zipped = zipped or set()
        self.page_cap = page_cap
        self.failures: dict[str, list[BaseException]] = {}
        self.always_fail: dict[str, BaseException] = {}
        self.corrupt_deliveries: dict[str, int] = {}  # name -> how many corrupt deliveries; -1 = always
        self.downloads: list[str] = []
        self.list_calls = 0
        self.auth_calls = 0

    def authenticate(self) -> None:
        self.auth_calls += 1

    def dataset_list_files(self, dataset: str, page_token: str | None = None, page_size: int = 20) -> SimpleNamespace:
        self.list_calls += 1
        names = sorted(self.files, reverse=True)  # the client must not rely on listing order
        start = int(page_token or 0)
        chunk = names[start : start + min(page_size, self.page_cap)]
        following = start + len(chunk)
        return SimpleNamespace(
            files=[SimpleNamespace(name=name, total_bytes=len(self.files[name]), creation_date=None) for name in chunk],
            next_page_token=str(following) if following < len(names) else "",
            error_message="",
        )

    def dataset_download_file(
        self, dataset: str, file_name: str, path: str | None = None, force: bool = False, quiet: bool = True
    ) -> bool:
        self.downloads.append(file_name)
        assert path is not None and force and quiet
        data = self.files[file_name]
        out = Path(path) / Path(file_name).name
        if file_name in self.always_fail:
            out.write_bytes(data[: len(data) // 2])  # a dropped connection leaves a partial file
            raise self.always_fail[file_name]
        queued = self.failures.get(file_name)
        if queued:
            out.write_bytes(data[: len(data) // 2])
            raise queued.pop(0)
        remaining_corrupt = self.corrupt_deliveries.get(file_name, 0)
        if remaining_corrupt:
            self.corrupt_deliveries[file_name] = remaining_corrupt - 1 if remaining_corrupt > 0 else -1
            data = data[:-3]  # truncated body: the size no longer matches the listing
        if file_name in self.zipped:
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
                archive.writestr(Path(file_name).name, data)
            out.with_name(out.name + ".zip").write_bytes(buffer.getvalue())
        else:
            out.write_bytes(data)
        return True


def ct_files() -> dict[str, bytes]:
    return {
        "ct_scans/c.nii": b"volume-c" * 50,
        "ct_scans/a.nii": b"volume-a" * 40,
        "ct_scans/b.nii.gz": b"\x1f\x8bvolume-b" * 30,
        "ct_scans/notes.txt": b"not an image",
        "masks/a.nii": b"mask-a" * 20,
    }


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def run(client: FakeKaggle, dest: Path, sleeps: list[float] | None = None, **options) -> DownloadReport:
    options.setdefault("max_images", 10)
    options.setdefault("include", "ct_scans/")
    options.setdefault("backoff_seconds", 0.5)
    sleeps = [] if sleeps is None else sleeps
    return download_kaggle(options.pop("dataset", DATASET), dest, client=client, sleep=sleeps.append, **options)


# --- credentials ------------------------------------------------------------------------------


def test_no_credentials_anywhere(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    assert not kaggle_credentials_present(env={}, home=home)
    # Half a legacy key, an empty token file and a blank token are not credentials.
    (home / ".kaggle").mkdir()
    (home / ".kaggle" / "access_token").write_text("  \n")
    (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "someone"}))
    assert not kaggle_credentials_present(env={"KAGGLE_API_TOKEN": " ", "KAGGLE_KEY": ""}, home=home)


@pytest.mark.parametrize(
    "how",
    ["env_token", "token_file", "env_legacy_key", "kaggle_json", "kaggle_json_in_config_dir", "split_file_and_env"],
)
def test_credentials_present_each_way(tmp_path: Path, how: str) -> None:
    home = tmp_path / "home"
    (home / ".kaggle").mkdir(parents=True)
    env: dict[str, str] = {}
    if how == "env_token":
        env["KAGGLE_API_TOKEN"] = "KGAT_example"
    elif how == "token_file":
        (home / ".kaggle" / "access_token").write_text("KGAT_example\n")
    elif how == "env_legacy_key":
        env.update(KAGGLE_USERNAME="someone", KAGGLE_KEY="0123abcd")
    elif how == "kaggle_json":
        (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "someone", "key": "0123abcd"}))
    elif how == "kaggle_json_in_config_dir":
        config_dir = tmp_path / "elsewhere"
        config_dir.mkdir()
        (config_dir / "kaggle.json").write_text(json.dumps({"username": "someone", "key": "0123abcd"}))
        env["KAGGLE_CONFIG_DIR"] = str(config_dir)
        # Without the variable the file is not found: the check really follows KAGGLE_CONFIG_DIR.
        assert not kaggle_credentials_present(env={}, home=home)
    elif how == "split_file_and_env":
        (home / ".kaggle" / "kaggle.json").write_text(json.dumps({"username": "someone"}))
        env["KAGGLE_KEY"] = "0123abcd"
    assert kaggle_credentials_present(env=env, home=home)


def test_kaggle_json_in_xdg_config_when_no_dot_kaggle(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".config" / "kaggle").mkdir(parents=True)
    (home / ".config" / "kaggle" / "kaggle.json").write_text(json.dumps({"username": "u", "key": "k"}))
    assert kaggle_credentials_present(env={}, home=home)


def _clear_kaggle_env(monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    for name in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_CONFIG_DIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))


def test_missing_credentials_raise_one_line_without_importing_kaggle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _clear_kaggle_env(monkeypatch, home)
    # Any attempt to import kaggle now fails with ImportError, which would surface as a
    # plain SourceError instead of CredentialsMissing.
    monkeypatch.setitem(sys.modules, "kaggle", None)
    with pytest.raises(CredentialsMissing) as caught:
        download_kaggle(DATASET, tmp_path / "raw", max_images=3)
    message = str(caught.value)
    assert "\n" not in message
    for hint in ("KAGGLE_API_TOKEN", "kaggle.json", "data.sources.<modality>.kind", "sample", DATASET):
        assert hint in message
    assert capsys.readouterr().out == ""
    assert list(home.iterdir()) == []  # the kaggle import would have created ~/.config/kaggle


def test_kaggle_exit_during_authentication_becomes_source_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    _clear_kaggle_env(monkeypatch, home)
    monkeypatch.setenv("KAGGLE_API_TOKEN", "KGAT_expired")

    class ExitingKaggleApi:
        """Behaves like KaggleApi 2.2.4 with a rejected token: help text, then exit(1)."""

        def authenticate(self) -> None:
            print("Authentication required to call the Kaggle API.\n" * 18)
            raise SystemExit(1)

    extended = types.ModuleType("kaggle.api.kaggle_api_extended")
    extended.KaggleApi = ExitingKaggleApi  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "kaggle", types.ModuleType("kaggle"))
    monkeypatch.setitem(sys.modules, "kaggle.api", types.ModuleType("kaggle.api"))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", extended)
    sleeps: list[float] = []
    with pytest.raises(SourceError) as caught:
        download_kaggle(DATASET, tmp_path / "raw", max_images=3, sleep=sleeps.append)
    assert not isinstance(caught.value, CredentialsMissing)
    assert "\n" not in str(caught.value) and "exited with code 1" in str(caught.value)
    assert sleeps == []  # a rejected login is not retried
    assert capsys.readouterr().out == ""


# --- selection --------------------------------------------------------------------------------


def test_selects_images_matching_include_sorted_and_capped(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    report = run(client, tmp_path, max_images=2)
    assert report.files == ["ct_scans/a.nii", "ct_scans/b.nii.gz"]
    assert sorted(client.downloads) == ["ct_scans/a.nii", "ct_scans/b.nii.gz"]
    assert (report.downloaded, report.skipped) == (2, 0)
    assert report.bytes == len(ct_files()["ct_scans/a.nii"]) + len(ct_files()["ct_scans/b.nii.gz"])
    assert files_under(tmp_path) == {"ct_scans/a.nii", "ct_scans/b.nii.gz", MANIFEST_NAME}
    assert (tmp_path / "ct_scans/a.nii").read_bytes() == ct_files()["ct_scans/a.nii"]
    assert client.list_calls == 3  # five files in pages of two: every page was read


def test_without_include_all_images_count(tmp_path: Path) -> None:
    report = run(FakeKaggle(ct_files()), tmp_path, include=None, max_images=3)
    assert report.files == ["ct_scans/a.nii", "ct_scans/b.nii.gz", "ct_scans/c.nii"]


def test_no_matching_image_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="include"):
        run(FakeKaggle(ct_files()), tmp_path, include="_flair.nii")


def test_unsafe_listing_name_is_refused(tmp_path: Path) -> None:
    client = FakeKaggle({"../escape.png": b"x" * 10})
    with pytest.raises(SourceError, match="unsafe"):
        run(client, tmp_path / "raw", include=None)
    assert not (tmp_path / "escape.png").exists()


# --- retries ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "transient",
    [requests.ConnectionError("reset"), requests.Timeout("slow"), http_error(429), http_error(503)],
    ids=["connection", "timeout", "429", "503"],
)
def test_transient_failure_then_success(tmp_path: Path, transient: Exception) -> None:
    client = FakeKaggle(ct_files())
    client.failures["ct_scans/a.nii"] = [transient]
    sleeps: list[float] = []
    report = run(client, tmp_path, sleeps, max_images=2, backoff_seconds=0.5)
    assert sleeps == [0.5]
    assert client.downloads.count("ct_scans/a.nii") == 2
    assert report.downloaded == 2
    assert (tmp_path / "ct_scans/a.nii").read_bytes() == ct_files()["ct_scans/a.nii"]


def test_persistent_transient_failure_keeps_completed_files_and_no_partial(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    client.always_fail["ct_scans/b.nii.gz"] = requests.ConnectionError("connection reset by peer")
    sleeps: list[float] = []
    with pytest.raises(SourceError) as caught:
        run(client, tmp_path, sleeps, retries=2, backoff_seconds=0.5)
    message = str(caught.value)
    assert "ct_scans/b.nii.gz" in message and DATASET in message and "3 attempts" in message
    assert sleeps == [0.5, 1.0]
    assert client.downloads.count("ct_scans/b.nii.gz") == 3
    # a.nii was completed before; b's partial bytes never reached a final name; c never started.
    assert files_under(tmp_path) == {"ct_scans/a.nii", MANIFEST_NAME}
    assert (tmp_path / "ct_scans/a.nii").read_bytes() == ct_files()["ct_scans/a.nii"]

    # The rerun resumes: a is kept, b and c are fetched.
    del client.always_fail["ct_scans/b.nii.gz"]
    client.downloads.clear()
    report = run(client, tmp_path)
    assert sorted(client.downloads) == ["ct_scans/b.nii.gz", "ct_scans/c.nii"]
    assert (report.downloaded, report.skipped) == (2, 1)


@pytest.mark.parametrize("status", [401, 403, 404])
def test_permanent_http_error_is_not_retried(tmp_path: Path, status: int) -> None:
    client = FakeKaggle(ct_files())
    client.always_fail["ct_scans/a.nii"] = http_error(status)
    sleeps: list[float] = []
    with pytest.raises(SourceError) as caught:
        run(client, tmp_path, sleeps)
    message = str(caught.value)
    assert f"HTTP {status}" in message and "ct_scans/a.nii" in message
    assert "secret" not in message and "\n" not in message  # no signed URL leaks into the message
    assert sleeps == [] and client.downloads == ["ct_scans/a.nii"]
    assert not (tmp_path / "ct_scans/a.nii").exists()


def test_listing_is_retried_too(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    real_listing = client.dataset_list_files
    failures = [http_error(502)]

    def flaky_listing(dataset: str, page_token: str | None = None, page_size: int = 20) -> SimpleNamespace:
        if failures:
            raise failures.pop()
        return real_listing(dataset, page_token=page_token, page_size=page_size)

    client.dataset_list_files = flaky_listing  # type: ignore[method-assign]
    sleeps: list[float] = []
    assert run(client, tmp_path, sleeps, max_images=1).files == ["ct_scans/a.nii"]
    assert sleeps == [0.5]


# --- verification -----------------------------------------------------------------------------


def test_size_mismatch_once_then_good(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    client.corrupt_deliveries["ct_scans/a.nii"] = 1
    sleeps: list[float] = []
    report = run(client, tmp_path, sleeps, max_images=1)
    assert report.downloaded == 1 and sleeps == [0.5]
    assert (tmp_path / "ct_scans/a.nii").read_bytes() == ct_files()["ct_scans/a.nii"]


def test_always_corrupt_raises_and_leaves_nothing(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    client.corrupt_deliveries["ct_scans/a.nii"] = -1
    sleeps: list[float] = []
    with pytest.raises(SourceError, match=r"ct_scans/a\.nii"):
        run(client, tmp_path, sleeps, max_images=1, retries=3)
    assert sleeps == [0.5, 1.0, 2.0]
    assert files_under(tmp_path) == {MANIFEST_NAME}


def test_zipped_delivery_is_unzipped(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files(), zipped={"ct_scans/a.nii", "ct_scans/c.nii"})
    report = run(client, tmp_path)
    assert report.downloaded == 3
    for name in ("ct_scans/a.nii", "ct_scans/c.nii"):
        assert (tmp_path / name).read_bytes() == ct_files()[name]
    assert files_under(tmp_path) == {"ct_scans/a.nii", "ct_scans/b.nii.gz", "ct_scans/c.nii", MANIFEST_NAME}


def test_zipped_and_truncated_delivery_is_retried(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files(), zipped={"ct_scans/a.nii"})
    client.corrupt_deliveries["ct_scans/a.nii"] = 1
    sleeps: list[float] = []
    run(client, tmp_path, sleeps, max_images=1)
    assert sleeps == [0.5]
    assert (tmp_path / "ct_scans/a.nii").read_bytes() == ct_files()["ct_scans/a.nii"]


# --- resume -----------------------------------------------------------------------------------


def test_resume_skips_verified_files_and_refetches_missing_or_altered_ones(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    first = run(client, tmp_path)
    assert first.downloaded == 3
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == set(first.files)
    assert manifest["files"]["ct_scans/a.nii"]["size"] == len(ct_files()["ct_scans/a.nii"])

    client.downloads.clear()
    second = run(client, tmp_path)
    assert client.downloads == []
    assert (second.downloaded, second.skipped, second.bytes) == (0, 3, 0)
    assert second.files == first.files

    (tmp_path / "ct_scans/b.nii.gz").unlink()
    altered = tmp_path / "ct_scans/c.nii"
    altered.write_bytes(b"X" * altered.stat().st_size)  # same size, different bytes
    third = run(client, tmp_path)
    assert sorted(client.downloads) == ["ct_scans/b.nii.gz", "ct_scans/c.nii"]
    assert (third.downloaded, third.skipped) == (2, 1)
    assert altered.read_bytes() == ct_files()["ct_scans/c.nii"]


def test_finished_download_reruns_offline(tmp_path: Path) -> None:
    run(FakeKaggle(ct_files()), tmp_path)

    class Offline(FakeKaggle):
        def dataset_list_files(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise requests.ConnectionError("no network")

    offline = Offline(ct_files())
    report = run(offline, tmp_path, retries=0)
    assert report.skipped == 3 and offline.downloads == []


def test_smaller_request_removes_files_no_longer_asked_for(tmp_path: Path) -> None:
    client = FakeKaggle(ct_files())
    run(client, tmp_path, max_images=3)
    client.downloads.clear()
    report = run(client, tmp_path, max_images=1)
    assert report.files == ["ct_scans/a.nii"] and client.downloads == []
    assert files_under(tmp_path) == {"ct_scans/a.nii", MANIFEST_NAME}


# --- NIH chest X-ray --------------------------------------------------------------------------


def nih_files() -> dict[str, bytes]:
    labels = (
        "Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age\n"
        "00000001_000.png,Cardiomegaly,0,1,058Y\n"
        "00000001_001.png,No Finding,1,1,058Y\n"
        "00000002_000.png,No Finding,0,2,081Y\n"
        "00000003_000.png,Hernia,0,3,074Y\n"
    )
    return {
        "sample_labels.csv": labels.encode(),
        "sample/images/00000003_000.png": b"\x89PNG-3" * 10,
        "sample/images/00000001_001.png": b"\x89PNG-1b" * 10,
        "sample/images/00000001_000.png": b"\x89PNG-1a" * 10,
        "sample/images/00000002_000.png": b"\x89PNG-2" * 10,
    }


def test_nih_writes_patients_csv_from_labels(tmp_path: Path) -> None:
    client = FakeKaggle(nih_files(), zipped={"sample_labels.csv"})
    report = run(client, tmp_path, dataset=NIH_SAMPLE, include=None, max_images=3)
    images = ["sample/images/00000001_000.png", "sample/images/00000001_001.png", "sample/images/00000002_000.png"]
    assert report.files == [*images, "sample_labels.csv"]
    with (tmp_path / PATIENTS_NAME).open(newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows == [
        {"path": images[0], "patient_id": "1"},
        {"path": images[1], "patient_id": "1"},
        {"path": images[2], "patient_id": "2"},
    ]
    assert all((tmp_path / row["path"]).is_file() for row in rows)

    client.downloads.clear()
    (tmp_path / PATIENTS_NAME).unlink()
    run(client, tmp_path, dataset=NIH_SAMPLE, include=None, max_images=3)
    assert client.downloads == [] and (tmp_path / PATIENTS_NAME).is_file()


def test_nih_image_without_label_row_is_an_error(tmp_path: Path) -> None:
    files = nih_files()
    files["sample/images/00000009_000.png"] = b"\x89PNG-9" * 10
    with pytest.raises(SourceError, match=r"00000009_000\.png.*sample_labels\.csv"):
        run(FakeKaggle(files), tmp_path, dataset=NIH_SAMPLE, include=None, max_images=10)
    assert not (tmp_path / PATIENTS_NAME).exists()


def test_nih_without_label_csv_is_an_error(tmp_path: Path) -> None:
    files = {name: data for name, data in nih_files().items() if not name.endswith(".csv")}
    with pytest.raises(SourceError, match="sample_labels.csv"):
        run(FakeKaggle(files), tmp_path, dataset=NIH_SAMPLE, include=None)


def test_bad_dataset_slug_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="kaggle.dataset"):
        run(FakeKaggle(ct_files()), tmp_path, dataset="not-a-slug")


# --- cost per file ----------------------------------------------------------------------------


def _bytes_written() -> int:
    """Bytes this process has passed to write() so far (Linux's /proc/self/io ``wchar``)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no wchar line")


class CountingKaggle(FakeKaggle):
    """Records the bytes written by every ``window`` downloads; stops the run once a window writes
    more than ``limit`` times the first one (a quadratic manifest would write ~24 GB by file 20,000)."""

    def __init__(self, files: dict[str, bytes], window: int, limit: float) -> None:
        super().__init__(files, page_cap=200)
        self.window, self.limit = window, limit
        self.windows: list[int] = []
        self.mark = 0

    def dataset_download_file(self, dataset: str, file_name: str, path: str | None = None, force: bool = False,
                              quiet: bool = True) -> bool:
        if len(self.downloads) % self.window == 0:
            now = _bytes_written()
            if self.downloads:
                self.windows.append(now - self.mark)
                if self.windows[-1] > self.limit * self.windows[0]:
                    raise RuntimeError(f"window {len(self.windows)} wrote {self.windows[-1]} bytes, "
                                       f"the first {self.windows[0]}")
            self.mark = now
        return super().dataset_download_file(dataset, file_name, path, force, quiet)


def test_manifest_bytes_per_file_do_not_grow_with_the_count(tmp_path: Path) -> None:
    """20,000 files: the bytes written per file (payload, manifest) are the same for the last
    thousand files as for the second thousand, and a resumed run reads back every record."""
    count, window = 20_000, 1_000
    files = {f"ct_scans/{i:05d}.nii": b"v" * 64 for i in range(count)}
    client = CountingKaggle(files, window=window, limit=1.5)
    report = run(client, tmp_path, max_images=count)
    assert report.downloaded == count
    assert len(client.windows) == count // window - 1
    # The first window also holds one-off work (tqdm's first lines): compare with the second.
    assert max(client.windows[1:]) <= 1.2 * client.windows[1]
    assert client.windows[1] / window < 400  # the 64-byte payload and one manifest line each

    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert len(manifest["files"]) == count


def test_interrupted_run_resumes_from_the_appended_records(tmp_path: Path) -> None:
    """A run killed mid-way leaves its first line plus one appended line per completed file (the
    last possibly cut short): the rerun fetches only what no whole line records."""
    client = FakeKaggle(ct_files())
    client.always_fail["ct_scans/c.nii"] = requests.ConnectionError("connection reset by peer")
    with pytest.raises(SourceError):
        run(client, tmp_path, retries=0)
    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    assert len(lines) == 3  # the first line, then a.nii and b.nii.gz
    assert json.loads(lines[1])["file"] == "ct_scans/a.nii"
    with (tmp_path / MANIFEST_NAME).open("a") as manifest:
        manifest.write('{"file": "ct_scans/c.nii", "rec')  # a write cut short by the kill

    del client.always_fail["ct_scans/c.nii"]
    client.downloads.clear()
    report = run(client, tmp_path)
    assert client.downloads == ["ct_scans/c.nii"]
    assert (report.downloaded, report.skipped) == (1, 2)
