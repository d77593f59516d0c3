"""The server helper's failure path, without a browser (runs in plain ``make test``, < 1 s)."""

from __future__ import annotations

import pytest
from lab_server import LabServer


def test_server_that_exits_reports_its_log_tail(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    (notebooks / "00_x.ipynb").write_text("{}")
    # /bin/sh takes "-m jupyter lab ..." as: job control on, run the script "jupyter": no such file
    server = LabServer(notebooks, tmp_path / "work", python="/bin/sh")
    with pytest.raises(RuntimeError) as err, server:
        pass
    message = str(err.value)
    assert "JupyterLab exited with code" in message and "before answering" in message, message
    assert "jupyter" in message.split("its log", 1)[1], message  # the shell's complaint, quoted
    assert (tmp_path / "work" / "notebooks" / "00_x.ipynb").read_text() == "{}"  # a copy
    assert server.proc is None  # stopped


def test_missing_notebooks_folder_is_named(tmp_path):
    server = LabServer(tmp_path / "nope", tmp_path / "work")
    with pytest.raises(FileNotFoundError, match="nope"):
        server.start()
