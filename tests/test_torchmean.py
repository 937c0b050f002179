"""mpt_tools.torchmean against torch itself: numpy's reproduction of torch's CPU ``mean(0)`` must be
bitwise torch's for every shape, dtype, value range, thread count and CPU kernel.

Run as a script (``python tests/test_torchmean.py``) to rewrite the golden file from the
installed torch; the goldens let the thread-count cases be checked where torch is absent.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpt_tools import torchmean as tm

GOLDEN = Path(__file__).parent / "golden" / "torchmean.npz"
DTYPES = ["F32", "F16", "BF16", "F64"]
KINDS = ["normal", "wide", "tiny", "huge", "signed-zero"]

# N at and around powers of two and the cascade's carries (16, 256, 4096 rows; 4x for row_sum)
EDGE_N = [1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255, 256, 257, 1023, 1024, 1025, 4097]
# inner sizes: not multiples of 8, around 32 (the plain cascade's groups) and the thread rule's 4..7
EDGE_C = [1, 2, 3, 4, 5, 7, 8, 9, 12, 31, 32, 33, 36, 39, 68, 100, 231]
BIG = [(16383, 5), (16385, 37), (65536, 1), (65537, 1), (65537, 3), (4096, 100), (300, 768)]
# shapes whose bits depend on torch's thread count, and some that do not
THREADED = [
    ((1000, 36), [2, 5, 6, 8, 16]),
    ((911, 37), [5, 6, 8, 9]),
    ((1000, 39), [8, 16]),
    ((1000, 100), [2, 8, 16, 32]),
    ((300, 231), [16, 32]),
    ((100, 999), [32, 64]),
    ((40000, 1), [2, 3, 8]),
    ((65537, 1), [2, 3, 16]),
    ((200, 768), [3, 8]),
    ((2000, 20), [4, 8]),
]


# --- inputs: pure integer arithmetic, so the goldens need no stored inputs ------------------------


def _hash(count: int, seed: int) -> np.ndarray:
    h = np.arange(count, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(
        (seed * 0x632BE59BD9B4E019 + 1) % 2**64
    )
    h ^= h >> np.uint64(31)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(29)
    h *= np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(32))


def values(shape: tuple[int, ...], dtype: str, kind: str = "normal", seed: int = 0) -> np.ndarray:
    """Deterministic stored data of ``shape`` (uint16 patterns for BF16): ``normal`` (2^-8..2^3),
    ``wide`` (2^-140..2^100), ``tiny`` (subnormal to 2^-120), ``huge`` (near float32's overflow)
    or ``signed-zero`` (mostly -0.0)."""
    count = int(np.prod(shape))
    h = _hash(count, seed)
    low, high = {"normal": (-8, 3), "wide": (-140, 100), "tiny": (-150, -120), "huge": (100, 127)}.get(kind, (-8, 3))
    if dtype == "F16":
        low, high = {"wide": (-24, 14), "tiny": (-25, -12), "huge": (10, 15)}.get(kind, (low, high))
    exponent = (h >> np.uint64(8)) % np.uint64(high - low + 1)
    biased = (exponent.astype(np.int64) + low + 127).clip(0, 254).astype(np.uint32)
    bits = (
        ((h & np.uint64(1)).astype(np.uint32) << 31)
        | (biased << 23)
        | ((h >> np.uint64(40)).astype(np.uint32) & 0x7FFFFF)
    )
    x = bits.view(np.float32)
    if kind == "signed-zero":
        x = np.where((h % np.uint64(7)) == 0, x, np.float32(-0.0)).astype(np.float32)
    if dtype == "F16":
        with np.errstate(over="ignore"):
            return x.astype(np.float16).reshape(shape)
    if dtype == "BF16":
        return tm.round_bf16(x).reshape(shape)
    if dtype == "F64":
        return (x.astype(np.float64) * (1 + (h % np.uint64(9973)).astype(np.float64) * 1e-9)).reshape(shape)
    return x.reshape(shape)


# --- torch ------------------------------------------------------------------------------------


def torch_mean(raw: np.ndarray, dtype: str, threads: int = 1) -> np.ndarray:
    """torch's ``mean(0, keepdim=True).float()`` (float64 kept) on ``threads`` threads."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16) if dtype == "BF16" else torch.from_numpy(raw)
        mean = t.mean(0, keepdim=True)
        return (mean if dtype == "F64" else mean.float()).numpy()
    finally:
        torch.set_num_threads(before)


def assert_same(got: np.ndarray, want: np.ndarray, what: str) -> None:
    """Bitwise equal; NaN only where torch has NaN (NaN payloads differ between torch's kernels)."""
    assert got.shape == want.shape and got.dtype == want.dtype, what
    nan = np.isnan(want)
    assert np.array_equal(nan, np.isnan(got)), what
    bits = np.uint64 if want.dtype == np.float64 else np.uint32
    g, w = got[~nan].view(bits), want[~nan].view(bits)
    bad = np.flatnonzero(g != w)
    assert bad.size == 0, (
        f"{what}: {bad.size} differ, first at {bad[0]}: {got[~nan][bad[0]]!r} vs {want[~nan][bad[0]]!r}"
    )


def check(shape: tuple[int, ...], dtype: str, kind: str, threads: int = 1, seed: int = 0) -> None:
    raw = values(shape, dtype, kind, seed)
    with np.errstate(all="ignore"):
        got = tm.mean0(raw, dtype, threads)
    assert_same(got, torch_mean(raw, dtype, threads), f"{shape} {dtype} {kind} threads={threads}")


needs_torch = pytest.mark.skipif(
    __import__("importlib").util.find_spec("torch") is None, reason="compares with the installed torch"
)


# --- the sweeps -------------------------------------------------------------------------------


def edge_cases() -> Iterator[tuple[tuple[int, int], str, str]]:
    for i, (n, c) in enumerate((n, c) for n in EDGE_N for c in EDGE_C):
        yield (n, c), DTYPES[i % 4], KINDS[(i // 4) % len(KINDS)]
        if i % 3 == 0:
            yield (n, c), DTYPES[(i + 1) % 4], "normal"


@needs_torch
def test_edge_shapes_one_thread() -> None:
    for shape, dtype, kind in edge_cases():
        check(shape, dtype, kind)


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_value_range_one_thread(dtype: str) -> None:
    for kind in KINDS:
        for shape in [(7, 5), (33, 37), (257, 3), (1025, 68)]:
            check(shape, dtype, kind, seed=3)


@needs_torch
@pytest.mark.parametrize("shape", BIG, ids=str)
def test_large_n(shape: tuple[int, int]) -> None:
    for dtype in DTYPES:
        check(shape, dtype, "normal", seed=1)


@needs_torch
@pytest.mark.parametrize(("shape", "threads"), THREADED, ids=str)
def test_thread_counts(shape: tuple[int, int], threads: list[int]) -> None:
    for count in threads:
        for dtype in ("F32", "BF16", "F16", "F64"):
            check(shape, dtype, "normal" if count % 2 else "wide", count, seed=count)


@needs_torch
def test_thread_sensitive_shapes_really_differ() -> None:
    """The rule is not vacuous: these shapes give other bits on one thread than on several."""
    for shape, count in [((1000, 36), 8), ((1000, 100), 16), ((100, 999), 32), ((65537, 1), 2)]:
        raw = values(shape, "F32", "normal", seed=5)
        assert tm.depends_on_threads(shape, count)
        assert tm.mean0(raw, "F32", count).tobytes() != tm.mean0(raw, "F32", 1).tobytes()
        assert_same(tm.mean0(raw, "F32", count), torch_mean(raw, "F32", count), str(shape))


@needs_torch
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.one_of(st.sampled_from(EDGE_N), st.integers(1, 3000)),
    inner=st.lists(st.integers(1, 40), min_size=0, max_size=2),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(KINDS),
    threads=st.sampled_from([1, 1, 2, 3, 6, 8, 16]),
    seed=st.integers(0, 2**16),
)
def test_property(n: int, inner: list[int], dtype: str, kind: str, threads: int, seed: int) -> None:
    shape = (n, *inner)
    if int(np.prod(shape)) > 400_000:
        shape = (max(1, 400_000 // int(np.prod(inner or [1]))), *inner)
    check(shape, dtype, kind, threads, seed)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reading_in_chunks_changes_no_bit(dtype: type) -> None:
    """sum0_chunked (what init uses: tasks read a chunk at a time; or one chunk ahead) gives sum0's
    bits for any chunk size, including chunks that end inside a cascade block or a row_sum group,
    and chunks of single rows where every column is summed by the plain cascade."""
    shapes = [(1, 5, 1), (17, 37, 1), (255, 100, 16), (1025, 36, 8), (4097, 7, 1), (600, 231, 32), (300, 64, 1)]
    for n, c, threads in [*shapes, (301, 96, 2)]:
        x = values((n, c), "F64" if dtype is np.float64 else "F32", "wide", seed=n)
        want = tm.sum0(x, threads)
        for rows in (1, 3, 4, 5, 8, 12, 20, 64, 1000, 0):
            for prefetch in (False, True):
                got = tm.sum0_chunked(lambda a, b, x=x: x[a:b].copy(), n, c, x.dtype, threads, rows, prefetch)
                assert got.tobytes() == want.tobytes(), (n, c, threads, rows, prefetch)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.one_of(st.sampled_from([1, 3, 4, 15, 16, 17, 63, 64, 65, 257]), st.integers(1, 700)),
    c=st.one_of(st.sampled_from([2, 36, 37, 39, 68, 100, 231, 999]), st.integers(2, 300)),
    threads=st.sampled_from([1, 2, 6, 8, 16]),
    workers=st.integers(1, 5),
    wide=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_column_windows_change_no_bit(n: int, c: int, threads: int, workers: int, wide: bool, seed: int) -> None:
    """The column windows the average is split into for threads (``column_windows``, here forced
    on whatever the size) and their strided views give, concatenated, ``sum0``'s bits, including
    the thread-sensitive shapes (C = 36-39, 68, 100, 231, 999) whose columns torch sums two ways."""
    x = values((n, c), "F32", "wide" if wide else "normal", seed=seed)
    want = tm.sum0(x, threads)
    windows = tm.column_windows(n, c, 4, workers) if n * c * 4 >= tm.WINDOW_BYTES else _forced_windows(c, workers)
    got = [
        tm.sum0_chunked(lambda a, b, lo=lo, hi=hi: x[a:b, lo:hi], n, c, x.dtype, threads, 0, columns=(lo, hi))
        for lo, hi in windows
    ]
    assert np.concatenate(got).tobytes() == want.tobytes()


def _forced_windows(c: int, workers: int) -> list[tuple[int, int]]:
    """``column_windows`` as it splits a large sum, for any size."""
    saved = tm.WINDOW_BYTES
    tm.WINDOW_BYTES = 0
    try:
        return tm.column_windows(1, c, 4, workers)
    finally:
        tm.WINDOW_BYTES = saved


def test_column_windows_cover_the_columns() -> None:
    for c in (1, 15, 16, 17, 100, 131072):
        for workers in (1, 2, 3, 4):
            windows = _forced_windows(c, workers)
            assert windows[0][0] == 0 and windows[-1][1] == c
            assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))
            assert len(windows) <= max(1, min(workers, c // 16))
    assert tm.column_windows(10, 100, 4, 4) == [(0, 100)]  # small: one window


def test_chunk_rows_of() -> None:
    """Chunks of any size where every column is summed by the plain cascade (a float32 row of 32
    columns or more on one thread); a multiple of 4 where some are summed by row_sum (groups of 4
    rows); by default about ``CHUNK_BYTES``, so that a chunk is summed while it is in the cache."""
    f32 = np.dtype(np.float32)
    assert tm.chunk_rows_of(1000, 16 * 8192, f32, 2) == 2  # the stress rows: 512 KB each
    assert tm.chunk_rows_of(1000, 64, f32, 1, 5) == 5
    assert tm.chunk_rows_of(1000, 37, f32, 1, 5) == 4 and tm.chunk_rows_of(1000, 37, f32, 1, 1) == 4
    assert tm.chunk_rows_of(1000, 3200, f32, 2) == 64  # 81 rows of 12.8 kB: a multiple of 64
    assert tm.chunk_rows_of(10, 1 << 24, f32, 1) == 1  # a row larger than a chunk: one at a time


def test_thread_rule_is_the_issues() -> None:
    """C == 1 with N > 32768; C >= 36 with C mod 32 in 4..7 (a last column chunk 4..7 wide), 5+
    threads (the issue said 6: C = 36..39 already depend on it at 5); never below 32768
    elements; float64 only for C == 1."""
    assert tm.depends_on_threads((32769, 1), 2) and not tm.depends_on_threads((32768, 1), 8)
    assert tm.depends_on_threads((1000, 36), 8) and tm.depends_on_threads((1000, 36), 5)
    assert not tm.depends_on_threads((1000, 36), 4) and not tm.depends_on_threads((1000, 36), 6)
    assert tm.depends_on_threads((1000, 231), 16) and not tm.depends_on_threads((1000, 231), 8)
    assert tm.depends_on_threads((100, 999), 32)
    assert not tm.depends_on_threads((900, 36), 8)  # 32400 elements: one thread
    for c in range(2, 1100):
        sensitive = any(tm.depends_on_threads((40000, c), t, "F32") for t in range(2, 65))
        assert sensitive == (c >= 36 and 4 <= c % 32 <= 7) == tm.may_depend_on_threads((40000, c)), c
        assert not any(tm.depends_on_threads((40000, c), t, "F64") for t in (2, 8, 16, 32))
    for c in range(36, 1000):
        first = min((t for t in range(2, 65) if tm.depends_on_threads((40000, c), t)), default=None)
        assert first is None or first >= (5 if c < 40 else 6), c


# --- CPU kernels and goldens ------------------------------------------------------------------

KERNEL_PROBE = r"""
import json, sys
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from test_torchmean import THREADED, values, torch_mean
out = {"capability": torch.backends.cpu.get_cpu_capability()}
cases = [((n, c), d, k) for n in (5, 33, 257, 1025) for c in (1, 7, 37, 100) for d in ("F32", "F16", "BF16", "F64")
         for k in ("normal", "wide", "tiny")] + [(s, d, "wide") for s, _ in THREADED for d in ("F32", "BF16")]
for i, (shape, dtype, kind) in enumerate(cases):
    for threads in (1, 8):
        mean = torch_mean(values(tuple(shape), dtype, kind), dtype, threads)
        out[f"{i}/{threads}"] = [list(shape), dtype, kind, threads, mean.tobytes().hex()]
print(json.dumps(out))
"""


def capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    found = ["default"]
    if " avx2" in flags:
        found.append("avx2")
    if all(f" {f}" in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")):
        found.append("avx512")
    return found


@needs_torch
@pytest.mark.skipif(not tm.order_reproduced(), reason="the order reproduced is x86-64's")
@pytest.mark.parametrize("capability", capabilities())
def test_every_cpu_kernel(capability: str) -> None:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_PROBE, str(Path(__file__).parent)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert found.pop("capability") == capability.upper()
    for shape, dtype, kind, threads, hexed in found.values():
        want = np.frombuffer(bytes.fromhex(hexed), np.float64 if dtype == "F64" else np.float32)
        with np.errstate(all="ignore"):
            got = tm.mean0(values(tuple(shape), dtype, kind), dtype, threads).reshape(-1)
        assert_same(got, want, f"{capability} {shape} {dtype} {kind} threads={threads}")


def golden_cases() -> Iterator[tuple[str, tuple[int, int], str, int]]:
    for shape, threads in THREADED:
        for dtype in ("F32", "BF16", "F16"):
            for count in [1, *threads]:
                yield f"{dtype}/{shape[0]}x{shape[1]}/{count}", shape, dtype, count


def test_goldens() -> None:
    """The committed torch 2.13 results (x86-64) of the boundary shapes at several thread counts."""
    if not tm.order_reproduced():
        pytest.skip("the goldens are x86-64's")
    golden = np.load(GOLDEN)
    names = set(golden.files)
    for name, shape, dtype, count in golden_cases():
        assert name in names, f"{name}: run python tests/test_torchmean.py"
        with np.errstate(all="ignore"):
            got = tm.mean0(values(shape, dtype, "wide", seed=count), dtype, count).reshape(-1)
        assert_same(got, golden[name], name)


def write_goldens() -> None:
    """Rewrite the golden file from the installed torch."""
    out = {
        name: torch_mean(values(shape, dtype, "wide", seed=count), dtype, count).reshape(-1)
        for name, shape, dtype, count in golden_cases()
    }
    GOLDEN.parent.mkdir(exist_ok=True)
    np.savez_compressed(GOLDEN, **out)


# --- the factors ------------------------------------------------------------------------------


def test_bf16_rounding_is_torchs() -> None:
    torch = pytest.importorskip("torch")
    bits = np.concatenate(
        [
            np.arange(0, 1 << 20, 7, dtype=np.uint32),  # zero and subnormals
            _hash(200_000, 9).astype(np.uint32),  # anything
            np.arange(0x7F7F0000, 0x7F800001, 3, dtype=np.uint32),  # up to overflow and Inf
        ]
    )
    bits = np.concatenate([bits, bits | np.uint32(1 << 31)])
    x = bits.view(np.float32)
    x = x[~np.isnan(x)]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(tm.round_bf16(x), want)


def test_default_threads_are_torchs() -> None:
    """Without importing torch, torch_default_threads() says what torch.get_num_threads() will, or
    None (the average then asks torch for the shapes that depend on it)."""
    pytest.importorskip("torch")
    probe = (
        "from mpt_tools import torchmean as tm; n = tm.torch_default_threads(); "
        "import torch; print(n, torch.get_num_threads())"
    )
    cases = [
        ({}, True),
        ({"OMP_NUM_THREADS": "1"}, True),
        ({"OMP_NUM_THREADS": "3"}, True),  # more than the cores: MKL keeps the cores
        ({"MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "2"}, True),
        ({"MKL_NUM_THREADS": "2", "OMP_NUM_THREADS": "1"}, True),
        ({"OMP_NUM_THREADS": "1,1"}, False),
        ({"OMP_NUM_THREADS": "x"}, False),
        ({"OMP_NUM_THREADS": "3", "MKL_DYNAMIC": "FALSE"}, False),
    ]
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_DYNAMIC")}
    for extra, known in cases:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env={**clean, **extra})
        assert proc.returncode == 0, proc.stderr
        ours, torchs = proc.stdout.split()
        if known and tm._physical_cores() is not None:
            assert ours == torchs, extra
        else:
            assert ours in ("None", torchs), extra


def _source(tmp: Path, dtype: str, n: int, t: int, r: int, d: int) -> Path:
    from mpt_tools.formats import Raw, safetensors_bytes

    tensors = {
        "prompt_embeddings": values((t, d), dtype, "normal", 1),
        "prefix_task_cols": values((n, t, r), dtype, "wide", 2),
        "prefix_task_rows": values((n, r, d), dtype, "normal", 3),
    }
    raws = {k: Raw(dtype, v.shape, v) for k, v in tensors.items()}
    path = tmp / f"{dtype}.safetensors"
    path.write_bytes(safetensors_bytes(raws, {"format": "pt"}))
    return path


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
def test_average_factors_engines_agree(tmp_path: Path, dtype: str) -> None:
    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    ckpt = load_source(_source(tmp_path, dtype, 37, 5, 3, 40))
    for tasks, weights in [(None, None), ([3, 0, 36], None), (None, [1.0] * 36 + [5.0]), ([2, 1], [1e308, 1.5e308])]:
        numpy = average_factors(ckpt, tasks, weights, engine="numpy")
        torch = average_factors(ckpt, tasks, weights, engine="torch")
        for a, b in zip(numpy, torch, strict=True):
            assert a.dtype == np.float32
            assert_same(a, b, f"{dtype} {tasks} {weights}")


@needs_torch
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("workers", [1, 3])
def test_the_mapped_windowed_average_is_torchs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, workers: int
) -> None:
    """A large factor (here: any, ``WINDOW_BYTES`` 0) is summed on threads in column windows, read
    from a leased mapping: the same bits as torch's mean, with task lists and weights too, and the
    pages handed back as it goes (``FORGET_BYTES`` 1) change nothing."""
    from conftest import watch_mapped_average

    from mpt_tools import formats
    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    monkeypatch.setattr(formats, "FORGET_BYTES", 1)
    leases = watch_mapped_average(monkeypatch, workers)
    ckpt = load_source(_source(tmp_path, dtype, 300, 7, 3, 100))  # rows: C = 300; cols: C = 21
    for tasks, weights in [(None, None), ([3, 0, 299, 5], None), (None, [1.0] * 299 + [5.0])]:
        numpy = average_factors(ckpt, tasks, weights, engine="numpy")
        torch = average_factors(ckpt, tasks, weights, engine="torch")
        for a, b in zip(numpy, torch, strict=True):
            assert_same(a, b, f"{dtype} {tasks} {weights} workers={workers}")
    assert leases and all(lease is not None for lease in leases)  # the mapped path was taken
    assert any(lease.released for lease in leases)  # and pages were handed back


@needs_torch
def test_torch_threads_match_a_run_elsewhere(tmp_path: Path) -> None:
    """--torch-threads 16 gives a 16-thread torch's bits for a shape that depends on it."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.factors import average_factors

    ckpt = load_source(_source(tmp_path, "F32", 1000, 100, 1, 8))  # cols: C = 100, 100 mod 32 = 4
    for threads in (1, 2, 16):
        numpy = average_factors(ckpt, engine="numpy", threads=threads)
        torch = average_factors(ckpt, engine="torch", threads=threads)
        assert_same(numpy[0], torch[0], f"threads={threads}")
    assert average_factors(ckpt, threads=16)[0].tobytes() != average_factors(ckpt, threads=1)[0].tobytes()


@needs_torch
def test_init_verify_honours_torch_threads(tmp_path: Path) -> None:
    """init --torch-threads N --verify: verify's torch mean runs on N threads too, so it passes."""
    from mpt_tools.init import init_adapter
    from mpt_tools.modes import TargetPlan
    from mpt_tools.options import ConfigOverrides, SourceSpec

    spec = SourceSpec(str(_source(tmp_path, "F32", 1000, 100, 1, 8)), overrides=ConfigOverrides(task_type="CAUSAL_LM"))
    result = init_adapter(spec, TargetPlan("average", torch_threads=16), tmp_path / "out", verify="cpu")
    assert result["verify"]["ok"]


def test_auto_falls_back_to_torch_where_unproven(monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools import factors

    assert factors.average_engine("F32", (8, 100, 1), False, None)[0] == "numpy"
    assert factors.average_engine("F8_E4M3", (8, 100, 1), False, None)[0] == "torch"
    monkeypatch.setattr(tm, "torch_default_threads", lambda: None)
    assert factors.average_engine("F32", (1000, 100, 1), False, None) == ("torch", None)  # thread-sensitive
    assert factors.average_engine("F32", (1000, 100, 1), False, 4) == ("numpy", 4)
    assert factors.average_engine("F32", (1000, 96, 1), False, None) == ("numpy", 1)
    monkeypatch.setattr(tm.platform, "machine", lambda: "aarch64")
    assert factors.average_engine("F32", (8, 100, 1), False, None)[0] == "torch"


if __name__ == "__main__":
    write_goldens()
    print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
