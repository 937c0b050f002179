"""``embed``: the whole per-request input a serving engine takes in place of token ids, for one
MPT task and one text: ``cat(P_k, E[ids])`` ([T + n, d]).

``P_k`` is task k's prompt as PEFT's forward computes it (float32, then cast to the dtype of the
embedding matrix, as PEFT casts its prompts to ``inputs_embeds.dtype``); ``ids`` are the text's
token ids as the base model's own tokenizer gives them (the ``tokenizers`` package on its
``tokenizer.json``, special tokens included: a BOS where the model's post-processor adds one);
``E[ids]`` are those rows of the base model's input embedding matrix, and only those rows are
read (safetensors slices of a local file, or ranged requests on the Hub). Fed as
``inputs_embeds`` to the base model, this gives what the PEFT MPT model gives with
``task_ids=[k]`` on the same text.

Formats: ``pt`` (``torch.save`` of the tensor: vLLM's offline ``prompt_embeds``), ``vllm`` (the
base64 text of those bytes: vLLM's HTTP ``prompt_embeds``, with ``--enable-prompt-embeds``),
``sglang`` (JSON ``{"input_embeds": [[...], ...]}`` for ``/generate``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .checkpoint import Source, load_source
from .checks import require_valid
from .dtypes import DTYPE_MAX
from .errors import ConfigError, SourceError, ValidationError
from .export import cast_overflow, decoder_only_finding
from .files import atomic_write, guard_output
from .findings import Finding
from .formats import DTYPE_NAMES, DTYPES, TensorInfo, open_safetensors, parse_header
from .hub.base_model import local_model_paths
from .options import HubOptions
from .paths import read_small
from .prompts import task_runs
from .surgery import _check_tasks, task_prompt
from .version import __version__

if TYPE_CHECKING:
    from .results import EmbedResult

FORMATS = ("pt", "vllm", "sglang")
# the input embedding matrix of the common architectures, most specific first
EMBED_SUFFIXES = (
    "embed_tokens.weight",  # llama, mistral, qwen, opt, bart, ...
    "wte.weight",  # gpt2, gpt-j, codegen
    "word_embeddings.weight",  # bloom, falcon, bert
    "embed_in.weight",  # gpt-neox, pythia
    "tok_embeddings.weight",  # original llama checkpoints
    "shared.weight",  # t5 (encoder-decoder: refused before this)
)
MAX_TOKENIZER_BYTES = 256 << 20
MAX_INDEX_BYTES = 64 << 20


class _Matrix(NamedTuple):
    """Where the embedding matrix lives: its file (for messages), its tensor entry, and
    ``rows(a, b)``: rows ``a:b`` in the storage dtype, read from the file alone."""

    file: str
    info: TensorInfo
    rows: Any


def _tokenize(tokenizer_json: bytes, text: str, where: str) -> list[int]:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise ConfigError(
            "embed needs the tokenizers package to tokenize as the model does: pip install 'mpt-tools[embed]'"
        ) from None
    try:
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
    except Exception as exc:  # the tokenizers library's own parse errors
        why = " ".join(str(exc).split())[:200]
        raise ConfigError(f"not a tokenizer.json the tokenizers package reads ({why})", where) from None
    ids = list(tok.encode(text).ids)
    if not ids:
        raise ConfigError("the text gives no tokens", where)
    return ids


def _pick(infos: dict[str, TensorInfo], d: int, vocab_needed: int, where: str) -> TensorInfo | None:
    """The input embedding matrix among ``infos`` (of the file ``where``): a 2-D float tensor
    [vocab, d] with a known name (None when there is none); ValidationError when it has fewer rows
    than the ids need (a tokenizer.json of another model)."""
    for suffix in EMBED_SUFFIXES:
        for name, info in sorted(infos.items()):
            if name.endswith(suffix) and len(info.shape) == 2 and info.dtype in DTYPE_NAMES and info.shape[1] == d:
                if info.shape[0] < vocab_needed:
                    raise ValidationError(
                        f"{name} has {info.shape[0]} rows but the text has token id {vocab_needed - 1}: "
                        "the tokenizer.json is not this model's",
                        where,
                    )
                return info
    return None


def _other_widths(infos: dict[str, TensorInfo], d: int) -> list[str]:
    """The 2-D tensors of ``infos`` named like an input embedding matrix but not ``d`` wide, as
    ``name [rows, cols]``."""
    return [
        f"{name} {list(info.shape)}"
        for name, info in sorted(infos.items())
        if name.endswith(EMBED_SUFFIXES) and len(info.shape) == 2 and info.shape[1] != d
    ]


def _no_matrix(d: int, where: str, others: list[str]) -> ValidationError:
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        return ValidationError(
            f"the input embedding matrix is not {d} wide, the adapter's token_dim (found {shown}): "
            "the adapter was trained for another base model",
            where,
        )
    return ValidationError(
        f"no input embedding matrix of width {d} (the adapter's token_dim) named *{', *'.join(EMBED_SUFFIXES)}",
        where,
    )


def _shards(index: bytes, where: str) -> list[str]:
    """The shard files of a ``model.safetensors.index.json``, the one holding the embedding
    matrix (by name) first, so usually only its header is read."""
    try:
        mapping = json.loads(index.decode("utf-8"))["weight_map"]
        assert isinstance(mapping, dict) and all(isinstance(v, str) and "/" not in v for v in mapping.values())
    except Exception:
        raise ConfigError("not a safetensors index (a weight_map of tensor name -> shard file)", where) from None
    named = [f for s in EMBED_SUFFIXES for n, f in sorted(mapping.items()) if n.endswith(s)]
    return list(dict.fromkeys([*named, *sorted(set(mapping.values()))]))


def _local_matrix(folder: Path, d: int, vocab_needed: int) -> _Matrix:
    """The embedding matrix of a local model folder (``model.safetensors`` or the shards of
    ``model.safetensors.index.json``; only headers are read here)."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = _shards(read_small(index, MAX_INDEX_BYTES, ConfigError) or b"{}", str(index))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise SourceError("no .safetensors weights in the model folder (embed reads safetensors only)", str(folder))
    others: list[str] = []
    for name in files:
        tfile = open_safetensors(folder / name)
        info = _pick(tfile.infos, d, vocab_needed, tfile.path)
        if info is not None:
            return _Matrix(tfile.path, info, lambda a, b, t=tfile, n=info.name: t.read_rows(n, a, b).array)
        others += _other_widths(tfile.infos, d)
    raise _no_matrix(d, str(folder), others)


def _hub_matrix(repo_id: str, d: int, hub: HubOptions, ids_of: Any) -> tuple[_Matrix, list[int], str]:
    """The embedding matrix of a Hub model, the text's ids, and the commit."""
    from .hub import listing as hl

    repo = hl.list_repo(repo_id, hub)
    base = f"hf://{repo_id}@{repo.commit[:12]}"
    if "tokenizer.json" not in repo.files:
        raise ConfigError("the model repo has no tokenizer.json (embed tokenizes with it)", base)
    tokenizer = hl.read_small(repo_id, repo.commit, "tokenizer.json", hub, MAX_TOKENIZER_BYTES)
    ids = ids_of(tokenizer, f"{base}/tokenizer.json")
    if "model.safetensors.index.json" in repo.files:
        data = hl.read_small(repo_id, repo.commit, "model.safetensors.index.json", hub, MAX_INDEX_BYTES)
        files = _shards(data, f"{base}/model.safetensors.index.json")
    else:
        files = sorted(p for p in repo.files if p.endswith(".safetensors") and "/" not in p)
    if not files:
        raise SourceError("no .safetensors weights in the model repo (embed reads safetensors only)", base)
    others: list[str] = []
    for name in files:
        blob, size = hl.read_header(repo_id, repo.commit, name, hub)
        infos = parse_header(f"{base}/{name}", blob, size, check_memory=False).infos
        info = _pick(infos, d, max(ids) + 1, f"{base}/{name}")
        if info is None:
            others += _other_widths(infos, d)
            continue
        itemsize, storage = DTYPES[info.dtype]
        row = info.shape[1] * itemsize

        def rows(
            a: int, b: int, name: str = name, info: TensorInfo = info, row: int = row, storage: str = storage
        ) -> np.ndarray:
            data = hl.read_range(repo_id, repo.commit, name, hub, info.start + a * row, info.start + b * row - 1)
            return np.frombuffer(data, dtype=storage).reshape(b - a, info.shape[1])

        return _Matrix(f"{base}/{name}", info, rows), ids, repo.commit
    raise _no_matrix(d, base, others)


def _rows(matrix: _Matrix, ids: list[int]) -> tuple[np.ndarray, int]:
    """``E[ids]`` in the matrix's storage dtype, reading each run of consecutive ids once; and
    the bytes read."""
    got: dict[int, np.ndarray] = {}
    total = 0
    for a, b in task_runs(sorted(set(ids)), len(ids)):
        block = matrix.rows(a, b)
        total += block.nbytes
        got.update((i, block[i - a]) for i in range(a, b))
    return np.stack([got[i] for i in ids]), total


def embed_request(
    source: Source,
    task: int,
    text: str,
    base_model: str,
    out: str | os.PathLike[str],
    *,
    to: str = "pt",
    force: bool = False,
    hub: HubOptions | None = None,
) -> EmbedResult:
    """Write ``cat(P_task, E[ids(text)])`` for ``base_model`` (a local folder or a Hub repo id)
    into ``out`` in format ``to`` (:data:`FORMATS`); see the module docstring."""
    payload, result = _embed(source, task, text, base_model, out, to=to, force=force, hub=hub)
    atomic_write(out, payload, replace=force)
    return result


def embed_payload(
    source: Source, task: int, text: str, base_model: str, *, to: str = "pt", hub: HubOptions | None = None
) -> tuple[bytes, EmbedResult]:
    """What :func:`embed_request` would write, as bytes (for a pipe or an HTTP body), with its
    report (``out`` is None); nothing is written."""
    return _embed(source, task, text, base_model, None, to=to, force=False, hub=hub)


def _embed(
    source: Source,
    task: int,
    text: str,
    base_model: str,
    out: str | os.PathLike[str] | None,
    *,
    to: str,
    force: bool,
    hub: HubOptions | None,
) -> tuple[bytes, EmbedResult]:
    """The payload and report of :func:`embed_request`; ``out`` (when given) is checked before
    anything is read from the base model."""
    import torch

    if to not in FORMATS:
        raise ConfigError(f"unknown format {to!r}; one of {', '.join(FORMATS)}")
    hub = hub or HubOptions()
    ckpt = load_source(source)
    extra: list[Finding] = []
    cols = ckpt.shapes.get("prefix_task_cols")
    if cols and len(cols) == 3:
        extra += _check_tasks("task", [task], cols[0])
    refused = decoder_only_finding(ckpt, "embed (vLLM's and SGLang's prompt embeddings)")
    if refused is not None:
        extra.append(refused)
    require_valid(ckpt, extra)
    if out is not None:  # never over the adapter, nor into the model folder the rows are read from
        guard_output(out, force=force, protected=[*ckpt.source_paths, *local_model_paths(base_model)], kind="file")
    d = ckpt.shapes["prompt_embeddings"][1]
    local = Path(base_model).expanduser()
    commit: str | None = None
    if os.path.exists(local):
        if not local.is_dir() or not (local / "tokenizer.json").exists():
            raise ConfigError(
                "the base model must be a folder with tokenizer.json (embed tokenizes with it)", str(local)
            )
        tokenizer_bytes = read_small(local / "tokenizer.json", MAX_TOKENIZER_BYTES, ConfigError)
        if tokenizer_bytes is None:
            raise ConfigError(f"tokenizer.json is over {MAX_TOKENIZER_BYTES} bytes", str(local))
        ids = _tokenize(tokenizer_bytes, text, str(local / "tokenizer.json"))
        matrix = _local_matrix(local, d, max(ids) + 1)
    else:
        from .hub.download import model_repo, reads_as_model_id

        if not reads_as_model_id(base_model):
            raise SourceError("no such model folder, and not a Hub repo id", base_model)

        repo = model_repo(base_model, hub.revision)  # org/name, org/name@rev or hf://org/name[@rev]
        matrix, ids, commit = _hub_matrix(
            repo.repo_id, d, hub.replace(revision=repo.revision), lambda data, where: _tokenize(data, text, where)
        )
    rows, read = _rows(matrix, ids)
    tag = matrix.info.dtype
    emb = (
        torch.from_numpy(rows.view(np.int16).copy()).view(torch.bfloat16)
        if tag == "BF16"
        else torch.from_numpy(rows.copy())
    )
    prompt32 = task_prompt(ckpt, task)
    dtype_name = DTYPE_NAMES[tag]
    peak = cast_overflow(prompt32, dtype_name)
    if peak is not None:  # PEFT's cast would feed the model Inf too; a payload with Inf is never useful
        raise ValidationError(
            f"task {task}'s prompt holds {peak:.5g}, which is Inf in {dtype_name}, the base model's embedding "
            f"dtype (largest finite {DTYPE_MAX[dtype_name]:.5g}): this model cannot take this task's prompt",
            ckpt.where,
        )
    if not bool(torch.isfinite(emb).all()):
        raise ValidationError(
            f"the base model's embedding rows for these tokens hold NaN or Inf ({matrix.file}:{matrix.info.name})",
            base_model,
        )
    prompt = prompt32.to(emb.dtype)  # as PEFT: prompts.to(inputs_embeds.dtype)
    full = torch.cat([prompt, emb], dim=0).contiguous()
    if to == "sglang":
        payload: bytes = json.dumps({"input_embeds": full.to(torch.float32).tolist()}).encode()
    else:
        import base64
        import io

        buffer = io.BytesIO()
        torch.save(full.clone(), buffer)
        # no newline after the base64: vLLM decodes it strictly (b64decode(validate=True))
        payload = buffer.getvalue() if to == "pt" else base64.b64encode(buffer.getvalue())
    info = matrix.info
    return payload, {
        "schema": "mpt-tools/embed/1",
        "source": ckpt.where,
        "task": task,
        "base_model": base_model,
        "base_model_commit": commit,
        "embedding": f"{matrix.file}:{info.name}",
        "token_ids": ids,
        "rows": int(full.shape[0]),
        "prompt_rows": int(prompt.shape[0]),
        "token_dim": d,
        "dtype": DTYPE_NAMES[tag],
        "bytes_read": read,
        "matrix_bytes": info.nbytes,
        "format": to,
        "out": None if out is None else str(out),
        "version": __version__,
    }
