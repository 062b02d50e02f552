"""Shared fixtures: an isolated cache, no network beyond loopback, deterministic weights."""
from __future__ import annotations

import functools
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def zoo_home(tmp_path_factory, monkeypatch) -> Iterator[Path]:
    """Every test gets its own empty $ZOO_HOME and starts online."""
    home = tmp_path_factory.mktemp("zoo_home")
    monkeypatch.setenv("ZOO_HOME", str(home))
    monkeypatch.delenv("ZOO_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield home
    shutil.rmtree(home, ignore_errors=True)


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture
def http_root(tmp_path):
    """A folder served on 127.0.0.1; yields (folder, base_url). Loopback only."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
