"""The tensor-file layer: our safetensors writer is byte-identical to safetensors' own for what
PEFT writes, deterministic with more metadata; our reader agrees with safetensors and never
raises anything but the tool's own error on fuzzed bytes; pickles load weights-only."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import write_random_source
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpt_tools.errors import FormatError, MptToolsError
from mpt_tools.formats import (
    Raw,
    from_numpy,
    normalise_keys,
    open_safetensors,
    safetensors_bytes,
    to_float32,
)

torch = pytest.importorskip("torch")

shapes = st.lists(st.integers(min_value=1, max_value=5), min_size=1, max_size=3)
DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.sampled_from(["prompt_embeddings", "prefix_task_cols", "prefix_task_rows", "x", "é"]),
        min_size=1,
        max_size=3,
        unique=True,
    ),
    shape=shapes,
    dtype=st.sampled_from(["float32", "float16", "bfloat16"]),
    seed=st.integers(0, 2**16),
)
def test_writer_is_byte_identical_to_safetensors(tmp_path_factory, names, shape, dtype, seed) -> None:
    from safetensors.torch import save

    from mpt_tools.formats import from_torch

    g = torch.Generator().manual_seed(seed)
    tensors = {n: torch.randn(*shape, generator=g).to(DT[dtype]) for n in names}
    theirs = save(tensors, metadata={"format": "pt"})
    ours = safetensors_bytes({n: from_torch(t) for n, t in tensors.items()}, {"format": "pt"})
    assert ours == theirs


def test_metadata_sorted_and_deterministic() -> None:
    arr = from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    meta = {"zeta": "1", "format": "pt", "alpha": "2"}
    a = safetensors_bytes({"t": arr}, meta)
    b = safetensors_bytes({"t": arr}, dict(reversed(list(meta.items()))))
    assert a == b
    n = struct.unpack("<Q", a[:8])[0]
    header = json.loads(a[8 : 8 + n])
    assert list(header["__metadata__"]) == ["alpha", "format", "zeta"]


@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 1000), dtype=st.sampled_from(["float32", "bfloat16", "float16"]))
def test_reader_agrees_with_safetensors(tmp_path_factory, shape, seed, dtype) -> None:
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("st") / "t.safetensors"
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g).to(DT[dtype])
    save_file({"a": t, "b": t[:1].clone()}, str(path))
    tf = open_safetensors(path)
    got = torch.from_numpy(to_float32(tf.read("a")))
    assert torch.equal(got, t.float())
    rows = tf.read_rows("a", 1, 3)
    assert torch.equal(torch.from_numpy(to_float32(rows)), t[1:3].float())


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_reader_fuzz_only_raises_our_error(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    path.write_bytes(data)
    try:
        tf = open_safetensors(path)
        for name in tf.infos:
            tf.read(name)
    except MptToolsError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    header=st.recursive(
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
        max_leaves=12,
    )
)
def test_reader_fuzz_structured_headers(tmp_path_factory, header) -> None:
    path = tmp_path_factory.mktemp("fz") / "f.safetensors"
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 16)
    with contextlib.suppress(MptToolsError):
        open_safetensors(path)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_config_reader_fuzz(tmp_path_factory, data: bytes) -> None:
    from mpt_tools.checks import config_findings
    from mpt_tools.config import read_config

    path = tmp_path_factory.mktemp("cf") / "adapter_config.json"
    path.write_bytes(data)
    try:
        cfg = read_config(path)
        config_findings(cfg, True)
        cfg.expected_shapes()
    except MptToolsError:
        pass


def test_key_normalisation() -> None:
    mapping, notes, ignored = normalise_keys(
        [
            "base_model.model.prompt_encoder.default.embedding.weight",
            "prompt_encoder.default.prefix_task_cols",
            "prefix_task_rows",
            "word_embeddings.weight",
        ]
    )
    assert mapping == {
        "prompt_embeddings": "base_model.model.prompt_encoder.default.embedding.weight",
        "prefix_task_cols": "prompt_encoder.default.prefix_task_cols",
        "prefix_task_rows": "prefix_task_rows",
    }
    assert len(notes) == 2 and ignored == ["word_embeddings.weight"]
    with pytest.raises(FormatError, match="several adapters"):
        normalise_keys(["prompt_encoder.a.prefix_task_cols", "prompt_encoder.b.prefix_task_rows"])
    with pytest.raises(FormatError, match="both hold"):
        normalise_keys(["embedding.weight", "prompt_embeddings"])


def test_bf16_upcast_is_exact() -> None:
    t = torch.randn(50).to(torch.bfloat16)
    raw = Raw("BF16", (50,), t.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(torch.from_numpy(to_float32(raw)), t.float())


def test_pickle_weights_only(tmp_path: Path) -> None:
    from mpt_tools.formats import open_pickle

    path = tmp_path / "a.bin"
    torch.save({"prompt_embeddings": torch.nn.Parameter(torch.ones(2, 3))}, path)
    tf = open_pickle(path)
    assert tf.infos["prompt_embeddings"].shape == (2, 3)
    torch.save({"x": "not a tensor"}, path)
    with pytest.raises(FormatError, match="not a tensor"):
        open_pickle(path)


def test_map_is_the_read_and_never_writes_the_file(tmp_path: Path) -> None:
    """map() (for the average) gives read()'s bytes in memory of its own, not a mapping of the file
    (a mapped file truncated by another program killed the process with SIGBUS); a write to the
    array never reaches the file, and a file cut short after its header was read is refused."""
    path = write_random_source(tmp_path / "s.safetensors", n=5, t=3, r=2, d=4)
    before = path.read_bytes()
    f = open_safetensors(path)
    for name in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows"):
        mapped, read = f.map(name), f.read(name)
        assert mapped.shape == read.shape and mapped.array.tobytes() == read.array.tobytes()
        mapped.array[...] = 0
    assert path.read_bytes() == before
    path.write_bytes(before[: len(before) // 2])
    with pytest.raises(MptToolsError, match="truncated"):
        f.map("prefix_task_rows")


def _safetensors_verdict(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            list(f.keys())
        return True
    except Exception:
        return False


def _our_verdict(path: Path) -> bool:
    try:
        open_safetensors(path)
        return True
    except FormatError as exc:  # a dtype valid to safetensors but not ours to read counts as valid
        return "which mpt-tools does not read" in exc.message


_ENTRY = '{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
# (label, header JSON text, data): what safetensors' parser accepts, we accept, and the reverse.
HEADER_TABLE = [
    ("valid", '{"a":' + _ENTRY + "}", 8),
    ("valid with metadata", '{"__metadata__":{"format":"pt"},"a":' + _ENTRY + "}", 8),
    ("metadata null", '{"__metadata__":null,"a":' + _ENTRY + "}", 8),
    ("no tensors", "{}", 0),
    ("leading whitespace", ' \n{"a":' + _ENTRY + "}", 8),
    ("scalar", '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', 4),
    ("extra field", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[1,{"y":null}]}}', 8),
    ("extra big int", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":184467440737095516160}}', 8),
    ("zero dim u64 max", '{"a":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', 0),
    ("escaped key", '{"\\u0061":' + _ENTRY + "}", 8),
    ("surrogate pair key", '{"\\ud83d\\ude00":' + _ENTRY + "}", 8),
    ("F4 dtype", '{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', 1),
    ("C64 dtype", '{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', 8),
    ("shape float", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8),
    ("shape exponent", '{"a":{"dtype":"F32","shape":[2e0],"data_offsets":[0,8]}}', 8),
    ("shape bool", '{"a":{"dtype":"F32","shape":[true,2],"data_offsets":[0,8]}}', 8),
    ("shape string", '{"a":{"dtype":"F32","shape":["2"],"data_offsets":[0,8]}}', 8),
    ("shape null", '{"a":{"dtype":"F32","shape":null,"data_offsets":[0,8]}}', 8),
    ("shape negative zero", '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', 0),
    ("shape over u64", '{"a":{"dtype":"F32","shape":[18446744073709551616,0],"data_offsets":[0,0]}}', 0),
    ("shape overflow then 0", '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0),
    ("bits overflow", '{"a":{"dtype":"F32","shape":[2305843009213693952],"data_offsets":[0,0]}}', 0),
    ("offsets float", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8.0]}}', 8),
    ("offsets three", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8),
    ("offsets object", '{"a":{"dtype":"F32","shape":[2],"data_offsets":{"0":0,"1":8}}}', 8),
    ("dtype number", '{"a":{"dtype":5,"shape":[2],"data_offsets":[0,8]}}', 8),
    ("dtype lower case", '{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', 8),
    ("dtype C128", '{"a":{"dtype":"C128","shape":[1],"data_offsets":[0,16]}}', 16),
    ("missing field", '{"a":{"dtype":"F32","shape":[2]}}', 8),
    ("metadata list", '{"__metadata__":[],"a":' + _ENTRY + "}", 8),
    ("metadata number value", '{"__metadata__":{"a":1},"a":' + _ENTRY + "}", 8),
    ("extra NaN", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', 8),
    ("extra 1e400", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', 8),
    ("lone surrogate", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":"\\ud800"}}', 8),
    ("control char", '{"a\u0001":' + _ENTRY + "}", 8),
    ("trailing characters", '{"a":' + _ENTRY + "} x", 8),
    ("BOM", '\ufeff{"a":' + _ENTRY + "}", 8),
    ("depth 127", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 125 + "]" * 125 + "}}", 8),
    ("depth 128", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 126 + "]" * 126 + "}}", 8),
    ("end before start", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', 8),
    ("gap", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', 16),
    ("trailing data", '{"a":' + _ENTRY + "}", 12),
]


@pytest.mark.parametrize(("label", "text", "data"), HEADER_TABLE, ids=[row[0] for row in HEADER_TABLE])
def test_header_verdicts_agree_with_safetensors(tmp_path: Path, label: str, text: str, data: int) -> None:
    """Every header field's JSON type as well as its value: what safetensors' own parser refuses we
    refuse, and what it accepts we accept (or refuse only as a dtype mpt-tools does not read)."""
    blob = text.encode("utf-8")
    path = tmp_path / "t.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data)
    assert _our_verdict(path) == _safetensors_verdict(path), label


_VALUES = st.one_of(
    st.integers(-2, 20),
    st.sampled_from([2**63, 2**64 - 1, 2**64, 2**32]),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.none(),
    st.sampled_from(["F32", "F16", "BF16", "F64", "I8", "C64", "C128", "F4", "f32", "", "U8"]),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from(["dtype", "shape", "data_offsets", "extra", "drop"]),
    value=_VALUES | st.lists(_VALUES, max_size=4),
    data=st.integers(0, 24),
)
def test_mutated_headers_agree_with_safetensors(tmp_path: Path, field: str, value: object, data: int) -> None:
    """One field of a valid entry replaced by a value of any JSON type (or dropped, or an unknown
    field added): our verdict is safetensors' verdict."""
    entry: dict[str, object] = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    if field == "drop":
        entry.pop(str(value) if str(value) in entry else "dtype")
    elif field == "extra":
        entry["x"] = value
    else:
        entry[field] = value
    blob = json.dumps({"__metadata__": {"format": "pt"}, "a": entry}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data)
    assert _our_verdict(path) == _safetensors_verdict(path), (entry, data)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.integers(min_value=0, max_value=3000),
    offset=st.integers(min_value=0, max_value=200),
    extra=st.integers(min_value=0, max_value=300),
    piece=st.sampled_from([1, 7, 64, 1 << 20]),
    threads=st.sampled_from([1, 3, 8]),
)
def test_read_into_parallel_pieces_are_the_file_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, size: int, offset: int, extra: int, piece: int, threads: int
) -> None:
    """A read split over threads fills the buffer with exactly the file's bytes; past the end of
    the file it stops and says how many bytes it read (a truncated file)."""
    from mpt_tools import formats

    monkeypatch.setattr(formats, "READ_PIECE", piece)
    monkeypatch.setattr(formats, "READ_THREADS", threads)
    data = np.random.default_rng(size).integers(0, 256, size=offset + size, dtype=np.uint8).tobytes()
    path = tmp_path / f"f{size}-{offset}"
    path.write_bytes(data)
    buf = bytearray(b"\xaa" * (size + extra))
    got = formats.read_into(path, buf, offset)
    assert got == size
    assert bytes(buf[:size]) == data[offset:]
    assert bytes(buf[size:]) == b"\xaa" * extra  # nothing written past what the file holds


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_read_rows_into_a_buffer(tmp_path: Path, suffix: str) -> None:
    """read_rows(out=) gives the same rows as read_rows(), as a view of the given buffer."""
    from mpt_tools.checkpoint import load_source

    src = write_random_source(tmp_path / "s.safetensors", n=5, t=3, r=2, d=8)
    if suffix == ".bin":
        tensors = {
            k: torch.from_numpy(v.array.copy())
            for k, v in (
                (k, load_source(src).read(k)) for k in ("prompt_embeddings", "prefix_task_cols", "prefix_task_rows")
            )
        }
        src = tmp_path / "s.bin"
        torch.save(tensors, src)
    ckpt = load_source(src)
    buf = np.zeros(4 * 5 * 2 * 8, dtype=np.uint8)
    raw = ckpt.read_rows("prefix_task_rows", 1, 4, out=buf)
    expected = ckpt.read_rows("prefix_task_rows", 1, 4)
    assert raw.shape == expected.shape == (3, 2, 8)
    assert raw.array.tobytes() == expected.array.tobytes()
    assert np.shares_memory(raw.array, buf)
    with pytest.raises(ValueError, match="at least"):
        ckpt.read_rows("prefix_task_rows", 0, 5, out=np.zeros(10, dtype=np.uint8))


def test_read_into_without_preadv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Platforms without os.preadv read sequentially, with the same result."""
    import os

    from mpt_tools import formats

    monkeypatch.delattr(os, "preadv", raising=False)
    path = tmp_path / "f"
    path.write_bytes(bytes(range(256)) * 40)
    buf = bytearray(300)
    assert formats.read_into(path, buf, 10_000) == 240 and bytes(buf[:240]) == (bytes(range(256)) * 40)[10_000:]
    assert formats.read_into(path, buf, 5) == 300 and bytes(buf) == (bytes(range(256)) * 40)[5:305]
