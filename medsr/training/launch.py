"""The ``torchrun`` launcher of data-parallel training.

:func:`launch` starts ``torchrun --nproc_per_node N -m medsr.training.stage <model> ...`` on this
machine (rendezvous on 127.0.0.1); every rank runs the train stage (:func:`medsr.training.stage.main`).
A multi-node run is a plain ``torchrun`` line with ``--nnodes``/``--rdzv-endpoint`` running the
same module (docs/scale-out.md). The rank's entry is named here as a string, not imported, so the
stage can call this launcher without a circle.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

RANK_MODULE = "medsr.training.stage"
"""The module every rank runs (``python -m``)."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def torchrun_command(nproc: int, module_args: list[str], *, port: int | None = None) -> list[str]:
    """The ``torchrun`` line that runs :data:`RANK_MODULE` on ``nproc`` local ranks, rendezvous on 127.0.0.1."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(port or free_port()),
            "-m", RANK_MODULE, *module_args]


def launch(params: dict[str, Any], model: str, nproc: int, *, profile: str | None = None) -> int:
    """Run the train stage of ``model`` on ``nproc`` local ranks through torchrun; returns its exit
    status. ``params`` (as resolved by the caller, CLI overrides included) go to the ranks as a file."""
    env = dict(os.environ)
    # gloo picks a network interface from the host name; keep its sockets on the loopback device.
    if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    # `-m medsr.training.stage` runs a module the package may have imported already; runpy warns
    # about that on every rank. Harmless here: main() keeps no module state.
    quiet = f"ignore:'{RANK_MODULE}' found in sys.modules::runpy"
    env["PYTHONWARNINGS"] = ",".join(filter(None, [env.get("PYTHONWARNINGS"), quiet]))
    with tempfile.TemporaryDirectory(prefix="medsr-ddp-") as folder:
        params_file = Path(folder) / "params.json"
        params_file.write_text(json.dumps(params))
        args = [model, "--params", str(params_file)] + (["--profile", profile] if profile else [])
        return subprocess.run(torchrun_command(nproc, args), env=env, check=False).returncode
