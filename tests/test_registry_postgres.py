"""The registry on MLflow backed by a real PostgreSQL server on 127.0.0.1 (the "real servers" path).

``.ci/run`` installs Debian's postgresql, starts it and creates the role ``medsr`` (password
``medsr``, CREATEDB); ``MEDSR_TEST_POSTGRES_URL`` points elsewhere. Each run creates its own
database and drops it afterwards. Where no server answers, the test is skipped with that reason:
it is never faked.
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
    MODALITIES,
    NAME,
    PAIRS,
    SCALE,
    Store,
    _log_generator_run,
    _write_test_pairs,
    cli,
    params,
    register,
    uniform,
)

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
        pytest.skip(f"no PostgreSQL server reachable at {redact_uri(POSTGRES_URL)} ({first}); .ci/run installs and starts one")
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

    from medsr.benchmark import evaluate_generator
    from medsr.data.pairs import PairSet
    from medsr.models import build_generator
    from medsr.registry import RegistryError, check_tracking_reachable

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", postgres_uri)
    monkeypatch.setenv("MEDSR_USER", "bob")
    monkeypatch.setenv("COLUMNS", "200")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params()))
    assert check_tracking_reachable() == postgres_uri

    _write_test_pairs(PAIRS)
    runs = (_log_generator_run(1), _log_generator_run(2))
    bicubic = evaluate_generator(build_generator("bicubic", SCALE), PairSet(PAIRS / "test" / "x2" / "standard"))
    store = Store(tmp_path, runs, {m: (bicubic[m]["psnr"], bicubic[m]["ssim"]) for m in MODALITIES})

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
