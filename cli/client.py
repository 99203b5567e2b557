"""A small client for a running ComfyUI server (HTTP API, optional websocket progress).

Used by ``bfr run-workflow`` and by the integration tests. Standard library + ``requests``; if the
``websocket-client`` package is installed, progress comes from the ``/ws`` stream, otherwise from polling
``/queue`` and ``/history`` (completion is always confirmed through ``/history``).

    from comfyui_bfr.cli.client import ComfyClient, apply_overrides
    c = ComfyClient("http://127.0.0.1:8188")
    name = c.upload_image("face.png")
    prompt = apply_overrides(prompt, ["Load HQ face.image=" + name, "2.seed=7"])
    pid = c.queue(prompt)
    c.wait(pid, timeout=600, on_progress=print)
    paths = [c.download(ref, "out") for ref in c.outputs(pid)]

ComfyUI's ``/prompt`` only accepts API-format prompts. Converting a UI-format workflow (the editor's graph) into
one happens in the ComfyUI frontend ("Save (API)" / ``app.graphToPrompt()``); :func:`load_api_prompt` therefore
looks for an API twin ``api/<name>.json`` beside a UI-format file.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlencode, urlparse

import requests

from .workflow_format import WorkflowFormatError, ui_to_api

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[dict], None]


class ComfyError(RuntimeError):
    """A ComfyUI request failed (connection, HTTP error, malformed answer)."""


class PromptRejected(ComfyError):
    """``POST /prompt`` answered 400: the prompt failed validation. ``node_errors`` says where and why."""

    def __init__(self, error: Any, node_errors: dict):
        self.error = error
        self.node_errors = node_errors or {}
        parts = []
        if isinstance(error, dict):
            parts.append(f"{error.get('type', 'error')}: {error.get('message', '')} {error.get('details', '')}".strip())
        elif error:
            parts.append(str(error))
        for node_id, info in self.node_errors.items():
            cls = info.get("class_type", "?")
            for e in info.get("errors", []):
                parts.append(f"node {node_id} ({cls}): {e.get('type', '')}: {e.get('message', '')}"
                             f"{' - ' + str(e.get('details')) if e.get('details') else ''}")
        super().__init__("ComfyUI rejected the prompt: " + "; ".join(parts) + f" | node_errors={self.node_errors}")


class PromptFailed(ComfyError):
    """The prompt ran and failed (or was interrupted); carries ComfyUI's exception message and node."""

    def __init__(self, prompt_id: str, message: str, node_id: str | None = None, node_type: str | None = None,
                 exception_type: str | None = None, traceback: Any = None, interrupted: bool = False):
        self.prompt_id = prompt_id
        self.exception_message = message
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.traceback = traceback
        self.interrupted = interrupted
        where = f" in node {node_id} ({node_type})" if node_id else ""
        kind = "was interrupted" if interrupted else "failed"
        super().__init__(f"prompt {prompt_id} {kind}{where}: {exception_type + ': ' if exception_type else ''}"
                         f"{message}")


class PromptTimeout(ComfyError):
    """The prompt did not finish in time (it may still be running on the server: see ``ComfyClient.interrupt``)."""


def _websocket_module():
    try:
        import websocket  # websocket-client
    except Exception:  # not installed (or broken): fall back to polling
        return None
    return websocket if hasattr(websocket, "create_connection") else None


class ComfyClient:
    """Talks to one ComfyUI server. ``url`` like ``http://127.0.0.1:8188``."""

    def __init__(self, url: str = "http://127.0.0.1:8188", timeout: float = 30.0, client_id: str | None = None,
                 use_websocket: bool | None = None):
        if "://" not in url:
            url = "http://" + url
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.client_id = client_id or uuid.uuid4().hex
        self.session = requests.Session()
        self._ws_mod = _websocket_module() if use_websocket in (None, True) else None
        if use_websocket and self._ws_mod is None:
            logger.warning("websocket-client is not installed; progress comes from polling /queue and /history")
        self._ws = None

    # ------------------------------------------------------------------------------------------ plumbing
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:  # already gone
                pass
            self._ws = None
        self.session.close()

    def _request(self, method: str, path: str, **kw) -> requests.Response:
        kw.setdefault("timeout", self.timeout)
        try:
            r = self.session.request(method, self.url + path, **kw)
        except requests.RequestException as exc:
            raise ComfyError(f"cannot reach ComfyUI at {self.url} ({method} {path}): {exc}") from exc
        return r

    def _json(self, method: str, path: str, **kw) -> Any:
        r = self._request(method, path, **kw)
        if r.status_code != 200:
            raise ComfyError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:500]}")
        try:
            return r.json()
        except ValueError as exc:
            raise ComfyError(f"{method} {path}: answer is not JSON: {r.text[:200]!r}") from exc

    # ------------------------------------------------------------------------------------------ endpoints
    def object_info(self, node_class: str | None = None) -> dict:
        """``GET /object_info`` (every node's schema), or one node's with ``node_class``."""
        if node_class is None:
            return self._json("GET", "/object_info")
        return self._json("GET", "/object_info/" + requests.utils.quote(node_class, safe=""))

    def system_stats(self) -> dict:
        return self._json("GET", "/system_stats")

    def queue_state(self) -> dict:
        """``GET /queue``: ``{"queue_running": [...], "queue_pending": [...]}``."""
        return self._json("GET", "/queue")

    def history(self, prompt_id: str) -> dict | None:
        """The ``/history`` entry of a finished prompt, or None while it is pending or running."""
        return self._json("GET", "/history/" + prompt_id).get(prompt_id)

    def interrupt(self) -> None:
        self._json_or_ok("POST", "/interrupt", json={})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._json_or_ok("POST", "/free", json={"unload_models": unload_models, "free_memory": free_memory})

    def _json_or_ok(self, method, path, **kw) -> None:
        r = self._request(method, path, **kw)
        if r.status_code != 200:
            raise ComfyError(f"{method} {path} -> HTTP {r.status_code}: {r.text[:500]}")

    def upload_image(self, path, subfolder: str = "", overwrite: bool = True, image_type: str = "input") -> str:
        """Upload an image file; returns the value for a LoadImage ``image`` input (``subfolder/name``)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image to upload not found: {path}")
        with path.open("rb") as f:
            r = self._request("POST", "/upload/image", files={"image": (path.name, f, "application/octet-stream")},
                              data={"subfolder": subfolder, "type": image_type,
                                    "overwrite": "true" if overwrite else "false"})
        if r.status_code != 200:
            raise ComfyError(f"upload of {path} failed: HTTP {r.status_code}: {r.text[:300]}")
        info = r.json()
        name = info["name"]
        return f"{info['subfolder']}/{name}" if info.get("subfolder") else name

    def queue(self, prompt: dict, extra_data: dict | None = None, front: bool = False) -> str:
        """``POST /prompt``; returns the prompt id. Raises :class:`PromptRejected` (with node_errors) on HTTP 400."""
        if not isinstance(prompt, dict) or not prompt:
            raise ValueError("prompt must be a non-empty API-format dict {node_id: {class_type, inputs}}")
        self._connect_ws()
        body: dict[str, Any] = {"prompt": prompt, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        if front:
            body["front"] = True
        r = self._request("POST", "/prompt", json=body)
        if r.status_code == 400:
            try:
                info = r.json()
            except ValueError:
                info = {"error": r.text[:500], "node_errors": {}}
            raise PromptRejected(info.get("error"), info.get("node_errors", {}))
        if r.status_code != 200:
            raise ComfyError(f"POST /prompt -> HTTP {r.status_code}: {r.text[:500]}")
        info = r.json()
        if info.get("node_errors"):
            logger.warning("prompt %s queued with node errors: %s", info.get("prompt_id"), info["node_errors"])
        return info["prompt_id"]

    # ------------------------------------------------------------------------------------------- waiting
    def _connect_ws(self) -> None:
        if self._ws_mod is None or self._ws is not None:
            return
        u = urlparse(self.url)
        scheme = "wss" if u.scheme == "https" else "ws"
        ws_url = f"{scheme}://{u.netloc}{u.path}/ws?clientId={self.client_id}"
        try:
            self._ws = self._ws_mod.create_connection(ws_url, timeout=self.timeout)
        except Exception as exc:  # websocket refused: polling still works
            logger.debug("websocket %s unavailable (%s); polling instead", ws_url, exc)
            self._ws = None
            self._ws_mod = None

    def _drain_ws(self, prompt_id: str, on_progress: ProgressCallback | None, wait_s: float) -> None:
        """Read websocket messages for up to ``wait_s`` seconds, forwarding this prompt's events."""
        ws = self._ws
        end = time.monotonic() + wait_s
        while ws is not None and time.monotonic() < end:
            ws.settimeout(max(end - time.monotonic(), 0.01))
            try:
                msg = ws.recv()
            except Exception as exc:  # timeout -> done for now; closed -> fall back to polling
                if "timed out" not in str(exc).lower() and type(exc).__name__ != "WebSocketTimeoutException":
                    logger.debug("websocket closed (%s); polling instead", exc)
                    self._ws = None
                return
            if not isinstance(msg, str):
                continue  # binary preview frames
            try:
                data = json.loads(msg)
            except ValueError:
                continue
            kind, payload = data.get("type"), data.get("data") or {}
            if payload.get("prompt_id") not in (None, prompt_id):
                continue
            if on_progress is None:
                continue
            if kind == "progress":
                on_progress({"event": "progress", "value": payload.get("value"), "max": payload.get("max"),
                             "node": payload.get("node")})
            elif kind == "executing" and payload.get("node") is not None:
                on_progress({"event": "executing", "node": payload.get("node")})
            elif kind == "execution_cached":
                on_progress({"event": "cached", "nodes": payload.get("nodes", [])})
            elif kind == "execution_start":
                on_progress({"event": "running"})

    def _queue_position(self, prompt_id: str) -> tuple[str, int | None]:
        q = self.queue_state()
        for item in q.get("queue_running", []):
            if len(item) > 1 and item[1] == prompt_id:
                return "running", 0
        pending = sorted(q.get("queue_pending", []), key=lambda it: it[0])
        for pos, item in enumerate(pending):
            if len(item) > 1 and item[1] == prompt_id:
                return "pending", pos + 1
        return "unknown", None

    def wait(self, prompt_id: str, timeout: float = 600.0, on_progress: ProgressCallback | None = None,
             poll_interval: float = 0.25) -> dict:
        """Block until the prompt finishes; return its ``/history`` entry.

        ``on_progress(event)`` gets dicts: ``{"event": "queued", "position": n}``, ``{"event": "running"}``,
        ``{"event": "executing", "node": id}``, ``{"event": "progress", "value", "max", "node"}`` (websocket only),
        ``{"event": "done", "status": ...}``. Raises :class:`PromptFailed` with ComfyUI's exception message when
        the prompt errored or was interrupted, :class:`PromptTimeout` after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        if on_progress is not None:
            on_progress = _dedupe(on_progress)
        last_state: tuple[str, int | None] | None = None
        last_queue_check = 0.0
        while True:
            entry = self.history(prompt_id)
            if entry is not None:  # ComfyUI writes the history entry when the prompt has finished
                status = entry.get("status") or {}
                if on_progress is not None:
                    on_progress({"event": "done", "status": status.get("status_str")})
                if status.get("status_str") == "error" or status.get("completed") is False:
                    raise _failure_from_status(prompt_id, status)
                return entry
            now = time.monotonic()
            if now >= deadline:
                raise PromptTimeout(f"prompt {prompt_id} did not finish within {timeout:.0f} s "
                                   f"(state: {last_state[0] if last_state else 'unknown'})")
            if on_progress is not None and now - last_queue_check > 1.0:
                last_queue_check = now
                state = self._queue_position(prompt_id)
                if state != last_state and state[0] != "unknown":
                    on_progress({"event": "queued", "position": state[1]} if state[0] == "pending"
                                else {"event": "running"})
                    last_state = state
            if self._ws is not None:
                self._drain_ws(prompt_id, on_progress, min(poll_interval * 4, max(deadline - now, 0.01)))
            else:
                time.sleep(min(poll_interval, max(deadline - now, 0.01)))

    # ------------------------------------------------------------------------------------------- outputs
    def outputs(self, prompt_id: str, types: Iterable[str] | None = None) -> list[dict]:
        """Image refs ``{"node_id", "filename", "subfolder", "type"}`` from the prompt's history outputs.

        ``types`` filters by ref type (``"output"`` for SaveImage, ``"temp"`` for PreviewImage); default: all.
        """
        entry = self.history(prompt_id)
        if entry is None:
            raise ComfyError(f"prompt {prompt_id} has no history yet (still running, or unknown)")
        wanted = set(types) if types is not None else None
        refs = []
        for node_id, out in (entry.get("outputs") or {}).items():
            for img in out.get("images", []) or []:
                if not isinstance(img, dict) or "filename" not in img:
                    continue
                if wanted is not None and img.get("type") not in wanted:
                    continue
                refs.append({"node_id": node_id, "filename": img["filename"], "subfolder": img.get("subfolder", ""),
                             "type": img.get("type", "output")})
        return refs

    def view(self, ref: dict) -> bytes:
        """The bytes of one output image (``GET /view``)."""
        q = urlencode({"filename": ref["filename"], "subfolder": ref.get("subfolder", ""),
                       "type": ref.get("type", "output")})
        r = self._request("GET", "/view?" + q)
        if r.status_code != 200:
            raise ComfyError(f"GET /view {ref} -> HTTP {r.status_code}")
        return r.content

    def download(self, ref: dict, out_dir) -> Path:
        """Save one output image under ``out_dir/<subfolder>/<filename>``; returns the path."""
        out_dir = Path(out_dir)
        sub = Path(ref.get("subfolder") or "")
        if sub.is_absolute() or ".." in sub.parts or "/" in ref["filename"] or "\\" in ref["filename"]:
            raise ComfyError(f"refusing a suspicious output path: {ref}")
        dest = out_dir / sub / ref["filename"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(self.view(ref))
        return dest


def _dedupe(cb: ProgressCallback) -> ProgressCallback:
    """Drop an event identical to the previous one (polling and the websocket may both report 'running')."""
    last: list[dict] = []

    def wrapped(event: dict) -> None:
        if last and last[0] == event:
            return
        last[:] = [event]
        cb(event)

    return wrapped


def _failure_from_status(prompt_id: str, status: dict) -> PromptFailed:
    for event, data in reversed(status.get("messages") or []):
        if event == "execution_error":
            return PromptFailed(prompt_id, data.get("exception_message", "unknown error"), data.get("node_id"),
                                data.get("node_type"), data.get("exception_type"), data.get("traceback"))
        if event == "execution_interrupted":
            return PromptFailed(prompt_id, "interrupted", data.get("node_id"), data.get("node_type"),
                                interrupted=True)
    return PromptFailed(prompt_id, f"status {status.get('status_str')!r} without an error message")


# ------------------------------------------------------------------------------------------------ workflows
def is_api_prompt(data: Any) -> bool:
    return isinstance(data, dict) and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def load_api_prompt(workflow_path, object_info: Callable[[], dict] | None = None) -> tuple[dict, Path]:
    """Read an API-format prompt; for a UI-format file use its twin ``<dir>/api/<name>.json``, or else convert it
    with the node schemas returned by ``object_info()`` (a running server's ``/object_info``).

    Returns ``(prompt, path actually read)``.
    """
    path = Path(workflow_path)
    if not path.is_file():
        raise FileNotFoundError(f"workflow not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise WorkflowFormatError(f"{path} is not valid JSON: {exc}") from exc
    if isinstance(data, dict) and is_api_prompt(data.get("prompt")):
        data = data["prompt"]  # a saved /prompt body
    if is_api_prompt(data):
        return data, path
    if is_ui_workflow(data):
        twin = path.parent / "api" / path.name
        if twin.is_file():
            twin_data = json.loads(twin.read_text(encoding="utf-8"))
            if is_api_prompt(twin_data):
                logger.info("%s is a UI-format workflow; using its API twin %s", path, twin)
                return twin_data, twin
            raise WorkflowFormatError(f"{twin} exists but is not an API-format prompt")
        if object_info is not None:
            try:
                prompt = ui_to_api(data, object_info())
            except ValueError as exc:
                raise WorkflowFormatError(f"{path}: cannot convert the UI-format workflow: {exc}. Export it from "
                                          "ComfyUI with 'Save (API)' and pass that file instead.") from exc
            logger.info("%s is a UI-format workflow; converted it with the server's /object_info", path)
            return prompt, path
        raise WorkflowFormatError(
            f"{path} is a UI-format workflow (the editor's graph), but ComfyUI's /prompt only accepts API format, and "
            f"no API twin was found at {twin}. UI -> API conversion happens in the ComfyUI frontend: open the workflow "
            "in ComfyUI and use 'Save (API)' (Workflow menu > Export (API)), then pass that file.")
    raise WorkflowFormatError(f"{path}: neither an API-format prompt ({{node_id: {{class_type, inputs}}}}) nor a "
                              "UI-format workflow")


def parse_value(text: str) -> Any:
    """JSON if it parses (numbers, true/false, null, lists, quoted strings), else the raw string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids matching ``ref``: a node id, else a ``_meta.title`` (exact, then case-insensitive), else a
    ``class_type``."""
    if ref in prompt:
        return [ref]
    for match in (lambda a, b: a == b, lambda a, b: a.casefold() == b.casefold()):
        ids = [nid for nid, node in prompt.items() if match(str((node.get("_meta") or {}).get("title", "")), ref)]
        if ids:
            return ids
    return [nid for nid, node in prompt.items() if node.get("class_type") == ref]


def apply_overrides(prompt: dict, sets: Iterable[str]) -> dict:
    """Return a copy of ``prompt`` with ``NODE.INPUT=VALUE`` overrides applied.

    NODE is a node id or a node title (``_meta.title``; a class_type also works when it is unique); INPUT is the
    input name; VALUE is parsed as JSON if possible, else used as a string. A title matching several nodes is an
    error (use the node id); a link input (``["4", 0]``) can be set too, by writing the JSON list.
    """
    out = copy.deepcopy(prompt)
    for item in sets:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        target, value_text = item.split("=", 1)
        if "." not in target:
            raise ValueError(f"--set {item!r}: expected NODE.INPUT=VALUE (no '.' between node and input)")
        node_ref, input_name = target.rsplit(".", 1)
        node_ref, input_name = node_ref.strip(), input_name.strip()
        ids = find_nodes(out, node_ref)
        if not ids:
            titles = sorted({f"{nid}:{(n.get('_meta') or {}).get('title', n.get('class_type'))}" for nid, n in
                             out.items()})
            raise ValueError(f"--set {item!r}: no node with id or title {node_ref!r}; nodes: {', '.join(titles)}")
        if len(ids) > 1:
            raise ValueError(f"--set {item!r}: {node_ref!r} matches nodes {ids}; use the node id")
        node = out[ids[0]]
        inputs = node.setdefault("inputs", {})
        if input_name not in inputs:
            logger.warning("--set %s: node %s (%s) had no input %r; adding it", item, ids[0], node.get("class_type"),
                           input_name)
        inputs[input_name] = parse_value(value_text)
    return out


def set_load_images(prompt: dict, image_name: str) -> list[str]:
    """Point every LoadImage node at ``image_name`` (in place); returns their ids."""
    ids = [nid for nid, node in prompt.items() if node.get("class_type") == "LoadImage"]
    for nid in ids:
        prompt[nid].setdefault("inputs", {})["image"] = image_name
    return ids


def _log_progress(event: dict) -> None:
    kind = event.get("event")
    if kind == "progress":
        logger.info("node %s: %s/%s", event.get("node"), event.get("value"), event.get("max"))
    elif kind == "queued":
        logger.info("queued (position %s)", event.get("position"))
    elif kind in ("running", "executing"):
        logger.info("running%s", f" node {event['node']}" if event.get("node") else "")
    elif kind == "done":
        logger.info("finished: %s", event.get("status"))


def run_workflow(url: str, workflow_path, sets: Iterable[str] = (), image=None, out_dir="outputs/run",
                 timeout: float = 3600.0, on_progress: ProgressCallback | None = _log_progress) -> list[Path]:
    """Queue a workflow file on a running ComfyUI, wait, and download its output images.

    ``image``: upload this file and set it on every LoadImage node (before ``sets``, so an explicit ``--set`` wins).
    Returns the downloaded paths.
    """
    with ComfyClient(url) as client:
        prompt, used = load_api_prompt(workflow_path, object_info=client.object_info)
        prompt = copy.deepcopy(prompt)
        if image is not None:
            name = client.upload_image(image)
            ids = set_load_images(prompt, name)
            if not ids:
                logger.warning("--image given but %s has no LoadImage node", used)
            else:
                logger.info("uploaded %s as %r for LoadImage node(s) %s", image, name, ", ".join(ids))
        prompt = apply_overrides(prompt, sets)
        prompt_id = client.queue(prompt)
        logger.info("queued %s as prompt %s on %s", used, prompt_id, client.url)
        client.wait(prompt_id, timeout=timeout, on_progress=on_progress)
        refs = client.outputs(prompt_id)
        paths = [client.download(ref, out_dir) for ref in refs]
    if not paths:
        logger.warning("the workflow finished but produced no output images")
    return paths
