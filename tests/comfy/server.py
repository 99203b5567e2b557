"""Start a real ComfyUI headless on CPU for integration tests, with this pack installed, and stop it afterwards.

``comfy_server_session(base_dir, checkpoint=...)`` is a context manager (``tests/comfy/conftest.py`` wraps it in
the session fixture ``comfy_server``):

- ``base_dir`` becomes ComfyUI's ``--base-directory``: ``custom_nodes/comfyui-bfr`` is a symlink to this checkout,
  ``models/checkpoints/<name>`` a symlink to the tiny checkpoint, ``models/bfr/<name>`` one to each file of
  ``bfr_models`` (``{name on the server: file}``, e.g. the tiny FlipNet checkpoints); input/output/temp/user are
  created by ComfyUI;
- ComfyUI runs as ``$COMFYUI_PYTHON main.py --cpu --listen 127.0.0.1 --port <free port> --disable-auto-launch
  --base-directory <base> --database-url sqlite:///:memory: --disable-api-nodes`` (default Python:
  ``$COMFYUI_PATH/.venv/bin/python``), cwd ``$COMFYUI_PATH``, stdout+stderr to ``<base>/comfyui.log``;
- ready means ``GET /object_info`` answers and lists every node id of the pack's ``NODE_CLASS_MAPPINGS``; a pack
  import failure ("IMPORT FAILED" for our folder), an early exit or the timeout raise with the log's tail;
- on exit the process (only the one started here, by its pid) gets SIGTERM, then SIGKILL after 20 s.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import requests

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-bfr"
CHECKPOINT_NAME = "bfr_tiny_sd2.safetensors"
# names of the tiny FlipNet checkpoints in the test server's models/bfr (tests/fixtures/flipnet.py), by mode
FLIPNET_NAMES = {"restore": "bfr_tiny_flipnet_restore.safetensors", "degrade": "bfr_tiny_flipnet_degrade.safetensors"}


class ComfyServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def comfy_python(comfyui_path: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    venv = comfyui_path / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class ComfyServer:
    url: str
    base: Path
    log_path: Path
    process: subprocess.Popen
    checkpoint_name: str | None
    startup_seconds: float = 0.0
    node_ids: list[str] = field(default_factory=list)
    extra_model_dirs: dict[str, Path] = field(default_factory=dict)  # folder name -> a dir from extra_model_paths
    bfr_models: dict[str, Path] = field(default_factory=dict)  # name in models/bfr -> the file it links to
    flipnet_names: dict[str, str] = field(default_factory=dict)  # FlipNet mode -> its name in models/bfr

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    def client(self, **kw):
        from comfyui_bfr.cli.client import ComfyClient

        return ComfyClient(self.url, **kw)

    def log_tail(self, lines: int = 60) -> str:
        return tail(self.log_path, lines)

    def alive(self) -> bool:
        return self.process.poll() is None


def _link(target: Path, source: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(Path(source).resolve())


def prepare_base(base: Path, checkpoint: Path | None = None, checkpoint_name: str = CHECKPOINT_NAME,
                 pack_dir: Path = REPO, bfr_models: dict[str, Path] | None = None) -> Path:
    base = Path(base)
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_FOLDER
    if not link.exists():
        link.symlink_to(pack_dir, target_is_directory=True)
    if checkpoint is not None:
        _link(base / "models" / "checkpoints" / checkpoint_name, checkpoint)
    for name, source in (bfr_models or {}).items():
        _link(base / "models" / "bfr" / name, source)
    return base


def _expected_node_ids() -> list[str]:
    from comfyui_bfr import NODE_CLASS_MAPPINGS

    return sorted(NODE_CLASS_MAPPINGS)


def _wait_ready(srv: ComfyServer, expect: list[str], timeout: float) -> None:
    start = time.monotonic()
    last_err = "no answer yet"
    while time.monotonic() - start < timeout:
        if not srv.alive():
            raise ComfyServerError(f"ComfyUI exited with code {srv.process.returncode} during startup; log tail "
                                   f"({srv.log_path}):\n{srv.log_tail()}")
        log = srv.log_path.read_text(encoding="utf-8", errors="replace") if srv.log_path.exists() else ""
        if any("IMPORT FAILED" in line and PACK_FOLDER in line for line in log.splitlines()):
            raise ComfyServerError(f"ComfyUI could not import the pack; log tail:\n{srv.log_tail(80)}")
        try:
            r = requests.get(srv.url + "/object_info", timeout=10)
            if r.status_code == 200:
                info = r.json()
                missing = [n for n in expect if n not in info]
                if not missing:
                    return
                last_err = f"/object_info lacks {missing}"
                if "Starting server" in log:  # nodes are registered before the server starts listening
                    raise ComfyServerError(f"ComfyUI started without the pack's nodes {missing}; log tail:\n"
                                           f"{srv.log_tail(80)}")
            else:
                last_err = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last_err = f"{type(exc).__name__}"
        time.sleep(0.5)
    raise ComfyServerError(f"ComfyUI not ready after {timeout:.0f} s ({last_err}); log tail:\n{srv.log_tail()}")


def stop(srv: ComfyServer, grace: float = 20.0) -> None:
    p = srv.process
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        logger.warning("ComfyUI (pid %d) ignored SIGTERM for %.0f s; killing it", p.pid, grace)
        p.kill()
        p.wait(timeout=10)


@contextlib.contextmanager
def comfy_server_session(base_dir, checkpoint: Path | None = None, comfyui_path: Path | None = None,
                         python: str | None = None, expect_nodes: Iterable[str] | None = None,
                         extra_args: Iterable[str] = (), startup_timeout: float = 300.0,
                         pack_dir: Path = REPO, bfr_models: dict[str, Path] | None = None
                         ) -> Iterator[ComfyServer]:
    """Run ComfyUI for the duration of the ``with`` block; yields a :class:`ComfyServer`."""
    comfyui_path = Path(comfyui_path or os.environ.get("COMFYUI_PATH", "")).resolve()
    if not (comfyui_path / "main.py").is_file():
        raise ComfyServerError(f"COMFYUI_PATH={comfyui_path} has no main.py")
    base = prepare_base(Path(base_dir), checkpoint, pack_dir=pack_dir, bfr_models=bfr_models)
    port = free_port()
    py = python or comfy_python(comfyui_path)
    cmd = [py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-api-nodes",
           *extra_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_NUM_THREADS", "2")
    log_path = base / "comfyui.log"
    expect = sorted(expect_nodes) if expect_nodes is not None else _expected_node_ids()
    logger.info("starting ComfyUI: %s (log %s)", " ".join(cmd), log_path)
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=str(comfyui_path), env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    srv = ComfyServer(url=f"http://127.0.0.1:{port}", base=base, log_path=log_path, process=proc,
                      checkpoint_name=CHECKPOINT_NAME if checkpoint is not None else None, node_ids=expect,
                      bfr_models={name: Path(src) for name, src in (bfr_models or {}).items()})
    try:
        _wait_ready(srv, expect, startup_timeout)
        srv.startup_seconds = time.monotonic() - t0
        logger.info("ComfyUI ready at %s after %.1f s", srv.url, srv.startup_seconds)
        yield srv
    finally:
        stop(srv)
