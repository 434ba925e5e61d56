"""A stage process ends through :func:`medsr.stage_entry.exit_stage`: its exit code, its last output,
its atexit handlers and its threads' work all survive the skipped interpreter teardown."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import atexit, sys, threading, time
    from pathlib import Path
    from medsr.stage_entry import exit_stage

    out = Path(sys.argv[1])
    atexit.register(lambda: (out / "atexit").write_text("ran"))

    def late() -> None:
        time.sleep(0.3)
        (out / "thread").write_text("done")

    threading.Thread(target=late).start()
    sys.stdout.write("last line, no newline")
    sys.stderr.write("last error line")
    exit_stage(3)
    raise AssertionError("exit_stage returned")
""")


def test_exit_stage_keeps_what_a_normal_exit_does(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # block-buffered, as under DVC
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert done.stdout == "last line, no newline"
    assert done.stderr.endswith("last error line")
    assert (tmp_path / "atexit").read_text() == "ran"
    assert (tmp_path / "thread").read_text() == "done"


def test_every_stage_script_exits_through_exit_stage() -> None:
    scripts = sorted((REPO_ROOT / "stages").glob("*.py"))
    assert scripts
    for script in scripts:
        text = script.read_text()
        assert "exit_stage(run_stage(" in text and "sys.exit(" not in text, script.name
