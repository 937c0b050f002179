"""Shared test set-up: user state isolated, Hub offline, unexpected CLI errors re-raised."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

_getaddrinfo = socket.getaddrinfo
NETWORK_ATTEMPTS: list[str] = []
"""Hosts beyond loopback that code under test tried to reach (a test may assert on it)."""


def _loopback_only(host: Any, *args: Any, **kwargs: Any) -> Any:
    """Tests never reach the network beyond loopback: another host name fails at once, as an
    unknown name (the error code and class a machine without DNS gives), and is recorded. A test
    whose Hub URL was built from huggingface_hub's import-time endpoint found this way."""
    name = host.decode() if isinstance(host, bytes) else host
    if name is not None and name != "localhost" and not str(name).startswith(("127.", "::1")):
        NETWORK_ATTEMPTS.append(str(name))
        raise socket.gaierror(socket.EAI_NONAME, f"tests reach loopback only, not {name!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.getaddrinfo = _loopback_only  # this process; subprocesses run offline (HF_HUB_OFFLINE=1)


@pytest.fixture(autouse=True)
def _isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No test sees the user's Hub cache, token or debug settings, nor reaches a host beyond loopback."""
    home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(home / "xdg-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    monkeypatch.delenv("MPT_TOOLS_DEBUG", raising=False)
    monkeypatch.setenv("MPT_TOOLS_RAISE_UNEXPECTED", "1")
    NETWORK_ATTEMPTS.clear()
    yield
    assert not NETWORK_ATTEMPTS, f"the test tried to reach {sorted(set(NETWORK_ATTEMPTS))} (loopback only)"


def write_random_source(path: Path, n: int, t: int, r: int, d: int, seed: int = 0) -> Path:
    """A bare float32 MPT source file of random normal tensors, written with our own writer."""
    import numpy as np

    from mpt_tools.formats import from_numpy, safetensors_bytes

    rng = np.random.default_rng(seed)
    tensors = {
        "prompt_embeddings": rng.standard_normal((t, d), dtype=np.float32),
        "prefix_task_cols": rng.standard_normal((n, t, r), dtype=np.float32),
        "prefix_task_rows": rng.standard_normal((n, r, d), dtype=np.float32),
    }
    path.write_bytes(safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}, {"format": "pt"}))
    return path


def run_cli(*args: str) -> Result:
    """Run the CLI in-process; stdout and stderr are kept apart."""
    from mpt_tools.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture
def cli_run():
    """The :func:`run_cli` helper as a fixture."""
    return run_cli


def watch_mapped_average(monkeypatch: Any, workers: int = 1) -> list[Any]:
    """Force the large-average path (column windows on ``workers`` threads, read from a leased
    mapping) for factors of any size; returns the list the leases taken are appended to (None
    where none could be had)."""
    import contextlib

    from mpt_tools import factors, formats
    from mpt_tools import torchmean as tm

    monkeypatch.setattr(tm, "WINDOW_BYTES", 0)
    monkeypatch.setattr(factors, "_workers", lambda: workers)
    leases: list[Any] = []
    real = formats._leased_map

    @contextlib.contextmanager
    def watched(fd: int, size: int) -> Any:
        with real(fd, size) as lease:
            leases.append(lease)
            yield lease

    monkeypatch.setattr(formats, "_leased_map", watched)
    return leases
