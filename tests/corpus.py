"""A generated corpus of malformed and hostile MPT inputs, for robustness tests.

``build_corpus(root)`` writes every case under ``root`` (one subdirectory per case) and returns
the list of :class:`Case`. Nothing here is a committed binary: every byte is produced by this
module from a seeded baseline, so the corpus can be rebuilt anywhere in well under a second
(torch is imported lazily, only to pack the ``.bin`` cases the way ``torch.save`` does).

Baseline (valid): N=3 tasks, nvt=4 causal (T=4), r=2, d=8, float32, values from
``numpy.random.RandomState(0)``. Safetensors files are written by hand (8-byte little-endian
header length, JSON header padded with spaces to a multiple of 8, then the data) so that every
part of the format can be corrupted.

``snapshot(root)`` records every file's bytes (and every symlink's target, never followed) so a
test can assert that a tool left its inputs byte-identical and created nothing new (for the
code-execution cases, no sentinel file).
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import shlex
import struct
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------
# Baseline
# --------------------------------------------------------------------------------------------

N_TASKS, NVT, T, R, D = 3, 4, 4, 2, 8

ST_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
CONFIG_NAME = "adapter_config.json"

_ST_DTYPES = {
    np.dtype("float64"): "F64",
    np.dtype("float32"): "F32",
    np.dtype("float16"): "F16",
    np.dtype("int64"): "I64",
    np.dtype("int32"): "I32",
    np.dtype("int16"): "I16",
    np.dtype("int8"): "I8",
    np.dtype("uint8"): "U8",
    np.dtype("bool"): "BOOL",
    np.dtype("complex64"): "C64",
}


@dataclass(frozen=True)
class Case:
    name: str  # short id, e.g. "st-truncated-header"
    path: Path  # the SOURCE argument to pass to a command: a file or an adapter directory
    why: str  # one-line description of what is wrong
    expect: str  # lowercase substring the tool's one-line error should contain (best guess)
    sentinel: Path | None = None  # code-execution payloads: must NOT exist after the tool ran


def baseline_tensors() -> dict[str, np.ndarray]:
    """The valid baseline tensors (fresh arrays on every call)."""
    rng = np.random.RandomState(0)
    pe = rng.standard_normal((T, D)).astype(np.float32)
    cols = rng.normal(0.0, 0.02, (N_TASKS, T, R)).astype(np.float32)
    rows = rng.normal(0.0, 0.02, (N_TASKS, R, D)).astype(np.float32)
    return {"prompt_embeddings": pe, "prefix_task_cols": cols, "prefix_task_rows": rows}


def baseline_config(**overrides: object) -> dict:
    """A valid adapter_config.json for the baseline, as PEFT 0.21 writes it."""
    cfg: dict[str, object] = {
        "auto_mapping": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
        "modules_to_save": None,
        "num_attention_heads": None,
        "num_layers": None,
        "num_ranks": R,
        "num_tasks": N_TASKS,
        "num_transformer_submodules": 1,
        "num_virtual_tokens": NVT,
        "peft_type": "MULTITASK_PROMPT_TUNING",
        "peft_version": "0.21.0",
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_state_dict_path": None,
        "prompt_tuning_init_task": 0,
        "prompt_tuning_init_text": None,
        "revision": None,
        "task_type": "CAUSAL_LM",
        "token_dim": D,
        "tokenizer_kwargs": None,
        "tokenizer_name_or_path": None,
    }
    cfg.update(overrides)
    return cfg


def config_text(cfg: object) -> str:
    """Serialise like PEFT: indent=2, sort_keys, no trailing newline."""
    return json.dumps(cfg, indent=2, sort_keys=True)


# --------------------------------------------------------------------------------------------
# Hand-written safetensors
# --------------------------------------------------------------------------------------------


def st_layout(tensors: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """Header dict (no metadata) and data bytes for ``tensors``, contiguous in the given order."""
    header: dict = {}
    chunks: list[bytes] = []
    offset = 0
    for name, arr in tensors.items():
        arr = np.asarray(arr).copy(order="C")  # ascontiguousarray would make 0-d 1-d
        le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        raw = le.tobytes()
        header[name] = {
            "dtype": _ST_DTYPES[arr.dtype.newbyteorder("=")],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    return header, b"".join(chunks)


def st_pack(
    header: dict | list | str | bytes,
    data: bytes,
    *,
    metadata: object = None,
    length: int | None = None,
) -> bytes:
    """Assemble a safetensors file: u64 LE header length, header (space-padded to 8), data.

    ``header`` may be a dict (``metadata``, when given, is added as ``__metadata__`` first), any
    other JSON value, or raw ``bytes``/``str`` used verbatim. ``length`` overrides the length field.
    """
    if isinstance(header, bytes):
        hb = header
    elif isinstance(header, str):
        hb = header.encode("utf-8")
    else:
        if isinstance(header, dict) and metadata is not None:
            header = {"__metadata__": metadata, **header}
        hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
        hb += b" " * (-len(hb) % 8)
    n = len(hb) if length is None else length
    return struct.pack("<Q", n) + hb + data


def safetensors_bytes(tensors: dict[str, np.ndarray], metadata: object = None) -> bytes:
    """A valid safetensors file for ``tensors`` (metadata defaults to {"format": "pt"})."""
    header, data = st_layout(tensors)
    return st_pack(header, data, metadata={"format": "pt"} if metadata is None else metadata)


# --------------------------------------------------------------------------------------------
# Pickles and torch.save zips
# --------------------------------------------------------------------------------------------

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _pickle_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def exec_payload(sentinel: Path, how: str = "open") -> bytes:
    """A raw protocol-2 pickle that creates ``sentinel`` when unpickled unsafely.

    It unpickles to ``{"prompt_embeddings": <result of the call>}`` so it looks like a weights
    dict. ``how="open"`` uses GLOBAL ``builtins open`` with (sentinel, "w");
    ``how="system"`` uses GLOBAL ``os system`` with ``touch <sentinel>``.
    """
    if how == "open":
        call = b"cbuiltins\nopen\n(" + _pickle_str(str(sentinel)) + _pickle_str("w") + b"tR"
    elif how == "system":
        cmd = "touch " + shlex.quote(str(sentinel))
        call = b"cos\nsystem\n(" + _pickle_str(cmd) + b"tR"
    else:  # pragma: no cover - programming error
        raise ValueError(how)
    # PROTO 2, EMPTY_DICT, key, value, SETITEM, STOP
    return b"\x80\x02}" + _pickle_str("prompt_embeddings") + call + b"s."


def _torch_save_bytes(obj: object) -> bytes:
    import torch  # lazy: only the .bin cases need it

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _rezip(zbytes: bytes, replace: dict[str, bytes | None]) -> bytes:
    """Copy a torch.save zip, replacing (bytes) or dropping (None) records by their suffix."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zbytes)) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data: bytes | None = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix):
                    data = new
                    break
            if data is not None:
                zout.writestr(info, data)
    return out.getvalue()


def _torch_tensors(tensors: dict[str, np.ndarray]) -> dict:
    import torch

    return {k: torch.from_numpy(np.asarray(v).copy(order="C")) for k, v in tensors.items()}


# --------------------------------------------------------------------------------------------
# The corpus
# --------------------------------------------------------------------------------------------


def build_corpus(root: Path) -> list[Case]:
    """Write every case under ``root`` (created if needed) and return them."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    base = baseline_tensors()
    header0, data0 = st_layout(base)  # pe [0,128], cols [128,224], rows [224,416]
    valid_st = st_pack(header0, data0, metadata={"format": "pt"})
    meta = {"format": "pt"}

    def case_dir(name: str) -> Path:
        d = root / name
        d.mkdir()
        return d

    def add_file(name, content, why, expect, filename=ST_NAME, sentinel=False):
        d = case_dir(name)
        p = d / filename
        p.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        s = d / "PWNED" if sentinel else None
        cases.append(Case(name, p, why, expect, s))
        return p

    def add_st(name, header, data, why, expect, **kw):
        add_file(name, st_pack(header, data, **kw), why, expect)

    def hdr(**changes) -> dict:
        """The baseline header with per-tensor field changes: hdr(pe={"shape": [..]})."""
        h = copy.deepcopy(header0)
        alias = {
            "pe": "prompt_embeddings",
            "cols": "prefix_task_cols",
            "rows": "prefix_task_rows",
        }
        for k, fields in changes.items():
            h[alias[k]].update(fields)
        return h

    def add_tensors(name, tensors, why, expect):
        add_file(name, safetensors_bytes(tensors), why, expect)

    def with_(**changes) -> dict[str, np.ndarray]:
        t = baseline_tensors()
        alias = {
            "pe": "prompt_embeddings",
            "cols": "prefix_task_cols",
            "rows": "prefix_task_rows",
        }
        for k, v in changes.items():
            if v is None:
                del t[alias[k]]
            else:
                t[alias[k]] = v
        return t

    def add_adapter(name, config, why, expect, weights=None, bin_weights=None, sentinel=False):
        d = case_dir(name)
        a = d / "adapter"
        a.mkdir()
        if config is not None:
            cp = a / CONFIG_NAME
            if isinstance(config, bytes):
                cp.write_bytes(config)
            elif isinstance(config, str):
                cp.write_text(config, encoding="utf-8")
            else:
                cp.write_text(config_text(config), encoding="utf-8")
        if weights is not None:
            (a / ST_NAME).write_bytes(weights)
        if bin_weights is not None:
            (a / BIN_NAME).write_bytes(bin_weights)
        cases.append(Case(name, a, why, expect, d / "PWNED" if sentinel else None))
        return a

    # ---------------- safetensors container ----------------
    add_file("st-empty", b"", "empty .safetensors file (0 bytes)", "empty")
    add_file(
        "st-short",
        b"\x10\x00\x00\x00\x00",
        "5 bytes: shorter than the 8-byte header-length field",
        "header",
    )
    add_file(
        "st-truncated-header",
        valid_st[: 8 + 40],
        "header length field is right but the file ends 40 bytes into the JSON header",
        "header",
    )
    add_st(
        "st-header-len-beyond-file",
        header0,
        data0,
        "header length (1,000,000) points past the end of a complete 0.5 KB file",
        "header",
        metadata=meta,
        length=1_000_000,
    )
    add_st(
        "st-header-len-huge",
        header0,
        data0,
        "header length claims 2**40 bytes (> 100 MB) in a 0.5 KB file",
        "header",
        metadata=meta,
        length=2**40,
    )
    add_st(
        "st-header-len-max-u64",
        header0,
        data0,
        "header length is 2**64-1 (negative as int64; overflows 8+n)",
        "header",
        metadata=meta,
        length=2**64 - 1,
    )
    add_st(
        "st-header-not-utf8",
        b'{"\xff\xfe":{}}   ',
        data0,
        "header bytes are not valid UTF-8",
        "header",
    )
    add_st("st-header-not-json", b"{not json at all", data0, "header is not JSON", "header")
    add_st(
        "st-header-not-object",
        b"[1, 2, 3]       ",
        data0,
        "header is a JSON list",
        "header",
    )
    add_st(
        "st-entry-missing-fields",
        hdr() | {"prompt_embeddings": {"dtype": "F32", "shape": [T, D]}},
        data0,
        "prompt_embeddings entry has no data_offsets",
        "header",
        metadata=meta,
    )
    add_st(
        "st-entry-not-object",
        hdr() | {"prompt_embeddings": 5},
        data0,
        "prompt_embeddings entry is the number 5, not an object",
        "header",
        metadata=meta,
    )
    add_st(
        "st-overlapping-offsets",
        hdr(cols={"data_offsets": [120, 216]}, rows={"data_offsets": [216, 408]}),
        data0[:408],
        "prefix_task_cols starts 8 bytes inside prompt_embeddings (overlap)",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-offsets-beyond-file",
        hdr(rows={"data_offsets": [224, 224 + 192 + 4096]}),
        data0,
        "prefix_task_rows ends 4 KB past the end of the data",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-offsets-huge",
        hdr(rows={"data_offsets": [2**63, 2**63 + 192]}),
        data0,
        "prefix_task_rows offsets at 2**63 (beyond any file; overflows a signed seek)",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-offsets-gap",
        hdr(cols={"data_offsets": [136, 232]}, rows={"data_offsets": [232, 424]}),
        data0[:128] + b"\x00" * 8 + data0[128:],
        "8 unclaimed bytes between prompt_embeddings and prefix_task_cols",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-offsets-not-at-zero",
        hdr(
            pe={"data_offsets": [16, 144]},
            cols={"data_offsets": [144, 240]},
            rows={"data_offsets": [240, 432]},
        ),
        b"\x00" * 16 + data0,
        "data_offsets start at 16, leaving 16 unclaimed bytes at the start of the data",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-offsets-end-before-start",
        hdr(cols={"data_offsets": [224, 128]}),
        data0,
        "prefix_task_cols data_offsets end (128) < start (224)",
        "offset",
        metadata=meta,
    )
    add_st(
        "st-dtype-unknown",
        hdr(pe={"dtype": "F33"}),
        data0,
        'unknown dtype string "F33"',
        "dtype",
        metadata=meta,
    )
    add_st(
        "st-shape-bytes-mismatch",
        hdr(pe={"shape": [T, 2 * D]}),
        data0,
        "prompt_embeddings shape [4,16] needs 256 bytes, data_offsets give 128",
        "shape",
        metadata=meta,
    )
    add_st(
        "st-shape-negative",
        hdr(pe={"shape": [-T, -D]}),
        data0,
        "prompt_embeddings shape [-4,-8] (product 32 matches the 128 bytes)",
        "shape",
        metadata=meta,
    )
    add_st(
        "st-shape-huge",
        hdr(pe={"shape": [10**6, 10**6]}),
        data0,
        "prompt_embeddings shape [10**6, 10**6] (10**12 elements) with 128 bytes of data",
        "shape",
        metadata=meta,
    )
    add_st(
        "st-shape-wraps-u64",
        hdr(pe={"shape": [2**62 + 8, 4]}),
        data0,
        "prompt_embeddings shape [2**62+8, 4]: byte size wraps modulo 2**64 to exactly 128",
        "shape",
        metadata=meta,
    )
    add_st(
        "st-shape-not-int",
        hdr(pe={"shape": ["4", 8]}),
        data0,
        'prompt_embeddings shape ["4", 8] has a string dimension',
        "header",
        metadata=meta,
    )
    add_file(
        "st-data-truncated",
        valid_st[: len(valid_st) - 200],
        "file cut in the middle of the tensor data (last 200 bytes missing)",
        "truncated",
    )
    add_file(
        "st-trailing-data",
        valid_st + b"\x00" * 64,
        "64 bytes after the last tensor's data, claimed by no tensor",
        "offset",
    )
    add_st(
        "st-metadata-not-dict",
        header0,
        data0,
        '__metadata__ is a list ["format", "pt"]',
        "metadata",
        metadata=["format", "pt"],
    )
    add_st(
        "st-metadata-not-strings",
        header0,
        data0,
        '__metadata__ values are not strings ({"format": 1, "x": {"y": null}})',
        "metadata",
        metadata={"format": 1, "x": {"y": None}},
    )
    # A decoy prompt_embeddings entry first, the real one later: last-wins parsers (Python's json,
    # serde's HashMap) see [4,8], a first-wins parser sees [2,16]. A parser differential.
    decoy = json.dumps({"dtype": "F32", "shape": [2, 2 * D], "data_offsets": [0, 128]})
    rest = json.dumps({"__metadata__": meta, **header0}, separators=(",", ":"))
    dup = '{"prompt_embeddings":' + decoy + "," + rest[1:]
    dup_b = dup.encode() + b" " * (-len(dup) % 8)
    add_st(
        "st-duplicate-keys",
        dup_b,
        data0,
        "header JSON names prompt_embeddings twice: decoy [2,16] first, real [4,8] last",
        "duplicate",
    )

    # ---------------- tensor content (valid safetensors, wrong tensors) ----------------
    add_tensors(
        "content-0d-prompt",
        with_(pe=np.array(1.5, dtype=np.float32)),
        "prompt_embeddings is a 0-d scalar",
        "prompt_embeddings",
    )
    add_tensors(
        "content-1d-prompt",
        with_(pe=base["prompt_embeddings"].reshape(-1)),
        "prompt_embeddings is 1-d [32]",
        "prompt_embeddings",
    )
    add_tensors(
        "content-zero-tokens",
        with_(
            pe=np.zeros((0, D), np.float32),
            cols=np.zeros((N_TASKS, 0, R), np.float32),
        ),
        "zero-size tensors: prompt_embeddings [0,8] and prefix_task_cols [3,0,2] (T=0)",
        "empty",
    )
    add_tensors(
        "content-zero-tasks",
        with_(cols=np.zeros((0, T, R), np.float32), rows=np.zeros((0, R, D), np.float32)),
        "zero tasks: prefix_task_cols [0,4,2] and prefix_task_rows [0,2,8]",
        "task",
    )
    add_tensors(
        "content-no-mpt-keys",
        {
            "weight": base["prompt_embeddings"],
            "bias": base["prompt_embeddings"][0].copy(),
        },
        "valid safetensors with none of the three MPT keys (weight, bias)",
        "missing",
    )
    add_tensors(
        "content-missing-cols",
        with_(cols=None),
        "prefix_task_cols missing",
        "prefix_task_cols",
    )
    add_tensors(
        "content-missing-rows",
        with_(rows=None),
        "prefix_task_rows missing",
        "prefix_task_rows",
    )
    add_tensors(
        "content-missing-prompt",
        with_(pe=None),
        "prompt_embeddings missing",
        "prompt_embeddings",
    )
    add_tensors(
        "content-num-tasks-mismatch",
        with_(rows=base["prefix_task_rows"][:2].copy()),
        "prefix_task_cols has 3 tasks, prefix_task_rows has 2",
        "task",
    )
    add_tensors(
        "content-t-mismatch",
        with_(cols=np.zeros((N_TASKS, T + 1, R), np.float32) + 0.01),
        "prompt_embeddings has T=4 rows, prefix_task_cols has T=5",
        "shape",
    )
    add_tensors(
        "content-r-mismatch",
        with_(rows=np.zeros((N_TASKS, R + 1, D), np.float32) + 0.01),
        "prefix_task_cols has r=2, prefix_task_rows has r=3",
        "shape",
    )
    add_tensors(
        "content-d-mismatch",
        with_(rows=np.zeros((N_TASKS, R, D + 1), np.float32) + 0.01),
        "prompt_embeddings has d=8, prefix_task_rows has d=9",
        "shape",
    )
    add_tensors(
        "content-int32",
        {k: (v * 100).astype(np.int32) for k, v in base.items()},
        "all three tensors are int32",
        "dtype",
    )
    add_tensors(
        "content-bool",
        with_(pe=base["prompt_embeddings"] > 0),
        "prompt_embeddings is bool",
        "dtype",
    )
    add_tensors(
        "content-complex64-st",
        with_(rows=base["prefix_task_rows"].astype(np.complex64)),
        "prefix_task_rows is complex64 (safetensors C64)",
        "dtype",
    )
    rows_nan = base["prefix_task_rows"].copy()
    rows_nan[1, 0, 3] = np.nan
    add_tensors("content-nan-rows", with_(rows=rows_nan), "one NaN in prefix_task_rows", "nan")
    pe_inf = base["prompt_embeddings"].copy()
    pe_inf[2, 5] = np.inf
    add_tensors("content-inf-prompt", with_(pe=pe_inf), "+Inf in prompt_embeddings", "inf")

    # ---------------- pickles / torch.save ----------------
    tt = _torch_tensors(base)
    valid_bin = _torch_save_bytes(tt)

    def payload_for(name: str, how: str) -> bytes:
        return exec_payload(root / name / "PWNED", how)

    add_file(
        "bin-exec-zip-open",
        _rezip(valid_bin, {"/data.pkl": payload_for("bin-exec-zip-open", "open")}),
        "torch.save zip whose data.pkl calls builtins.open(sentinel, 'w') (GLOBAL opcode)",
        "pickle",
        BIN_NAME,
        sentinel=True,
    )
    add_file(
        "bin-exec-zip-system",
        _rezip(valid_bin, {"/data.pkl": payload_for("bin-exec-zip-system", "system")}),
        "torch.save zip whose data.pkl calls os.system('touch sentinel')",
        "pickle",
        BIN_NAME,
        sentinel=True,
    )
    add_file(
        "bin-exec-raw-pickle",
        payload_for("bin-exec-raw-pickle", "open"),
        "plain (non-zip) pickle calling builtins.open(sentinel, 'w'); torch.load runs it as the legacy magic number",
        "pickle",
        BIN_NAME,
        sentinel=True,
    )
    legacy = (
        pickle.dumps(_LEGACY_MAGIC, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(
            {"protocol_version": 1001, "little_endian": True, "type_sizes": {}},
            protocol=2,
        )
        + payload_for("bin-exec-legacy", "system")
        + pickle.dumps([], protocol=2)
    )
    add_file(
        "bin-exec-legacy",
        legacy,
        "legacy torch.save stream (magic, version, sys_info) whose main pickle calls os.system",
        "pickle",
        BIN_NAME,
        sentinel=True,
    )
    add_file(
        "bin-non-tensor-dict",
        _torch_save_bytes(
            {
                "prompt_embeddings": "hello",
                "prefix_task_cols": 3,
                "prefix_task_rows": [1, 2],
            }
        ),
        "torch.save of a dict whose MPT keys hold a string, an int and a list",
        "tensor",
        BIN_NAME,
    )
    add_file(
        "bin-state-dict-wrapper",
        _torch_save_bytes({"state_dict": tt}),
        'torch.save of {"state_dict": {...valid tensors...}} (nested wrapper)',
        "missing",
        BIN_NAME,
    )
    add_file(
        "bin-list",
        _torch_save_bytes(list(tt.values())),
        "torch.save of a list of the three tensors instead of a dict",
        "dict",
        BIN_NAME,
    )
    add_file(
        "bin-truncated-zip",
        valid_bin[: len(valid_bin) // 2],
        "torch.save zip cut in half (no central directory)",
        "not a valid",
        BIN_NAME,
    )
    add_file(
        "bin-zip-missing-storage",
        _rezip(valid_bin, {"/data/0": None}),
        "torch.save zip with the storage record of prompt_embeddings (data/0) removed",
        "not a valid",
        BIN_NAME,
    )
    add_file(
        "bin-random-bytes",
        b"\x00RND" + np.random.RandomState(1).bytes(508),
        "512 random bytes with a .bin suffix",
        "not a valid",
        BIN_NAME,
    )
    add_file("bin-empty", b"", "empty .bin file (0 bytes)", "empty", BIN_NAME)
    add_file(
        "content-complex64-bin",
        _torch_save_bytes(_torch_tensors(with_(rows=base["prefix_task_rows"].astype(np.complex64)))),
        "torch.save with prefix_task_rows as complex64",
        "dtype",
        BIN_NAME,
    )

    # ---------------- adapter directories / adapter_config.json ----------------
    cfg = baseline_config
    add_adapter(
        "cfg-not-json",
        "{num_tasks: 3,",
        "adapter_config.json is not JSON",
        "config",
        valid_st,
    )
    add_adapter("cfg-empty", b"", "adapter_config.json is empty (0 bytes)", "config", valid_st)
    add_adapter(
        "cfg-not-utf8",
        b'{"peft_type": "\xff\xfe"}',
        "adapter_config.json is not UTF-8",
        "config",
        valid_st,
    )
    add_adapter(
        "cfg-list",
        [cfg()],
        "adapter_config.json is a JSON list, not an object",
        "config",
        valid_st,
    )
    add_adapter(
        "cfg-deeply-nested",
        "[" * 100_000 + "]" * 100_000,
        "adapter_config.json is 100,000 nested lists (RecursionError in json)",
        "config",
        valid_st,
    )
    add_adapter(
        "cfg-int-too-many-digits",
        config_text(cfg()).replace('"num_tasks": 3', '"num_tasks": ' + "9" * 5000),
        "num_tasks is a 5000-digit integer (json raises ValueError: int digit limit)",
        "config",
        valid_st,
    )
    add_adapter(
        "cfg-nvt-string",
        cfg(num_virtual_tokens="4"),
        'num_virtual_tokens is the string "4"',
        "num_virtual_tokens",
        valid_st,
    )
    add_adapter(
        "cfg-nvt-float",
        cfg(num_virtual_tokens=4.5),
        "num_virtual_tokens is 4.5",
        "num_virtual_tokens",
        valid_st,
    )
    add_adapter(
        "cfg-num-tasks-bool",
        cfg(num_tasks=True),
        "num_tasks is true (a bool, which Python treats as int 1)",
        "num_tasks",
        valid_st,
    )
    add_adapter(
        "cfg-num-tasks-nan",
        config_text(cfg()).replace('"num_tasks": 3', '"num_tasks": NaN'),
        "num_tasks is NaN (non-standard JSON that Python's json accepts)",
        "num_tasks",
        valid_st,
    )
    add_adapter(
        "cfg-peft-type-lora",
        cfg(peft_type="LORA"),
        'peft_type is "LORA"',
        "peft_type",
        valid_st,
    )
    add_adapter("cfg-num-tasks-zero", cfg(num_tasks=0), "num_tasks is 0", "num_tasks", valid_st)
    add_adapter(
        "cfg-num-ranks-negative",
        cfg(num_ranks=-2),
        "num_ranks is -2",
        "num_ranks",
        valid_st,
    )
    add_adapter(
        "cfg-token-dim-absurd",
        cfg(token_dim=10**12),
        "token_dim is 10**12 while the tensors have d=8 (must not allocate from config)",
        "token_dim",
        valid_st,
    )
    add_adapter(
        "cfg-num-tasks-disagree",
        cfg(num_tasks=5),
        "config says num_tasks 5, tensors have 3",
        "num_tasks",
        valid_st,
    )
    add_adapter(
        "cfg-init-unknown",
        cfg(prompt_tuning_init="AVERAGE"),
        'prompt_tuning_init is "AVERAGE" (not a PEFT init mode)',
        "prompt_tuning_init",
        valid_st,
    )
    add_adapter(
        "cfg-task-type-null",
        cfg(task_type=None),
        "task_type is null",
        "task_type",
        valid_st,
    )
    add_adapter(
        "cfg-task-type-foo",
        cfg(task_type="FOO"),
        'task_type is "FOO"',
        "task_type",
        valid_st,
    )
    a = add_adapter(
        "cfg-is-directory",
        None,
        "adapter_config.json is a directory",
        "config",
        valid_st,
    )
    (a / CONFIG_NAME).mkdir()
    add_adapter(
        "dir-no-weights",
        cfg(),
        "adapter directory with adapter_config.json but neither weights file",
        "adapter_model",
    )
    add_adapter(
        "dir-both-st-corrupt",
        cfg(),
        "both weights files; .bin is valid but the winning .safetensors is truncated mid-header",
        "header",
        weights=valid_st[:20],
        bin_weights=valid_bin,
    )
    add_adapter(
        "dir-exec-bin",
        cfg(),
        "adapter directory whose only weights, adapter_model.bin, runs builtins.open(sentinel)",
        "pickle",
        bin_weights=_rezip(valid_bin, {"/data.pkl": payload_for("dir-exec-bin", "open")}),
        sentinel=True,
    )
    add_adapter("dir-empty", None, "an empty directory", "adapter")

    # ---------------- filesystem ----------------
    d = case_dir("fs-missing")
    cases.append(
        Case(
            "fs-missing",
            d / "does-not-exist.safetensors",
            "the path does not exist",
            "not found",
        )
    )
    d = case_dir("fs-symlink-loop")
    os.symlink("b.safetensors", d / "a.safetensors")
    os.symlink("a.safetensors", d / "b.safetensors")
    cases.append(
        Case(
            "fs-symlink-loop",
            d / "a.safetensors",
            "SOURCE is a symlink loop (a -> b -> a)",
            "link",
        )
    )
    a = add_adapter(
        "fs-weights-self-symlink",
        cfg(),
        "adapter_model.safetensors is a symlink to itself",
        "adapter_model",
    )
    os.symlink(ST_NAME, a / ST_NAME)
    a = add_adapter(
        "fs-weights-dangling-symlink",
        cfg(),
        "adapter_model.safetensors is a symlink to a missing file",
        "adapter_model",
    )
    os.symlink("gone.safetensors", a / ST_NAME)
    a = add_adapter(
        "fs-weights-is-directory",
        cfg(),
        "adapter_model.safetensors is a directory",
        "adapter_model",
    )
    (a / ST_NAME).mkdir()

    cases += reading_cases(root)
    return cases


# --------------------------------------------------------------------------------------------
# Hostile reading: bombs, claims, files that are not what their name says, header field types
# --------------------------------------------------------------------------------------------


class _Persist:
    """A storage placeholder for :func:`legacy_claim_bytes` (pickled as a persistent id)."""


class _Rebuild:
    """Pickles as ``torch._utils._rebuild_tensor_v2(storage, 0, shape, stride, False, {})``."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self) -> tuple:
        import collections

        import torch

        stride = tuple(1 for _ in self.shape)
        return (torch._utils._rebuild_tensor_v2, (_Persist(), 0, self.shape, stride, False, collections.OrderedDict()))


def legacy_claim_bytes(numel: int) -> bytes:
    """A legacy (non-zip) torch.save stream whose one float32 storage claims ``numel`` elements
    while the file holds 16 bytes of data: torch allocates what the pickle claims before reading."""
    import torch

    class Pickler(pickle.Pickler):
        def persistent_id(self, obj: object) -> object:
            if isinstance(obj, _Persist):
                return ("storage", torch.FloatStorage, "0", "cpu", numel)
            return None

    def dump(obj: object) -> bytes:
        buf = io.BytesIO()
        Pickler(buf, protocol=2).dump(obj)
        return buf.getvalue()

    sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
    main = {"prompt_embeddings": _Rebuild((numel,))}
    return (
        pickle.dumps(_LEGACY_MAGIC, protocol=2)
        + pickle.dumps(1001, protocol=2)
        + pickle.dumps(sys_info, protocol=2)
        + dump(main)
        + pickle.dumps(["0"], protocol=2)
        + struct.pack("<q", numel)
        + b"\x00" * 16
    )


def deflated_zip(zbytes: bytes, inflate_to: int) -> bytes:
    """A torch.save zip with its storage records deflated, the first one padded with zeros to
    ``inflate_to`` bytes once inflated (torch.save writes every record stored)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(zbytes)) as zin, zipfile.ZipFile(out, "w") as zout:
        first = True
        for info in zin.infolist():
            data = zin.read(info.filename)
            if "/data/" in info.filename:
                if first:
                    data += b"\x00" * (inflate_to - len(data))
                    first = False
                zout.writestr(info.filename, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=1)
            else:
                zout.writestr(info, data)
    return out.getvalue()


def oversized_record_zip(zbytes: bytes, claim: int) -> bytes:
    """A torch.save zip whose central directory says its first storage record holds ``claim``
    bytes (stored), far more than the file."""
    data = bytearray(zbytes)
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_len = struct.unpack_from("<H", data, pos + 28)[0]
        name = bytes(data[pos + 46 : pos + 46 + name_len])
        if b"/data/" in name:
            struct.pack_into("<II", data, pos + 20, claim, claim)
            break
        pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)


def reading_cases(root: Path) -> list[Case]:
    """The hostile-reading cases (issue 15): pickle bombs and claims, tensors mpt-tools cannot
    hold, files whose content is not what their name says, header fields of the wrong JSON type,
    float64 values beyond float32. Each is a static file; FIFOs, devices and files that change
    while read are in tests/test_hostile_reading.py."""
    import torch

    cases: list[Case] = []
    base = baseline_tensors()
    header0, data0 = st_layout(base)
    meta = {"format": "pt"}
    valid_st = st_pack(header0, data0, metadata=meta)
    tt = _torch_tensors(base)
    valid_bin = _torch_save_bytes(tt)

    def add(name: str, content: bytes, why: str, expect: str, filename: str = BIN_NAME) -> None:
        d = root / name
        d.mkdir()
        (d / filename).write_bytes(content)
        cases.append(Case(name, d / filename, why, expect))

    def st_case(name: str, header: object, why: str, expect: str, data: bytes = data0) -> None:
        blob = header.encode() if isinstance(header, str) else json.dumps(header, separators=(",", ":")).encode()
        add(name, struct.pack("<Q", len(blob)) + blob + data, why, expect, ST_NAME)

    def entry(name: str, **fields: object) -> dict:
        h = copy.deepcopy(header0)
        h[name].update(fields)
        return {"__metadata__": meta, **h}

    # ---- pickle bombs and claims
    add(
        "bin-zip-deflate-bomb",
        deflated_zip(valid_bin, 16 << 20),
        "torch.save zip whose storage records are deflated; one inflates from 16 KB to 16 MB "
        "(the same shape at 0.8 MB inflates to 1.8 GB)",
        "compressed",
    )
    add(
        "bin-zip-record-claims-2gb",
        oversized_record_zip(valid_bin, 0x7FFF0000),
        "torch.save zip whose central directory says a storage record holds 2 GB (the file has 2 KB)",
        "claim",
    )
    zero_stride = dict(tt)
    zero_stride["prompt_embeddings"] = torch.zeros(1).expand(10**7, 10**7)
    add(
        "bin-zero-stride-huge",
        _torch_save_bytes(zero_stride),
        "torch.save of an expanded (zero-stride) tensor: a 4-byte storage whose tensor claims 10**7 x 10**7 "
        "float32 (400 TB)",
        "storage holds",
    )
    broadcast = dict(tt)  # a tester's finding: within memory, so it was materialised (3.6 GB from 2.5 KB)
    broadcast["prefix_task_cols"] = tt["prefix_task_cols"][:1].expand(12_000_000, *tt["prefix_task_cols"].shape[1:])
    broadcast["prefix_task_rows"] = tt["prefix_task_rows"][:1].expand(12_000_000, *tt["prefix_task_rows"].shape[1:])
    add(
        "bin-broadcast-factors",
        _torch_save_bytes(broadcast),
        "torch.save of factors expanded to 12,000,000 tasks (stride 0): a 3 KB file that held gigabytes once read",
        "broadcast",
    )
    add(
        "bin-70-dims",
        _torch_save_bytes({**tt, "prompt_embeddings": torch.zeros([1] * 70)}),
        "a tensor of 70 dimensions (numpy and torch take 64)",
        "dimensions",
    )
    add(
        "bin-legacy-storage-claim",
        legacy_claim_bytes(10**12),
        "legacy (non-zip) torch.save whose pickle claims a 4 TB float32 storage; the file holds 16 bytes",
        "claims",
    )
    add(
        "bin-sparse-tensor",
        _torch_save_bytes({**tt, "prompt_embeddings": tt["prompt_embeddings"].to_sparse()}),
        "prompt_embeddings saved as a sparse COO tensor",
        "sparse",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        csr = tt["prompt_embeddings"].to_sparse_csr()
        quantized = torch.quantize_per_tensor(tt["prompt_embeddings"], 0.1, 0, torch.qint8)
    add("bin-sparse-csr-tensor", _torch_save_bytes({**tt, "prompt_embeddings": csr}), "sparse CSR tensor", "sparse")
    add(
        "bin-meta-tensor",
        _torch_save_bytes({**tt, "prompt_embeddings": torch.empty(T, D, device="meta")}),
        "prompt_embeddings is a meta-device tensor (a shape without data)",
        "meta",
    )
    add(
        "bin-quantized-tensor",
        _torch_save_bytes({**tt, "prompt_embeddings": quantized}),
        "prompt_embeddings is a quantized (qint8) tensor",
        "quantized",
    )
    add(
        "bin-complex128",
        _torch_save_bytes({**tt, "prefix_task_rows": tt["prefix_task_rows"].to(torch.complex128)}),
        "prefix_task_rows is complex128",
        "complex",
    )
    # ---- a .bin that is something else
    add("bin-is-safetensors", valid_st, "a valid safetensors file named adapter_model.bin", "safetensors")
    add(
        "bin-lfs-pointer",
        b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"ab" * 32 + b"\nsize 12345\n",
        "a Git LFS pointer file in place of the weights",
        "lfs",
    )
    add(
        "bin-html-page",
        b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>gone</body></html>\n",
        "an HTML error page saved as adapter_model.bin",
        "html",
    )
    add("bin-json", json.dumps(baseline_config()).encode(), "a JSON config saved as adapter_model.bin", "json")
    add("bin-text", b"these are not the weights you are looking for\n", "a line of text as adapter_model.bin", "text")
    # ---- safetensors header fields of the wrong JSON type (safetensors' own parser refuses each)
    st_case("st-shape-float", entry("prompt_embeddings", shape=[4.0, 8]), "shape [4.0, 8]: a float dimension", "shape")
    st_case("st-shape-bool", entry("prompt_embeddings", shape=[True, 32]), "shape [true, 32]", "shape")
    st_case("st-shape-70-dims", entry("prompt_embeddings", shape=[1] * 70), "a shape of 70 dimensions", "dimensions")
    st_case(
        "st-shape-negative-zero",
        json.dumps(entry("prompt_embeddings", shape=[4, 8])).replace('"shape": [4, 8]', '"shape": [4, 8, -0, 1]'),
        "shape [4, 8, -0, 1]: -0 is a float to serde (and 0 elements then mismatch)",
        "shape",
    )
    st_case(
        "st-offsets-float",
        entry("prompt_embeddings", data_offsets=[0, 128.0]),
        "data_offsets [0, 128.0]: a float offset",
        "data_offsets",
    )
    st_case(
        "st-offsets-three",
        entry("prompt_embeddings", data_offsets=[0, 128, 128]),
        "data_offsets has three items",
        "data_offsets",
    )
    st_case("st-dtype-not-string", entry("prompt_embeddings", dtype=5), "dtype is the number 5", "dtype")
    st_case("st-dtype-c128", entry("prompt_embeddings", dtype="C128"), "dtype C128 (safetensors has no C128)", "dtype")
    st_case(
        "st-dtype-f4",
        {"x": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}},
        "dtype F4 (valid to safetensors: 4-bit floats, which mpt-tools does not read)",
        "dtype",
        b"\x00",
    )
    st_case(
        "st-shape-overflow-zero",
        {"x": {"dtype": "F32", "shape": [2**32, 2**32, 0], "data_offsets": [0, 0]}},
        "shape [2**32, 2**32, 0]: 0 elements, but the running product overflows 64 bits first",
        "overflow",
        b"",
    )
    st_case(
        "st-shape-over-u64",
        {"x": {"dtype": "F32", "shape": [2**64, 0], "data_offsets": [0, 0]}},
        "shape [2**64, 0]: a dimension no usize holds",
        "shape",
        b"",
    )
    st_case(
        "st-extra-field-nan",
        json.dumps(entry("prompt_embeddings", note=1.5)).replace("1.5", "NaN"),
        'an unknown field "note": NaN in an entry (not JSON to serde)',
        "json",
    )
    st_case(
        "st-extra-field-1e400",
        json.dumps(entry("prompt_embeddings", note=1.5)).replace("1.5", "1e400"),
        'an unknown field "note": 1e400 (out of range for serde)',
        "json",
    )
    st_case(
        "st-header-lone-surrogate",
        json.dumps(entry("prompt_embeddings", note="x")).replace('"x"', '"\\ud800"'),
        "an unpaired UTF-16 surrogate escape in a string",
        "surrogate",
    )
    st_case(
        "st-header-too-deep",
        json.dumps(entry("prompt_embeddings", note=0)).replace('"note": 0', '"note": ' + "[" * 130 + "]" * 130),
        "an unknown field nested 130 lists deep (serde_json's limit is 128)",
        "deep",
    )
    # ---- numbers: finite float64 values that float32 cannot hold
    big = {k: v.astype(np.float64) for k, v in base.items()}
    big["prefix_task_rows"][1, 0, 3] = 3.4e39
    add(
        "content-f64-beyond-f32",
        safetensors_bytes(big),
        "float64 tensors with one value 3.4e39, finite but beyond float32's range",
        "float32",
        ST_NAME,
    )
    return cases


# --------------------------------------------------------------------------------------------
# Snapshot
# --------------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Everything under ``root``, keyed by relative POSIX path, never following symlinks.

    Regular file -> its bytes; symlink -> ``"symlink:" + target``; directory -> ``"dir"``;
    anything else -> ``"other"``. Comparing two snapshots detects modified, created and deleted
    entries (including a sentinel created by a code-execution payload).
    """
    root = Path(root)
    snap: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            key = p.relative_to(root).as_posix()
            if p.is_symlink():
                snap[key] = "symlink:" + os.readlink(p)
            elif name in dirnames:
                snap[key] = "dir"
            elif p.is_file():
                snap[key] = p.read_bytes()
            else:
                snap[key] = "other"
    return dict(sorted(snap.items()))
