"""Reading under hostile conditions (issue 15): files that are not regular (FIFOs, devices,
symlinks to them, folders) are refused without blocking, wherever they are found; a file that
changes while it is read is refused with "changed while reading", never a SIGBUS; bombs and
claims in pickles are refused before anything is inflated or allocated, with no torch warnings.

Static hostile files are in the corpus (tests/corpus.py, reading_cases); what needs a FIFO, a
device or a file changing under the reader is here. Every FIFO test runs the CLI in a child
process with a timeout, so a regression hangs nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, run_cli, watch_mapped_average, write_random_source

from mpt_tools.errors import ConfigError, FormatError
from mpt_tools.paths import check_regular, open_regular, read_small

needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
PY = sys.executable


def cli_child(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The CLI in a child process (a FIFO that blocked would hang only the child)."""
    env = {**os.environ, "MPT_TOOLS_RAISE_UNEXPECTED": "0"}
    return subprocess.run(
        [PY, "-m", "mpt_tools", *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
    )


def adapter_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    for f in (FIXTURES / "causal").iterdir():
        if f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


# ---- files that are not regular -----------------------------------------------------------------


@needs_fifo
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_model.bin", "adapter_config.json"])
@pytest.mark.parametrize("command", ["validate", "inspect", "verify"])
def test_a_fifo_in_an_adapter_folder_is_refused_without_blocking(tmp_path: Path, name: str, command: str) -> None:
    folder = adapter_copy(tmp_path)
    if name == "adapter_model.bin":
        (folder / "adapter_model.safetensors").unlink()
    else:
        (folder / name).unlink()
    os.mkfifo(folder / name)
    start = time.monotonic()
    line = one_error_line(cli_child(command, str(folder)))
    assert f"{folder / name}: is a FIFO (named pipe), not a regular file" in line
    assert time.monotonic() - start < 60


@needs_fifo
def test_a_fifo_given_directly_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "w.safetensors"
    os.mkfifo(fifo)
    line = one_error_line(cli_child("validate", str(fifo)))
    assert "is a FIFO (named pipe), not a regular file or folder" in line


@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_devices_and_symlinks_to_them_are_named(tmp_path: Path, device: str) -> None:
    if not os.path.exists(device):
        pytest.skip(f"no {device}")
    direct = run_cli("validate", device)
    assert direct.exit_code == 1 and "is a character device, not a regular file or folder" in direct.stderr
    folder = adapter_copy(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    os.symlink(device, folder / "adapter_model.safetensors")
    result = run_cli("validate", str(folder))
    assert result.exit_code == 1
    assert f"is a symlink to {device}, which is a character device, not a regular file" in result.stderr
    assert "bytes" not in result.stderr  # never "the file has -8 bytes"


def test_a_config_that_is_a_device_or_folder_is_refused(tmp_path: Path) -> None:
    folder = adapter_copy(tmp_path)
    (folder / "adapter_config.json").unlink()
    os.symlink("/dev/zero", folder / "adapter_config.json")
    result = run_cli("validate", str(folder))
    assert result.exit_code == 1 and "character device, not a regular file" in result.stderr
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    result = run_cli("validate", str(folder))
    assert result.exit_code == 1 and "adapter_config.json: is a directory, not a regular file" in result.stderr


@needs_fifo
def test_a_fifo_config_beside_a_weights_file_is_refused(tmp_path: Path) -> None:
    folder = adapter_copy(tmp_path)
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")
    line = one_error_line(cli_child("validate", str(folder / "adapter_model.safetensors")))
    assert "adapter_config.json: is a FIFO (named pipe), not a regular file" in line


@needs_fifo
def test_a_fifo_base_model_config_is_a_warning_not_a_hang(tmp_path: Path) -> None:
    from mpt_tools.hub.base_model import check_base_model

    base = tmp_path / "base"
    base.mkdir()
    os.mkfifo(base / "config.json")
    findings = check_base_model(8, str(base))
    assert len(findings) == 1 and "is a FIFO (named pipe), not a regular file" in findings[0].message


@needs_fifo
def test_the_helpers_refuse_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="FIFO"):
        open_regular(fifo).__enter__()
    with pytest.raises(ConfigError, match="FIFO"):
        read_small(fifo, 100, ConfigError)
    with pytest.raises(FormatError, match="FIFO"):
        check_regular(fifo)
    regular = tmp_path / "r"
    regular.write_bytes(b"x" * 10)
    assert read_small(regular, 10) == b"x" * 10 and read_small(regular, 9) is None
    with open_regular(regular) as fh:
        assert os.get_blocking(fh.fileno())  # O_NONBLOCK is cleared before the read


# ---- files that change while they are read --------------------------------------------------------


def test_a_file_truncated_after_its_header_was_read_is_changed_while_reading(tmp_path: Path) -> None:
    from mpt_tools.formats import open_safetensors

    path = write_random_source(tmp_path / "s.safetensors", n=5, t=3, r=2, d=4)
    f = open_safetensors(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    for read in (f.map, f.read):
        with pytest.raises(FormatError, match=r"changed while reading .*shrank .*truncated"):
            read("prefix_task_rows")


def test_a_file_replaced_or_rewritten_between_reads_is_refused(tmp_path: Path) -> None:
    from mpt_tools.formats import open_safetensors

    path = write_random_source(tmp_path / "s.safetensors", n=5, t=3, r=2, d=4)
    f = open_safetensors(path)
    other = write_random_source(tmp_path / "o.safetensors", n=5, t=3, r=2, d=4, seed=1)
    os.replace(other, path)
    with pytest.raises(FormatError, match=r"changed while reading .*replaced"):
        f.read("prompt_embeddings")


def test_a_file_truncated_during_the_read_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The change is seen after the bytes were read (size and mtime on the same descriptor)."""
    from mpt_tools import formats

    path = write_random_source(tmp_path / "s.safetensors", n=50, t=30, r=2, d=64)
    f = formats.open_safetensors(path)
    real = formats._read_fd

    def read_then_truncate(fd: int, view: memoryview, offset: int) -> int:
        got = real(fd, view, offset)
        os.truncate(path, 100)
        return got

    monkeypatch.setattr(formats, "_read_fd", read_then_truncate)
    with pytest.raises(FormatError, match="changed while reading"):
        f.map("prefix_task_rows")


def test_a_file_that_grows_between_the_chunked_reads_of_the_average_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The numpy average reads its chunks of tasks on one open file (``row_reader``) and checks the
    file once, after the last read: a change after any chunk is still refused, and no mean comes
    back. Each chunk is one task here (``CHUNK_BYTES`` of one byte)."""
    from mpt_tools import formats, torchmean
    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    path = write_random_source(tmp_path / "s.safetensors", n=9, t=3, r=2, d=64)
    ckpt = load_source(path)
    real, calls = formats._read_fd, []

    def read_then_grow(fd: int, view: memoryview, offset: int) -> int:
        got = real(fd, view, offset)
        calls.append(offset)
        if len(calls) == 2:  # after the second chunk: the reads go on, the file has grown
            with open(path, "ab") as fh:
                fh.write(b"\0" * 8)
        return got

    monkeypatch.setattr(torchmean, "CHUNK_BYTES", 1)
    monkeypatch.setattr(formats, "_read_fd", read_then_grow)
    with pytest.raises(FormatError, match=r"changed while reading .*grew"):
        average_factors(ckpt, engine="numpy")
    assert len(calls) > 2  # the later chunks were read on the same descriptor


def test_row_reader_reads_what_read_rows_reads(tmp_path: Path) -> None:
    """``row_reader``: the same bytes as ``read_rows`` (into a buffer or not), logged the same way,
    on one descriptor that is closed when the block ends."""
    from mpt_tools.formats import open_safetensors

    path = write_random_source(tmp_path / "s.safetensors", n=7, t=3, r=2, d=8)
    f = open_safetensors(path)
    want = [f.read_rows("prefix_task_rows", a, a + 2).array.tobytes() for a in range(0, 7, 2)]
    f.reads.clear()
    before = set(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    buf = np.empty(2 * 2 * 8, dtype=np.float32)
    with f.row_reader() as read:
        got = [read("prefix_task_rows", a, a + 2, out=buf).array.tobytes() for a in range(0, 7, 2)]
        assert read("prompt_embeddings", 0, 3).array.tobytes() == f.read("prompt_embeddings").array.tobytes()
    assert got == want
    assert [r[:3] for r in f.reads[:4]] == [("prefix_task_rows", a, min(7, a + 2)) for a in range(0, 7, 2)]
    if before is not None:
        assert set(os.listdir("/proc/self/fd")) == before


def test_map_is_sigbus_free_when_the_file_is_truncated_after_reading(tmp_path: Path) -> None:
    """With mmap, touching the array after a truncation killed the process with SIGBUS. The
    tensor is now in memory: the child process finishes and prints the sum."""
    path = write_random_source(tmp_path / "s.safetensors", n=64, t=64, r=8, d=256)
    script = (
        "import os, sys, numpy as np\n"
        "from mpt_tools.formats import open_safetensors\n"
        "f = open_safetensors(sys.argv[1])\n"
        "arr = f.map('prefix_task_rows').array\n"
        "os.truncate(sys.argv[1], 0)\n"
        "print(float(np.asarray(arr, dtype=np.float64).sum()))\n"
    )
    result = subprocess.run([PY, "-c", script, str(path)], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert float(result.stdout) != 0.0


def test_a_pickle_that_changes_while_torch_reads_it_is_refused(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from mpt_tools import formats

    path = tmp_path / "a.bin"
    torch.save({"prompt_embeddings": torch.ones(4, 8)}, path)
    real = torch.load

    def load_then_append(*args, **kwargs):
        out = real(*args, **kwargs)
        with open(path, "ab") as fh:
            fh.write(b"\0" * 64)
        return out

    monkeypatch.setattr(torch, "load", load_then_append)
    with pytest.raises(FormatError, match=r"changed while reading .*grew"):
        formats.open_pickle(path)


def test_reads_are_bitwise_the_bytes_of_the_file(tmp_path: Path) -> None:
    """map() (what the average reduces) returns exactly read()'s bytes, in writable memory of its
    own: writing to it never reaches the file."""
    from mpt_tools.formats import open_safetensors

    path = write_random_source(tmp_path / "s.safetensors", n=7, t=5, r=3, d=16)
    before = path.read_bytes()
    f = open_safetensors(path)
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        mapped, read = f.map(name), f.read(name)
        assert mapped.shape == read.shape and mapped.array.tobytes() == read.array.tobytes()
        info = f.infos[name]
        assert mapped.array.tobytes() == before[info.start : info.end]
        mapped.array[...] = 0
    assert path.read_bytes() == before


# ---- pickle bombs: refused before inflating or allocating, quickly and without warnings -----------


def test_a_deflate_bomb_is_refused_from_the_central_directory(tmp_path: Path) -> None:
    """A deflated record that inflates to 64 MiB: refused from the central directory alone, without
    inflating anything (the same shape at 0.8 MB inflated to 1.8 GB before)."""
    torch = pytest.importorskip("torch")
    import io
    import zipfile

    from corpus import deflated_zip

    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.ones(4, 8)}, buf)
    bomb = deflated_zip(buf.getvalue(), 64 << 20)
    path = tmp_path / "bomb.bin"
    path.write_bytes(bomb)
    with zipfile.ZipFile(path) as z:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    start = time.perf_counter()
    result = run_cli("validate", str(path))
    elapsed = time.perf_counter() - start
    assert result.exit_code == 1 and "is compressed" in result.stderr and "67,108,864" in result.stderr
    assert elapsed < 5


def test_pickle_refusals_print_no_torch_warnings(tmp_path: Path) -> None:
    """Sparse, meta, quantized and complex tensors: one line each, nothing from torch on stderr."""
    from corpus import reading_cases

    cases = {c.name: c for c in reading_cases(tmp_path)}
    for name, word in [
        ("bin-sparse-tensor", "sparse"),
        ("bin-sparse-csr-tensor", "sparse"),
        ("bin-meta-tensor", "meta-device"),
        ("bin-quantized-tensor", "quantized"),
        ("bin-complex128", "complex"),
        ("bin-zero-stride-huge", "100,000,000,000,000 elements but its storage holds 1"),
        ("bin-legacy-storage-claim", "4,000,000,000,000 bytes"),
    ]:
        line = one_error_line(cli_child("validate", str(cases[name].path)))
        assert word in line and str(cases[name].path) in line, line


def test_claims_are_checked_against_the_memory_limit(tmp_path: Path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from mpt_tools.formats import open_pickle

    path = tmp_path / "a.bin"
    torch.save({"prompt_embeddings": torch.zeros(1000, 1000)}, path)
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", str(3_999_999))
    with pytest.raises(FormatError, match=r"claims 4,000,000 bytes, more than MPT_TOOLS_MAX_TENSOR_BYTES \(3,999,999"):
        open_pickle(path)  # the limit the variable set is named as such, not as the machine's memory
    monkeypatch.setenv("MPT_TOOLS_MAX_TENSOR_BYTES", str(4_000_000))
    assert open_pickle(path).infos["prompt_embeddings"].shape == (1000, 1000)


def test_an_unreadable_bin_message_is_whole_sentences(tmp_path: Path) -> None:
    """Torch's message is reduced to its reason, never cut in the middle of a sentence."""
    path = tmp_path / "adapter_model.bin"
    path.write_bytes(b"\x80\x02" + bytes(range(3, 200)))
    result = run_cli("validate", str(path))
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "Re-running" not in line and "weights_only" not in line and line.endswith(")"), line


# ---- numbers at the edge ------------------------------------------------------------------------


def test_float64_beyond_float32_is_named_without_numpy_warnings(tmp_path: Path) -> None:
    from mpt_tools.formats import from_numpy, safetensors_bytes

    rng = np.random.default_rng(0)
    tensors = {
        "prompt_embeddings": rng.standard_normal((4, 8)),
        "prefix_task_cols": rng.standard_normal((3, 4, 2)) * 0.02,
        "prefix_task_rows": rng.standard_normal((3, 2, 8)) * 0.02,
    }
    tensors["prefix_task_rows"][2, 1, 1] = -3.4e39
    tensors["prefix_task_cols"][0, 0, 0] = np.nan
    path = tmp_path / "big.safetensors"
    path.write_bytes(safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}, {"format": "pt"}))
    result = cli_child("validate", str(path))
    assert result.returncode == 1
    assert "RuntimeWarning" not in result.stderr and "overflow" not in result.stderr.lower()
    assert "1 float64 values beyond float32's range (max |x| = 3.4e+39; first in task 2)" in result.stdout
    assert "1 NaN/Inf values (first in task 0)" in result.stdout


def test_float64_at_float32_max_is_in_range(tmp_path: Path) -> None:
    """A float64 value that rounds to float32's largest finite value is not beyond the range."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.checks import F32_OVERFLOW, value_findings
    from mpt_tools.formats import from_numpy, safetensors_bytes

    f32max = float(np.finfo(np.float32).max)
    assert np.float32(np.nextafter(F32_OVERFLOW, 0)) == np.float32(f32max)
    with np.errstate(over="ignore"):
        assert np.isinf(np.float32(F32_OVERFLOW))
    tensors = {
        "prompt_embeddings": np.full((2, 4), np.nextafter(F32_OVERFLOW, 0)),
        "prefix_task_cols": np.zeros((1, 2, 1)),
        "prefix_task_rows": np.zeros((1, 1, 4)),
    }
    path = tmp_path / "edge.safetensors"
    path.write_bytes(safetensors_bytes({k: from_numpy(v) for k, v in tensors.items()}))
    assert value_findings(load_source(path)) == []


# --- the leased mapping of a large average (issue 16) ------------------------------------------------


needs_leases = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux read leases")


@needs_leases
def test_a_truncation_waits_for_the_mapped_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped file that shrinks would kill the process with SIGBUS; under the read lease another
    process's truncate waits until the average is done (the lease break is seen: the rest is read
    with preadv). The mean is the file's as it was, and the truncation happens after."""
    import signal

    from mpt_tools import factors, formats
    from mpt_tools import torchmean as tm
    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    path = write_random_source(tmp_path / "s.safetensors", n=400, t=3, r=2, d=64)  # rows: C = 128
    want = [a.tobytes() for a in average_factors(load_source(path))]
    handler = signal.getsignal(signal.SIGIO)
    leases, ckpt = watch_mapped_average(monkeypatch), load_source(path)
    monkeypatch.setattr(tm, "CHUNK_BYTES", 1024)  # many chunks, so the break lands mid-way
    monkeypatch.setattr(factors, "MAPPED_CHUNK_BYTES", 1024)
    real_feed, real_read, child, copied = tm.Cascade.feed, formats._read_fd, [], []

    def read_fd(fd: int, view: memoryview, offset: int) -> int:
        copied.append(offset)
        return real_read(fd, view, offset)

    monkeypatch.setattr(formats, "_read_fd", read_fd)

    def feed_then_truncate(self: tm.Cascade, items: np.ndarray) -> None:
        real_feed(self, items)
        if not child and self.count >= 100 and self.acc[0].shape[-1] == 128:  # mid-way through the rows
            script = "import os, sys, time; t = time.time(); os.truncate(sys.argv[1], 100); print(time.time())"
            child.append(subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True))
            time.sleep(0.5)  # the child is in its truncate now, held back by the lease

    monkeypatch.setattr(tm.Cascade, "feed", feed_then_truncate)
    got = [a.tobytes() for a in average_factors(ckpt, engine="numpy")]
    done = time.time()
    out, _ = child[0].communicate(timeout=60)
    assert got == want
    assert float(out) >= done - 0.05  # the truncate returned only after the average was done
    assert os.path.getsize(path) == 100
    assert leases[1] is not None and leases[1].signalled  # type: ignore[attr-defined]  # the rows' lease
    assert copied  # after the break, the rest was read with preadv
    assert signal.getsignal(signal.SIGIO) == handler  # the SIGIO handler is restored


@needs_leases
def test_no_mapping_where_no_lease_can_be_had(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file open for writing (here by this process) gets no lease, and an average off the main
    thread (which would not get the lease-break signal) takes none: both read with preadv, same bits."""
    import threading

    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    path = write_random_source(tmp_path / "s.safetensors", n=50, t=3, r=2, d=64)
    want = [a.tobytes() for a in average_factors(load_source(path))]
    leases, ckpt = watch_mapped_average(monkeypatch, workers=2), load_source(path)
    with open(path, "r+b"):
        assert [a.tobytes() for a in average_factors(ckpt, engine="numpy")] == want
    assert leases == [None, None]  # one try per factor
    got: list[list[bytes]] = []
    thread = threading.Thread(target=lambda: got.append([a.tobytes() for a in average_factors(ckpt, engine="numpy")]))
    thread.start()
    thread.join()
    assert got == [want] and leases == [None] * 4
    assert [a.tobytes() for a in average_factors(ckpt, engine="numpy")] == want
    assert None not in leases[4:]  # on the main thread, nothing open for writing: mapped


def test_the_sha256_recorded_is_of_the_file_read(tmp_path: Path) -> None:
    """A tester's finding: the source's sha256 was taken by path after its tensors were read, so a
    file renamed over it meanwhile gave tensors of one file and the sha256 of another (and compat
    copied the other under the first one's checked config)."""
    from mpt_tools.checkpoint import load_source

    a = write_random_source(tmp_path / "a.safetensors", 2, 4, 2, 8)
    b = write_random_source(tmp_path / "b.safetensors", 3, 4, 2, 8, seed=1)
    ckpt = load_source(str(a))
    ckpt.read("prompt_embeddings")
    os.replace(b, a)
    with pytest.raises(FormatError, match="replaced by another file"):
        ckpt.sha256()
    ckpt = load_source(str(a))
    os.unlink(a)
    with pytest.raises(FormatError, match="it was removed"):
        ckpt.sha256()


def test_compat_refuses_a_source_replaced_after_its_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import mpt_tools.compat as compat

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    other = write_random_source(tmp_path / "other.safetensors", 5, 4, 2, 16)
    real = compat._guard_weights

    def swap_then_guard(*args, **kwargs):  # after the source was loaded and checked
        os.replace(other, src / "adapter_model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(compat, "_guard_weights", swap_then_guard)
    result = run_cli("compat", src, "--peft", "0.10.0", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "changed while reading (it was replaced by another file)" in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_compat_refuses_a_source_gone_before_its_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A verifier's finding: the weights removed between compat's checks and its copy were an
    internal error (FileNotFoundError)."""
    import shutil

    import mpt_tools.compat as compat

    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "causal", src)
    real = compat._read_checked

    def gone_then_read(path, *args):  # after the sha256 of the very file read was taken
        if how == "removed":
            os.unlink(path)
        else:
            os.replace(write_random_source(tmp_path / "other.safetensors", 3, 4, 2, 16), path)
        return real(path, *args)

    monkeypatch.setattr(compat, "_read_checked", gone_then_read)
    result = run_cli("compat", src, "--peft", "0.10.0", "--out", tmp_path / "out")
    assert result.exit_code == 1 and f"changed while reading (it was {how}" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
