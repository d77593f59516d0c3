"""A throw-away JupyterLab server for the browser tests (issue 9).

``LabServer`` copies ``notebooks/`` into a temporary root (so executed outputs are never saved
into the repository's notebooks), points every Jupyter state directory (workspaces, settings,
runtime, config) at that temporary folder, starts ``python -m jupyter lab`` on a free port of
127.0.0.1 with a random token, waits until ``/api/status`` answers, and stops everything it
started, kernels included, whatever happened.

The settings it writes make the page deterministic and quiet on a closed network: every cell is
kept in the DOM (``windowingMode: none``), the default kernel starts without a dialog, and news,
update checks and the extension manager (which would all reach the internet) are off.

Only the standard library is used here: ``make test`` imports this file while skipping the
browser tests, without Playwright installed.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 90.0  # issue 9: fail when the server does not answer within 90 s

# JupyterLab user settings, written as <settings dir>/<package>/<plugin>.jupyterlab-settings
LAB_SETTINGS = {
    "@jupyterlab/notebook-extension/tracker": {
        "windowingMode": "none",  # every cell stays in the DOM, so the page can be inspected
        "autoStartDefaultKernel": True,  # no "Select Kernel" dialog for notebooks without one
        "maxNumberOutputs": 1000,  # never hide outputs behind "Show more outputs" (0 hides all)
    },
    "@jupyterlab/apputils-extension/notification": {
        "fetchNews": "false",  # no "would you like news?" toast, no request to the internet
        "checkForUpdates": False,
    },
    "@jupyterlab/extensionmanager-extension/plugin": {"enabled": False},  # would query PyPI
}

# Server-side configuration (JUPYTER_CONFIG_DIR/jupyter_server_config.json)
SERVER_CONFIG = {
    "LabApp": {
        "news_url": None,
        "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
        "extension_manager": "readonly",  # the "pypi" manager would query PyPI
        "expose_app_in_browser": True,  # window.jupyterapp: the tests read kernel state from it
    },
    "ServerApp": {"open_browser": False, "port_retries": 0},
}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent id, start time) of a live process from /proc/<pid>/stat, or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may hold spaces: count fields after its closing ')'
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[1]), fields[19]  # ppid (field 4), starttime (field 22)


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[tuple[int, str]]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        info = _proc_stat(int(entry.name))
        if info is not None:
            children.setdefault(info[0], []).append((int(entry.name), info[1]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child[0])
    return found


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as JSON atomically (temp file in the same folder, then os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


class LabServer:
    """One JupyterLab server on a throw-away copy of a notebooks folder.

    Use as a context manager::

        with LabServer(Path("notebooks"), tmp_dir) as lab:
            page.goto(lab.url("lab/tree/00_tour.ipynb"))

    Attributes: ``root`` (the copied notebooks folder the server serves), ``port``, ``token``,
    ``log_path`` (server stdout + stderr).
    """

    def __init__(self, notebooks_dir: Path, work_dir: Path, python: str = sys.executable) -> None:
        self.notebooks_dir = Path(notebooks_dir)
        self.work_dir = Path(work_dir)
        self.python = python
        self.root = self.work_dir / "notebooks"
        self.log_path = self.work_dir / "jupyter-lab.log"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self._log = None

    # --- URLs and the REST API ---------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def url(self, path: str) -> str:
        """Absolute URL of ``path`` with the token, e.g. ``url("lab/tree/00_tour.ipynb")``."""
        sep = "&" if "?" in path else "?"
        return f"{self.base_url}{path.lstrip('/')}{sep}token={self.token}"

    def api(self, path: str, method: str = "GET", timeout: float = 10.0):
        """Call the server's REST API (``path`` like ``"api/kernels"``); returns parsed JSON."""
        req = urllib.request.Request(
            self.base_url + path.lstrip("/"),
            method=method,
            headers={"Authorization": f"token {self.token}"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def kernel_states(self) -> list[str]:
        """``execution_state`` of every running kernel (``"idle"``, ``"busy"``, ``"starting"``,
        ...)."""
        return [k.get("execution_state", "unknown") for k in self.api("api/kernels")]

    def shutdown_sessions(self) -> None:
        """Close every notebook session, shutting its kernel down (frees the 2 shared cores)."""
        for session in self.api("api/sessions"):
            try:
                self.api(f"api/sessions/{session['id']}", method="DELETE", timeout=30.0)
            except (urllib.error.URLError, OSError):
                pass

    def log_tail(self, n_lines: int = 40) -> str:
        """The last ``n_lines`` lines of the server log."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no server log)"
        return "\n".join(lines[-n_lines:])

    # --- life cycle ----------------------------------------------------------------------------
    def _prepare(self) -> dict[str, str]:
        """Copy the notebooks, write settings/config; return the server's environment."""
        if not self.notebooks_dir.is_dir():
            raise FileNotFoundError(f"notebooks folder {self.notebooks_dir} does not exist")
        shutil.copytree(
            self.notebooks_dir,
            self.root,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
        )
        dirs = {
            name: self.work_dir / sub
            for name, sub in [
                ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"),
                ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                ("JUPYTER_RUNTIME_DIR", "runtime"),
                ("JUPYTER_CONFIG_DIR", "config"),
                ("IPYTHONDIR", "ipython"),
                ("MPLCONFIGDIR", "matplotlib"),
            ]
        }
        for d in dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        for plugin, values in LAB_SETTINGS.items():
            _write_json(dirs["JUPYTERLAB_SETTINGS_DIR"] / f"{plugin}.jupyterlab-settings", values)
        _write_json(dirs["JUPYTER_CONFIG_DIR"] / "jupyter_server_config.json", SERVER_CONFIG)

        env = dict(os.environ)
        env.update({k: str(v) for k, v in dirs.items()})
        env["MRCNN_EDU_QUICK"] = "1"
        env.pop("MPLBACKEND", None)  # the kernel's own inline backend must draw the figures
        env.pop("JUPYTER_TOKEN", None)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> LabServer:
        """Start the server and wait until it answers; raise RuntimeError with the log tail."""
        env = self._prepare()
        cmd = [
            self.python, "-m", "jupyter", "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
        ]  # fmt: skip
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")  # CI containers run as root; Jupyter refuses it otherwise
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=self.root,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() can kill it as a whole
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {self.proc.returncode} before answering; "
                    f"the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                self.api("api/status", timeout=2.0)
                return self
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"JupyterLab did not answer on {self.base_url} within {START_TIMEOUT_S:.0f} s; "
                    f"the end of its log ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the server, its process group and every kernel it started; safe to call twice."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            # kernels run in sessions of their own: note their ids before the server goes
            kernels = _descendants(proc.pid)
            try:
                self.shutdown_sessions()
            except (urllib.error.URLError, OSError, ValueError):
                pass
            for sig, wait_s in [(signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)]:
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
            for pid, started in kernels:
                info = _proc_stat(pid)
                if info is None or info[1] != started:  # gone (or the id now names another)
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
