"""The registry on MLflow backed by a real PostgreSQL server on 127.0.0.1 (the "real servers" path).

``make test`` (and so ``.ci/run``) runs the suite through ``scripts/test-deps.sh``, which starts a
throw-away PostgreSQL cluster on 127.0.0.1 (role ``medsr``, password ``medsr``) and sets
``MEDSR_TEST_POSTGRES_URL``; set it yourself to use another server. Each run creates its own
database and drops it afterwards. When the variable names a server that does not answer, the test
fails; a bare ``pytest`` without it is skipped with that reason. It is never faked.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from test_registry import (
    NAME,
    PAIRS,
    SCALE,
    TRACKS,
    Store,
    _log_generator_run,
    _write_test_pairs,
    cli,
    params,
    register,
    uniform,
)

POSTGRES_REQUESTED = bool(os.environ.get("MEDSR_TEST_POSTGRES_URL"))
POSTGRES_URL = os.environ.get("MEDSR_TEST_POSTGRES_URL", "postgresql://medsr:medsr@127.0.0.1:5432/postgres")


def _with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture
def postgres_uri() -> Iterator[str]:
    """A fresh, empty database on the server; dropped afterwards."""
    import psycopg2

    from medsr.registry import redact_uri

    try:
        admin = psycopg2.connect(POSTGRES_URL, connect_timeout=3)
    except psycopg2.OperationalError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        message = f"no PostgreSQL server reachable at {redact_uri(POSTGRES_URL)} ({first})"
        if POSTGRES_REQUESTED:  # a server was promised (make test starts one): its absence is a failure
            pytest.fail(message, pytrace=False)
        pytest.skip(f"{message}; run the suite with `make test`, which starts a throw-away one")
    admin.autocommit = True
    database = f"medsr_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{database}"')
    try:
        yield _with_database(POSTGRES_URL, database)
    finally:
        with admin.cursor() as cursor:
            # FORCE: MLflow's connection pool may still hold sessions (PostgreSQL 13+).
            cursor.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def test_registry_on_mlflow_with_postgresql(postgres_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import psycopg2
    import yaml

    from medsr.benchmark import held_out_images
    from medsr.evaluation import evaluate_images, summarize
    from medsr.models import build_generator
    from medsr.registry import RegistryError, check_tracking_reachable
    from medsr.inference import predict_image

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_uri)
    monkeypatch.setenv("MEDSR_USER", "bob")
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params()))
    assert check_tracking_reachable() == postgres_uri

    _write_test_pairs(PAIRS)
    runs = (_log_generator_run(1), _log_generator_run(2))
    # The real bicubic per "<track>/<modality>" cell, as test_registry's store fixture measures it.
    bicubic = build_generator("bicubic", SCALE)
    records = [r for t in TRACKS for r in evaluate_images(lambda lr: {"bicubic": predict_image(bicubic, lr)},
                                                          held_out_images(PAIRS, "test", SCALE, t, {}), SCALE)]
    store = Store(tmp_path, runs, {f"{r['track']}/{r['modality']}": (r["psnr"], r["ssim"])
                                   for r in summarize(records) if r["modality"] != "all"})

    first = register(store, {"espcn": uniform(0.3)}, {"espcn": runs[0]})
    second = register(store, {"espcn": uniform(0.1)}, {"espcn": runs[1]})
    assert first["action"] == "promoted" and second["action"] == "kept"

    refused = cli("promote", "2", "--scale", "2")
    assert refused.exit_code == 1 and "refusing to promote" in refused.output
    shown = cli("review")
    assert shown.exit_code == 0 and "v1 @champion" in shown.output and "v2 @challenger" in shown.output

    # The registry really lives in PostgreSQL (no embedded store was created as a side effect).
    assert not (tmp_path / "mlflow.db").exists()
    with psycopg2.connect(postgres_uri, connect_timeout=3) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT alias, version FROM registered_model_aliases WHERE name = %s ORDER BY alias", (NAME,))
        assert cursor.fetchall() == [("challenger", 2), ("champion", 1)]
        cursor.execute("SELECT value FROM model_version_tags WHERE name = %s AND version = 1 AND key = 'decision'", (NAME,))
        assert cursor.fetchone() == ("promoted",)
        cursor.execute("SELECT count(*) FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
                       "WHERE e.name = 'medsr-registry'")
        assert cursor.fetchone() == (2,)  # one decision run per registration

    with socket.socket() as probe:  # a port nothing listens on: a clear message, not a hang
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    unreachable = urlunsplit(urlsplit(postgres_uri)._replace(netloc=f"medsr:secret@127.0.0.1:{closed_port}"))
    with pytest.raises(RegistryError, match="unreachable") as raised:
        check_tracking_reachable(unreachable)
    assert "secret" not in str(raised.value)  # the password never reaches a message
