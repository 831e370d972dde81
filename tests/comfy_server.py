"""A real ComfyUI server process for the tests (`main.py --cpu` on 127.0.0.1, temporary base
directory, the pack linked into its custom_nodes), shared by the HTTP, API-client and browser
tests: one session-scoped fixture, started once."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import COMFYUI, REPO

PACK_NAME = "comfyui_siso"
CKPT_NAME = "siso_tiny_sd15.safetensors"
STARTUP_TIMEOUT = 180
PROMPT_TIMEOUT = 600


class Server:
    def __init__(self, base: pathlib.Path, port: int, proc: subprocess.Popen, log_path: pathlib.Path):
        self.base, self.port, self.proc, self.log_path = base, port, proc, log_path
        self.url = f"http://127.0.0.1:{port}"
        self.start_log = ""   # the whole log from the process's start until it first answered

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError as error:
            return f"<no server log: {error}>"

    def get(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def post(self, path: str, payload: dict, timeout: float = 60):
        """(HTTP status, decoded JSON body); HTTP errors are returned, not raised."""
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                data = response.read()
                return response.status, (json.loads(data) if data.strip() else {})
        except urllib.error.HTTPError as error:
            body = error.read()
            try:
                return error.code, json.loads(body)
            except ValueError:
                return error.code, {"raw": body.decode(errors="replace")}

    def alive(self) -> bool:
        return self.proc.poll() is None


# What ComfyUI's nodes.py logs when a custom node (ours or any other) fails to import, and any
# traceback at all: none may appear while the server starts.
START_LOG_PROBLEMS = ("Traceback (most recent call last)", "IMPORT FAILED", "Cannot import")


def start_log_problems(log: str) -> list:
    """The lines of a start log that show an import failure or a traceback."""
    return [line for line in log.splitlines() if any(problem in line for problem in START_LOG_PROBLEMS)]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_subject_png(path: pathlib.Path, size=(64, 64), seed=0):
    import numpy as np
    from PIL import Image
    pixels = (np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_photo_with_drawn_mask(path: pathlib.Path):
    """What ComfyUI's mask editor saves: the photo with alpha 0 where the user painted (the
    subject to replace), which LoadImage turns into MASK = 1 there."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(1)
    rgba = np.concatenate([(rng.random((64, 64, 3)) * 255).astype("uint8"), np.full((64, 64, 1), 255, "uint8")], -1)
    rgba[16:48, 20:44, 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)


def _stop(proc: subprocess.Popen):
    """Stop the server we started (its own process group, by its id)."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="session")
def server():
    import checkpoint
    import tiny

    base = pathlib.Path(tempfile.mkdtemp(prefix="siso-server-"))
    proc = None
    try:
        (base / "custom_nodes").mkdir(parents=True)
        (base / "custom_nodes" / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        checkpoint.write_tiny_sd15_checkpoint(base / "models" / "checkpoints" / CKPT_NAME)
        # The templates name the user's checkpoint sd_turbo.safetensors. ComfyUI's newer frontend
        # (1.49, ComfyUI 0.33) checks a loaded workflow's model and input files and flags absent
        # ones; here that name is the tiny SD1.5 too, so the browser tests see what a user with
        # the files sees.
        (base / "models" / "checkpoints" / "sd_turbo.safetensors").symlink_to(CKPT_NAME)
        tiny.write_feature_files(str(base / "models" / "siso"))
        import tiny_segmentation
        tiny_segmentation.write_segmentation_files(str(base / "models"))
        _write_subject_png(base / "input" / "subject.png")
        _write_photo_with_drawn_mask(base / "input" / "photo_masked.png")
        # ... and the editing templates name the user's photo photo.png (the same check applies).
        _write_subject_png(base / "input" / "photo.png")
        # ... and the several-photos template a second photo of the subject (another size)
        _write_subject_png(base / "input" / "subject_2.png", size=(80, 56), seed=2)
        (base / "user").mkdir(exist_ok=True)

        port = _free_port()
        log_path = base / "server.log"
        command = [sys.executable, str(COMFYUI / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                   "--disable-auto-launch", "--disable-api-nodes", "--base-directory", str(base),
                   # keep ComfyUI's database inside the temporary base too (default: the ComfyUI tree)
                   "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, cwd=str(base), stdout=log, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True)
        srv = Server(base, port, proc, log_path)

        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if not srv.alive():
                pytest.fail(f"ComfyUI exited with code {proc.returncode} during startup:\n{srv.log_tail()}")
            try:
                srv.get("/object_info", timeout=10)
                # every custom node is imported before the server listens: this is the whole start
                srv.start_log = log_path.read_text(errors="replace")
                break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ComfyUI did not answer GET /object_info within {STARTUP_TIMEOUT} s:\n{srv.log_tail()}")
            time.sleep(1)
        yield srv
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def object_info(server):
    return server.get("/object_info", timeout=60)


# ----------------------------------------------------------------------------- websocket listener
class WebSocketListener(threading.Thread):
    """Collects the JSON messages ComfyUI sends to one client id (binary previews are counted)."""

    def __init__(self, port: int, client_id: str):
        super().__init__(daemon=True)
        import websocket
        self.ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws?clientId={client_id}", timeout=30)
        self.ws.settimeout(1.0)
        self.messages, self.binary_frames, self.error = [], 0, None
        self.stopping = threading.Event()

    def run(self):
        import websocket
        while not self.stopping.is_set():
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as error:  # closed by us or by the server
                if not self.stopping.is_set():
                    self.error = error
                return
            if isinstance(frame, bytes):
                self.binary_frames += 1
            elif frame:
                self.messages.append(json.loads(frame))

    def wait_for(self, kind: str, timeout: float = 30) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.get("type") == kind for m in list(self.messages)):
                return True
            time.sleep(0.1)
        return False

    def close(self):
        self.stopping.set()
        self.join(timeout=5)
        try:
            self.ws.close()
        except Exception:
            pass


def wait_for_history(server: Server, prompt_id: str, timeout: float = PROMPT_TIMEOUT) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.alive():
            pytest.fail(f"ComfyUI died while running prompt {prompt_id}:\n{server.log_tail()}")
        history = server.get(f"/history/{prompt_id}")
        entry = history.get(prompt_id)
        if entry is not None:
            status = entry.get("status") or {}
            if status.get("completed") or status.get("status_str") in ("success", "error"):
                return entry
        time.sleep(1)
    pytest.fail(f"prompt {prompt_id} did not finish within {timeout} s:\n{server.log_tail()}")


def _execution_errors(entry: dict) -> str:
    errors = [m[1] for m in entry.get("status", {}).get("messages", []) if m[0] == "execution_error"]
    return "\n".join(f"node {e.get('node_id')} ({e.get('node_type')}): {e.get('exception_type')}: "
                     f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors)
