"""The ``retrain`` flow as a Prefect deployment with a cron schedule.

``medsr schedule --cron "0 3 * * 0"`` (and ``make schedule``) *serves* it: this process registers
the deployment with the Prefect API and runs each scheduled flow run itself until stopped; no work
pool or worker needed. Teams with a Prefect server and workers deploy the same flow from
``prefect.yaml`` instead (``prefect deploy``).

The API is ``PREFECT_API_URL`` when set. Otherwise a Prefect server on 127.0.0.1 (port 4200 by
default) is used, started for the life of this process if none answers there: Prefect's ephemeral
in-process server does not run the scheduler service, so with it a cron deployment would never get
a run. The same server gives the UI at http://127.0.0.1:4200 to watch the runs.

``python -m flows.deploy --cron "..."`` does the same as ``medsr schedule``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from medsr.params import load_params

DEFAULT_DEPLOYMENT = "weekly-retrain"
DEFAULT_CRON = "0 3 * * 0"
DEFAULT_TIMEZONE = "UTC"
DEFAULT_SERVER_PORT = 4200
SERVER_STARTUP_SECONDS = 120.0


class ScheduleError(ValueError):
    """The schedule cannot be set up; the message is one line."""


def schedule_settings(params_path: Path, cron: str | None, timezone: str | None, name: str | None) -> dict[str, str]:
    """Command-line values over ``params.yaml: flows.schedule`` over the defaults, validated."""
    cfg = ((load_params(params_path).get("flows") or {}).get("schedule") or {}) if Path(params_path).is_file() else {}
    chosen = {"cron": cron or cfg.get("cron") or DEFAULT_CRON, "timezone": timezone or cfg.get("timezone") or DEFAULT_TIMEZONE,
              "name": name or cfg.get("deployment") or DEFAULT_DEPLOYMENT}
    from prefect.client.schemas.schedules import CronSchedule

    try:
        CronSchedule(cron=chosen["cron"], timezone=chosen["timezone"])
    except ValueError as err:
        first = str(err).strip().splitlines()
        detail = next((line.strip() for line in first if "cron" in line.lower() or "timezone" in line.lower()), first[-1] if first else "")
        raise ScheduleError(f"invalid schedule --cron {chosen['cron']!r} --timezone {chosen['timezone']!r}: {detail}") from None
    return chosen


def retrain_deployment(repo: Path, cron: str, timezone: str, name: str) -> Any:
    """The ``retrain`` flow as a RunnerDeployment: cron schedule, ``repo`` as its parameter."""
    from prefect.schedules import Cron

    from flows.retrain import retrain

    return retrain.to_deployment(
        name=name,
        schedules=[Cron(cron, timezone=timezone)],
        parameters={"repo": str(Path(repo).resolve())},
        tags=["medsr", "retrain"],
        description="Pull new data, reproduce the DVC pipeline, compare challenger with champion, promote or keep.",
    )


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def prefect_api(port: int = DEFAULT_SERVER_PORT) -> Iterator[str]:
    """The Prefect API to schedule against: ``PREFECT_API_URL``, else a server on 127.0.0.1:``port``
    (reused when one answers, else started now and stopped on exit)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    configured = os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value()
    if configured:
        yield str(configured)
        return
    api_url = f"http://127.0.0.1:{port}/api"
    server = None
    if not _healthy(api_url):
        prefect = Path(sys.executable).parent / "prefect"
        print(f"starting a Prefect server on 127.0.0.1:{port} (UI: http://127.0.0.1:{port})", flush=True)
        server = subprocess.Popen([str(prefect) if prefect.is_file() else "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        deadline = time.monotonic() + SERVER_STARTUP_SECONDS
        while not _healthy(api_url):
            if server.poll() is not None or time.monotonic() > deadline:
                server.terminate()
                raise ScheduleError(f"the Prefect server on 127.0.0.1:{port} did not start (port taken?): start one with "
                                    "`prefect server start` and set PREFECT_API_URL")
            time.sleep(1.0)
    # The environment too: the flow runs this process starts read their API from it.
    previous = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = api_url
    try:
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield api_url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        if server is not None:
            server.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=30)


def serve_retrain(repo: Path, cron: str | None = None, timezone: str | None = None, name: str | None = None,
                  params_path: Path = Path("params.yaml"), port: int = DEFAULT_SERVER_PORT) -> None:
    """Register the cron deployment and serve its runs from this process until interrupted."""
    settings = schedule_settings(Path(repo) / params_path if not Path(params_path).is_absolute() else params_path,
                                 cron, timezone, name)
    with prefect_api(port) as api_url:
        from prefect import serve

        deployment = retrain_deployment(Path(repo), settings["cron"], settings["timezone"], settings["name"])
        ui = api_url.removesuffix("/api")
        print(f"serving retrain/{settings['name']} on cron {settings['cron']!r} ({settings['timezone']}) via {api_url}; "
              f"watch runs at {ui}/runs; Ctrl-C stops serving (and pauses the schedule)", flush=True)
        serve(deployment)


def main() -> None:
    import sys

    import typer

    def command(cron: str = typer.Option(None, "--cron"), timezone: str = typer.Option(None, "--timezone"),
                name: str = typer.Option(None, "--name"), port: int = typer.Option(DEFAULT_SERVER_PORT, "--port")) -> None:
        try:
            serve_retrain(Path.cwd(), cron, timezone, name, port=port)
        except ScheduleError as err:
            print(f"flows.deploy: {err}", file=sys.stderr)
            raise typer.Exit(1) from None

    typer.run(command)


if __name__ == "__main__":
    main()
