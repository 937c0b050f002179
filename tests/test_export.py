"""``mpt-tools export`` (issue 13, items 1, 3 and 5): every format proved against its consumer's
own rules, with real PEFT as the oracle of each task's prompt.

- peft: the folders loaded with real PEFT, bitwise PEFT's MPT prompt for every task;
- tgis: the files loaded the way TGIS's prefix cache loads them (``_load_torch_file`` and
  ``_process_prefix_tensor`` of IBM/text-generation-inference, restated below), compared with
  PEFT's prompt; the file size shows no larger storage was saved; caikit's config.yml read the way
  caikit-nlp's ``PeftPromptTuningTGIS.load`` reads it;
- vllm: the base64 text decoded the way vLLM's ``safe_load_prompt_embeds`` decodes it;
- trtllm: the table row by row; npy: each file.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import FIXTURES, ROOT, run_cli, write_random_source

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft import MultitaskPromptTuningConfig, PeftModel, get_peft_model  # noqa: E402
from peft_oracle import tiny_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from mpt_tools.export import ExportOptions, export_prompts  # noqa: E402
from mpt_tools.options import ConfigOverrides, SourceSpec  # noqa: E402

CAUSAL = FIXTURES / "causal"
SEQ2SEQ = FIXTURES / "seq2seq"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def peft_prompt(adapter: Path, task_type: str, task: int | None = None) -> torch.Tensor:
    """The prompt real PEFT builds from a saved adapter (task_ids=[task] for MPT), [T, d]."""
    model = PeftModel.from_pretrained(tiny_model(task_type), str(adapter))
    ids = None if task is None else torch.tensor([task])
    with torch.no_grad():
        return model.get_prompt(batch_size=1, task_ids=ids)[0].detach().clone()


_PEFT_CACHE: dict[tuple[str, str, int], torch.Tensor] = {}


def mpt_prompt(adapter: Path, task_type: str, task: int) -> torch.Tensor:
    key = (str(adapter), task_type, task)
    if key not in _PEFT_CACHE:
        _PEFT_CACHE[key] = peft_prompt(adapter, task_type, task)
    return _PEFT_CACHE[key]


def export(*args: Any) -> Any:
    res = run_cli("export", *args)
    assert res.exit_code == 0, res.output + res.stderr
    return res


# --- the consumers' own loaders, restated --------------------------------------------------------


def tgis_load(
    folder: Path, *, encoder_decoder: bool, embed_size: int, dtype: torch.dtype, max_length: int
) -> dict[str, torch.Tensor]:
    """What TGIS's PrefixCache makes of a prefix folder on its .pt path: each file loaded with
    ``torch.load(weights_only=True, map_location=cpu)``, then a 2-D tensor with
    0 < rows <= max_length, an even row count for encoder-decoder models, ``embed_size`` columns,
    cast to the model dtype and finite after the cast (else TGIS raises). A folder holding an
    ``adapter_model.*`` file would take the PEFT path instead."""
    assert "adapter_model" not in [os.path.splitext(f)[0] for f in os.listdir(folder)]
    out = {}
    for name in ("decoder.pt", "encoder.pt"):
        path = folder / name
        if not path.is_file():
            continue
        prefix = torch.load(path, weights_only=True, map_location=torch.device("cpu"))
        assert torch.is_tensor(prefix) and len(prefix.shape) == 2, "Invalid prefix embedding tensor"
        assert 0 < prefix.shape[0] <= max_length, f"Invalid prefix embedding length of {prefix.shape[0]}"
        assert not (encoder_decoder and prefix.shape[0] % 2), "Encoder/decoder prefix tensor must be of even length"
        assert prefix.shape[1] == embed_size
        converted = prefix.to(dtype)
        assert bool(converted.isfinite().all()), "non-finite after conversion"
        out[name] = converted
    assert "decoder.pt" in out or (encoder_decoder and out), "Prefix not found"
    return out


def vllm_load(text: bytes, *, hidden_size: int, dtype: torch.dtype, max_model_len: int) -> torch.Tensor:
    """What vLLM's ``safe_load_prompt_embeds`` makes of a base64 ``prompt_embeds`` payload:
    strict base64, ``torch.load(weights_only=True, map_location=cpu)`` of a float tensor, dense,
    a leading batch dimension squeezed, 2-D, the model's hidden size, cast to the model dtype;
    and no longer than the model's context."""
    payload = base64.b64decode(text, validate=True)
    tensor = torch.load(io.BytesIO(payload), weights_only=True, map_location=torch.device("cpu"))
    assert isinstance(tensor, torch.Tensor) and tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)
    tensor = tensor.to_dense()
    if tensor.dim() > 2:
        tensor = tensor.squeeze(0)
    assert tensor.dim() == 2 and tensor.shape[1] == hidden_size
    assert tensor.shape[0] <= max_model_len
    return tensor.to(dtype)


def caikit_tgis_load(folder: Path) -> tuple[str, list[Path], dict[str, Any]]:
    """What caikit-nlp's ``PeftPromptTuningTGIS.load`` takes from a module folder: its config.yml
    (caikit's ModuleConfig needs a ``module_id`` and no ``model_path``), the prompt id (the folder's
    name) and the artifact files named by the ENCODER and DECODER keys."""
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((folder / "config.yml").read_text())
    assert config["module_id"] and "model_path" not in config
    artifacts = [folder / config[key] for key in ("ENCODER", "DECODER") if config.get(key)]
    return folder.name, artifacts, config


# --- peft ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["causal", "causal_bf16", "causal_bin"])
def test_peft_folders_are_bitwise_peft_for_every_task(tmp_path: Path, fixture: str) -> None:
    src = FIXTURES / fixture
    out = tmp_path / "prompts"
    export(src, "--to", "peft", "--out", out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tasks"]] == ["task_0", "task_1", "task_2"]
    assert manifest["rows_of_each_file"] == {"<name>/adapter_model.safetensors": [0, 4]}  # the config holds none
    for k in range(3):
        folder = out / f"task_{k}"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "PROMPT_TUNING"
        assert torch.equal(peft_prompt(folder, "CAUSAL_LM"), mpt_prompt(src, "CAUSAL_LM", k))
        # what TGIS's PEFT path and vLLM's prompt adapters read: prompt_embeddings, [nvt, d]
        weights = load_file(str(folder / "adapter_model.safetensors"))
        assert list(weights) == ["prompt_embeddings"]
        assert weights["prompt_embeddings"].shape == (config["num_virtual_tokens"], config["token_dim"])
        assert torch.equal(weights["prompt_embeddings"], mpt_prompt(src, "CAUSAL_LM", k))


def test_export_prompt_and_export_peft_write_the_same_prompt(tmp_path: Path) -> None:
    """export-prompt (one task, one folder) stays; export --to peft --tasks K writes the same tensor."""
    assert run_cli("export-prompt", CAUSAL, "--task", "2", "--out", tmp_path / "one").exit_code == 0
    export(CAUSAL, "--to", "peft", "--tasks", "2", "--out", tmp_path / "all")
    a = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))["prompt_embeddings"]
    b = load_file(str(tmp_path / "all" / "task_2" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert torch.equal(a, b)
    one = json.loads((tmp_path / "one" / "adapter_config.json").read_text())
    assert json.loads((tmp_path / "all" / "task_2" / "adapter_config.json").read_text()) == one


def test_prompts_are_bitwise_pefts_forward_at_larger_shapes(tmp_path: Path) -> None:
    """At shapes where torch vectorises (T=200, r=16, d=1024), each exported prompt is bitwise
    what PEFT's MultitaskPromptEmbedding.forward computes (P* gathered, times the product in place)."""
    from mpt_tools.checkpoint import load_source
    from mpt_tools.export import task_prompts

    src = write_random_source(tmp_path / "src.safetensors", n=6, t=200, r=16, d=1024)
    ckpt = load_source(SourceSpec(str(src), overrides=ConfigOverrides(task_type="CAUSAL_LM")))
    weights = load_file(str(src))
    for k, prompt in task_prompts(ckpt, [5, 0, 3]):
        want = weights["prompt_embeddings"].unsqueeze(0).clone()
        want *= torch.matmul(weights["prefix_task_cols"][[k]], weights["prefix_task_rows"][[k]])
        assert torch.equal(prompt, want[0]), k


def test_chunks_change_no_byte_and_bound_the_reads(tmp_path: Path) -> None:
    """1 task per chunk and all tasks in one chunk write the same bytes; every read of the factors
    stays within the chunk budget (memory is bounded for any number of tasks)."""
    from mpt_tools.checkpoint import load_source

    src = write_random_source(tmp_path / "src.safetensors", n=40, t=6, r=3, d=32)
    spec = SourceSpec(str(src), overrides=ConfigOverrides(task_type="CAUSAL_LM"))
    limit = 1000
    ckpt = load_source(spec)
    export_prompts(ckpt, "trtllm", tmp_path / "small", options=ExportOptions(chunk_bytes=limit))
    reads = [r for r in ckpt.file.reads if r[0] != "prompt_embeddings"]
    assert len(reads) > 4 and max(r[3] for r in reads) <= limit
    export_prompts(spec, "trtllm", tmp_path / "big", options=ExportOptions(chunk_bytes=1 << 30))
    small, big = ((tmp_path / d / "prompt_table.npy").read_bytes() for d in ("small", "big"))
    assert small == big


# --- tgis (and caikit) ----------------------------------------------------------------------------


def test_a_forced_partial_export_keeps_the_manifest_true_to_the_folder(tmp_path: Path) -> None:
    """``--force --tasks 0`` into an earlier export of the same source, format and dtype: the manifest
    lists the tasks left in place too; of another dtype it lists only its own and a warning names
    the rest; a table (trtllm) is rewritten whole."""
    out = tmp_path / "store"
    export(CAUSAL, "--to", "tgis", "--out", out)
    export(CAUSAL, "--to", "tgis", "--tasks", "0", "--out", out, "--force")
    listed = json.loads((out / "manifest.json").read_text())["tasks"]
    assert sorted(t["name"] for t in listed) == ["task_0", "task_1", "task_2"]
    assert all((out / f).is_file() for t in listed for f in t["files"])
    res = export(CAUSAL, "--to", "tgis", "--tasks", "1", "--dtype", "float16", "--out", out, "--force")
    assert [t["name"] for t in json.loads((out / "manifest.json").read_text())["tasks"]] == ["task_1"]
    assert "2 task(s) of an earlier export stay in" in res.stderr and "task_0" in res.stderr
    table = tmp_path / "table"
    export(CAUSAL, "--to", "trtllm", "--out", table)
    export(CAUSAL, "--to", "trtllm", "--tasks", "2", "--out", table, "--force")
    assert [t["task"] for t in json.loads((table / "manifest.json").read_text())["tasks"]] == [2]
    hostile = tmp_path / "hostile"  # an earlier manifest naming files outside the folder is not trusted
    export(CAUSAL, "--to", "npy", "--out", hostile)
    data = json.loads((hostile / "manifest.json").read_text())
    data["tasks"][1]["files"] = ["../../etc/passwd"]
    (hostile / "manifest.json").write_text(json.dumps(data))
    export(CAUSAL, "--to", "npy", "--tasks", "0", "--out", hostile, "--force")
    names = [t["name"] for t in json.loads((hostile / "manifest.json").read_text())["tasks"]]
    assert sorted(names) == ["task_0", "task_2"]


def test_the_manifest_leads_back_to_a_named_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``source`` joined with ``source_file`` is the weights file read, for a named adapter in a
    subfolder too (the subfolder was dropped: ``A`` + ``adapter_model.safetensors``)."""
    shutil.copytree(CAUSAL, tmp_path / "A" / "my adapter")
    monkeypatch.chdir(tmp_path)
    export("A", "--subfolder", "my adapter", "--to", "npy", "--out", "out")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    weights = Path(manifest["source"]) / manifest["source_file"]
    assert weights.is_file() and manifest["source_file"] == "my adapter/adapter_model.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["source_sha256"]


@pytest.mark.parametrize("name", ["sources.v2", "my prompts"])
def test_a_folder_name_tgis_cannot_take_in_a_prefix_id_is_a_warning(tmp_path: Path, name: str) -> None:
    """TGIS fullmatches prefix ids against [/\\w-]+: under the parent, 'sources.v2/task_0' would be
    refused at request time, so serve lines name the folder itself as the store, and a warning says why."""
    out = tmp_path / "store" / name
    res = export(CAUSAL, "--to", "tgis", "--out", out)
    assert f"the folder name {name!r} cannot be part of a TGIS prefix id" in res.stderr
    quoted = f"'{out}'" if " " in name else str(out)  # as a shell takes it
    assert f"PREFIX_STORE_PATH={quoted} " in res.stdout and "prefix_id='task_0'" in res.stdout
    assert f"{name}/task_0" not in res.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert not any(f"{name}/task_0" in line for line in manifest["serve"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_tgis_store_loads_as_tgis_loads_it(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "store" / "sources"
    res = export(CAUSAL, "--to", "tgis", "--dtype", dtype, "--max-prefix-len", "4", "--out", out)
    assert "prefix_id='sources/task_0'" in res.stdout
    for k in range(3):
        folder = out / f"task_{k}"
        assert sorted(os.listdir(folder)) == ["decoder.pt"]
        loaded = tgis_load(folder, encoder_decoder=False, embed_size=16, dtype=DTYPES[dtype], max_length=4)
        assert torch.equal(loaded["decoder.pt"], mpt_prompt(CAUSAL, "CAUSAL_LM", k).to(DTYPES[dtype]))
        # a bare tensor that owns its storage: the file holds T * d values, not a larger storage
        raw = torch.load(folder / "decoder.pt", weights_only=True, map_location="cpu")
        assert raw.dtype == DTYPES[dtype] and raw.is_contiguous() and raw.storage_offset() == 0
        nbytes = raw.numel() * raw.element_size()
        assert raw.untyped_storage().nbytes() == nbytes
        assert (folder / "decoder.pt").stat().st_size < nbytes + 1600


def test_the_size_check_sees_a_saved_view(tmp_path: Path) -> None:
    """The size bound above fails for what it guards against: a saved view of a larger tensor
    (caikit's slice, TGIS's mt0 fixture) carries the whole storage."""
    big = torch.zeros(64, 16)
    torch.save(big[:4], tmp_path / "view.pt")
    assert (tmp_path / "view.pt").stat().st_size > 4 * 16 * 4 + 1600


def _seq2seq_source(tmp_path: Path, nvt: int = 4) -> Path:
    """A seq2seq MPT adapter (2 submodules) saved by real PEFT, with factors of size ~1."""
    torch.manual_seed(1)
    cfg = MultitaskPromptTuningConfig(
        task_type="SEQ_2_SEQ_LM", num_virtual_tokens=nvt, num_tasks=3, num_ranks=2, token_dim=16
    )
    model = get_peft_model(tiny_model("SEQ_2_SEQ_LM"), cfg)
    enc = model.prompt_encoder["default"]
    with torch.no_grad():
        enc.prefix_task_cols.normal_()
        enc.prefix_task_rows.normal_()
    folder = tmp_path / "t5-sources"
    model.save_pretrained(str(folder))
    return folder


def test_tgis_seq2seq_splits_encoder_and_decoder_halves(tmp_path: Path) -> None:
    src = _seq2seq_source(tmp_path)
    out = tmp_path / "store" / "t5"
    export(src, "--to", "tgis", "--caikit", "--out", out)
    for k in range(3):
        folder = out / f"task_{k}"
        loaded = tgis_load(folder, encoder_decoder=True, embed_size=16, dtype=torch.float32, max_length=8)
        full = mpt_prompt(src, "SEQ_2_SEQ_LM", k)
        assert full.shape == (8, 16)
        assert torch.equal(loaded["encoder.pt"], full[:4])  # rows 0:nvt
        assert torch.equal(loaded["decoder.pt"], full[4:])  # rows nvt:2nvt (caikit-nlp puts 0:nvt in both)
        prompt_id, artifacts, config = caikit_tgis_load(folder)
        assert prompt_id == f"task_{k}" and sorted(a.name for a in artifacts) == ["decoder.pt", "encoder.pt"]
        assert all(a.is_file() for a in artifacts)
        assert config["module_id"] == "6655831b-960a-4dc5-8df4-867026e2cd41"
        assert json.loads(config["output_model_types"]) == ["ENCODER", "DECODER"]
        assert config["task_type"] == "SEQ_2_SEQ_LM" and config["trained_torch_dtype"] == "float32"
    # only the encoder half, as PEFT's generate() uses
    export(src, "--to", "tgis", "--encoder-only", "--out", tmp_path / "enc")
    assert sorted(os.listdir(tmp_path / "enc" / "task_2")) == ["encoder.pt"]
    enc = tgis_load(tmp_path / "enc" / "task_2", encoder_decoder=True, embed_size=16, dtype=torch.float32, max_length=8)
    assert torch.equal(enc["encoder.pt"], mpt_prompt(src, "SEQ_2_SEQ_LM", 2)[:4])


def test_seq2seq_hints_name_only_what_serves_them(tmp_path: Path) -> None:
    """An encoder-decoder prompt exported --to peft --encoder-only: the serving lines name PEFT and
    TGIS's own files, not the decoder-only engines; the refusal without --encoder-only offers --to
    tgis only where TGIS takes the prefix length (even: 4 here; the fixture's 3 is odd)."""
    even = _seq2seq_source(tmp_path)  # nvt 4
    res = run_cli("export", even, "--to", "peft", "--encoder-only", "--out", tmp_path / "p", "--json")
    assert res.exit_code == 0, res.stderr
    serve = " ".join(json.loads(res.stdout)["serve"])
    assert "PeftModel.from_pretrained" in serve and "--to tgis" in serve
    assert "--enable-prompt-adapter" not in serve and "PromptAdapterRequest" not in serve
    assert "--to tgis" in run_cli("export", even, "--to", "peft", "--out", tmp_path / "q").stderr
    odd = run_cli("export", SEQ2SEQ, "--to", "peft", "--out", tmp_path / "r")
    assert odd.exit_code == 1 and "--encoder-only" in odd.stderr and "--to tgis" not in odd.stderr, odd.stderr
    causal = json.loads(run_cli("export", CAUSAL, "--to", "peft", "--out", tmp_path / "c", "--json").stdout)
    assert any("--enable-prompt-adapter" in line for line in causal["serve"])


def test_tgis_causal_caikit_config(tmp_path: Path) -> None:
    export(CAUSAL, "--to", "tgis", "--caikit", "--tasks", "1", "--names", "qa", "--out", tmp_path / "s")
    prompt_id, artifacts, config = caikit_tgis_load(tmp_path / "s" / "qa")
    assert prompt_id == "qa" and [a.name for a in artifacts] == ["decoder.pt"]
    assert config["ENCODER"] == "" and config["base_model_name"] == "tiny-random/gpt2"
    assert config["eos_token"] is None and config["has_base_model"] is False


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--to", "tgis"], "odd prefix length"),  # the fixture's nvt is 3
        (["--to", "tgis", "--max-prefix-len", "2", "--encoder-only"], "MAX_PROMPT_PREFIX_LENGTH"),
        (["--to", "vllm"], "decoder-only"),
        (["--to", "trtllm"], "decoder-only"),
        (["--to", "peft"], "--encoder-only"),
    ],
)
def test_engine_limits_are_refused_before_writing(tmp_path: Path, argv: list[str], expect: str) -> None:
    out = tmp_path / "out"
    res = run_cli("export", SEQ2SEQ, *argv, "--out", out)
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], res.stderr
    assert not out.exists()


def test_max_prefix_len_names_the_task_and_rows(tmp_path: Path) -> None:
    res = run_cli("export", CAUSAL, "--to", "tgis", "--max-prefix-len", "3", "--tasks", "2,1", "--out", tmp_path / "o")
    assert res.exit_code == 1
    assert "task 2's decoder.pt (every task's) would hold 4 rows" in res.stderr
    assert not (tmp_path / "o").exists()


# --- vllm -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vllm_payloads_decode_as_vllm_decodes_them(tmp_path: Path, dtype: str) -> None:
    out = tmp_path / "embeds"
    export(CAUSAL, "--to", "vllm", "--dtype", dtype, "--out", out)
    for k in range(3):
        pt, b64 = out / f"task_{k}.pt", out / f"task_{k}.b64"
        assert base64.b64decode(b64.read_bytes(), validate=True) == pt.read_bytes()  # the same bytes
        want = mpt_prompt(CAUSAL, "CAUSAL_LM", k).to(DTYPES[dtype])
        got = vllm_load(b64.read_bytes(), hidden_size=16, dtype=torch.bfloat16, max_model_len=64)
        assert torch.equal(got, want.to(torch.bfloat16))
        offline = torch.load(pt, weights_only=True, map_location="cpu")  # LLM.generate({"prompt_embeds": ...})
        assert offline.dtype == DTYPES[dtype] and torch.equal(offline, want)
        assert offline.untyped_storage().nbytes() == offline.numel() * offline.element_size()


@pytest.mark.parametrize("fmt", ["vllm", "npy"])
def test_float16_overflow_is_refused_with_the_task_and_value(tmp_path: Path, fmt: str) -> None:
    """A prompt whose values fit float32 but not float16 (|x| >= 65520) is refused before anything
    is written, naming the task and the value; float32 and bfloat16 take it."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "src"
    shutil.copytree(CAUSAL, folder)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["prompt_embeddings"] = np.full_like(tensors["prompt_embeddings"], 1.0)
    cols = tensors["prefix_task_cols"].copy()
    cols[1] = 0.0
    cols[1, 2, 0] = 1000.0
    rows = tensors["prefix_task_rows"].copy()
    rows[1] = 0.0
    rows[1, 0, 5] = 80.0  # task 1's prompt holds 80000 at [2, 5]
    tensors["prefix_task_cols"], tensors["prefix_task_rows"] = cols, rows
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    res = run_cli("export", folder, "--to", fmt, "--dtype", "float16", "--out", out)
    assert res.exit_code == 1
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and "task 1's prompt holds 80000, which is Inf in float16" in line
    assert not out.exists()
    export(folder, "--to", fmt, "--dtype", "bfloat16", "--out", out)
    if fmt == "vllm":
        stored = torch.load(out / "task_1.pt", weights_only=True)[2, 5]  # bfloat16 rounds it
        assert stored.dtype == torch.bfloat16 and stored.item() == torch.tensor(80000.0).bfloat16().item()
    else:
        assert np.load(out / "task_1.npy")[2, 5] == 80000.0


def test_base_model_hidden_size_is_checked(tmp_path: Path) -> None:
    for size in (16, 32):
        (tmp_path / f"base{size}").mkdir()
        (tmp_path / f"base{size}" / "config.json").write_text(json.dumps({"hidden_size": size}))
    res = run_cli("export", CAUSAL, "--to", "npy", "--base-model", tmp_path / "base32", "--out", tmp_path / "o")
    assert (
        res.exit_code == 1 and "does not match the base model" in res.stderr and "expected 32, found 16" in res.stderr
    )
    assert not (tmp_path / "o").exists()
    export(CAUSAL, "--to", "npy", "--base-model", tmp_path / "base16", "--out", tmp_path / "o")


# --- trtllm and npy -------------------------------------------------------------------------------


def test_trtllm_table_row_by_row(tmp_path: Path) -> None:
    res = export(CAUSAL, "--to", "trtllm", "--out", tmp_path / "t")
    assert "--max_prompt_embedding_table_size >= 12" in res.stdout
    assert "removed in 2026" in res.stderr
    table = np.load(tmp_path / "t" / "prompt_table.npy")
    assert table.dtype == np.float32 and table.shape == (3, 4, 16) and table.flags.c_contiguous
    for k in range(3):
        assert np.array_equal(table[k], mpt_prompt(CAUSAL, "CAUSAL_LM", k).numpy())
    # the same bytes numpy.save writes for the stacked prompts
    buf = io.BytesIO()
    np.save(buf, table)
    assert (tmp_path / "t" / "prompt_table.npy").read_bytes() == buf.getvalue()
    # a subset in another order: row i is the i-th listed task
    export(CAUSAL, "--to", "trtllm", "--tasks", "2,0", "--out", tmp_path / "s")
    sub = np.load(tmp_path / "s" / "prompt_table.npy")
    assert np.array_equal(sub[0], table[2]) and np.array_equal(sub[1], table[0])
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert [(t["task"], t["index"]) for t in manifest["tasks"]] == [(2, 0), (0, 1)]


def test_npy_files(tmp_path: Path) -> None:
    export(CAUSAL, "--to", "npy", "--dtype", "float16", "--names", "a,b,c", "--out", tmp_path / "n")
    for k, name in enumerate("abc"):
        arr = np.load(tmp_path / "n" / f"{name}.npy")
        assert arr.dtype == np.float32 and arr.shape == (4, 16)
        assert np.array_equal(arr, mpt_prompt(CAUSAL, "CAUSAL_LM", k).numpy())


# --- manifest, output and arguments ---------------------------------------------------------------


def test_manifest_and_json_result(tmp_path: Path) -> None:
    res = export(CAUSAL, "--to", "vllm", "--tasks", "0,2", "--names", "qa,nli", "--out", tmp_path / "v", "--json")
    result = json.loads(res.stdout)
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert result["schema"] == "mpt-tools/export/1" and manifest["schema"] == "mpt-tools/export-manifest/1"
    assert manifest["source_sha256"] == result["source_sha256"]
    assert (manifest["T"], manifest["d"], manifest["dtype"]) == (4, 16, "float32")
    assert [(t["task"], t["name"], t["files"]) for t in manifest["tasks"]] == [
        (0, "qa", ["qa.pt", "qa.b64"]),
        (2, "nli", ["nli.pt", "nli.b64"]),
    ]
    assert manifest["serve"] == result["serve"] and any("--enable-prompt-embeds" in s for s in manifest["serve"])
    assert sorted(os.listdir(tmp_path / "v")) == ["manifest.json", "nli.b64", "nli.pt", "qa.b64", "qa.pt"]
    assert sorted(result["files"]) == sorted(str(tmp_path / "v" / f) for f in os.listdir(tmp_path / "v"))


def test_never_overwrites_without_force(tmp_path: Path) -> None:
    out = tmp_path / "store"
    export(CAUSAL, "--to", "tgis", "--out", out)
    (out / "other").mkdir()  # someone else's prefix: never touched
    (out / "other" / "decoder.pt").write_bytes(b"x")
    (out / "task_1" / "stale.txt").write_text("old")
    before = (out / "task_1" / "decoder.pt").read_bytes()
    res = run_cli("export", CAUSAL, "--to", "tgis", "--dtype", "bfloat16", "--out", out)
    assert res.exit_code == 1 and "task_0 already exists here; pass --force" in res.stderr
    assert (out / "task_1" / "decoder.pt").read_bytes() == before
    export(CAUSAL, "--to", "tgis", "--dtype", "bfloat16", "--out", out, "--force")
    assert sorted(os.listdir(out / "task_1")) == ["decoder.pt"]  # the folder was replaced whole
    assert torch.load(out / "task_1" / "decoder.pt", weights_only=True).dtype == torch.bfloat16
    assert (out / "other" / "decoder.pt").read_bytes() == b"x"
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no staging left
    res = run_cli("export", CAUSAL, "--to", "npy", "--out", CAUSAL)
    assert res.exit_code == 1 and "source's own folder" in res.stderr


def test_force_without_an_atomic_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the kernel cannot swap two folders in one step, the old folder is moved aside first
    and removed after: the same result."""
    from mpt_tools import files

    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    out = tmp_path / "store"
    export(CAUSAL, "--to", "peft", "--out", out)
    (out / "task_0" / "stale.txt").write_text("old")
    export(CAUSAL, "--to", "peft", "--dtype", "bfloat16", "--out", out, "--force")
    assert sorted(os.listdir(out / "task_0")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert load_file(str(out / "task_0" / "adapter_model.safetensors"))["prompt_embeddings"].dtype == torch.bfloat16
    assert sorted(os.listdir(out)) == ["manifest.json", "task_0", "task_1", "task_2"]


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--tasks", "0,0"], "listed more than once"),
        (["--tasks", "3"], "the source has 3 tasks"),
        (["--tasks", "0,1", "--names", "a"], "one name per exported task"),
        (["--names", "a,b,../c"], "a name must be"),
        (["--names", "a,a,b"], "names must be distinct"),
        (["--names", "QA,qa,b"], "names must be distinct, ignoring case (found ['QA', 'qa'])"),
        (["--names", "a,Manifest,b"], "a name must be"),
        (["--names", "manifest.json,b,c"], "a name must be"),  # --to peft would write a folder of that name
        (["--names", "a,PROMPT_TABLE.npy,c"], "a name must be"),
        (["--caikit"], "applies to --to tgis"),
        (["--peft-compat", "0.13.2"], "applies to --to peft"),
        (["--encoder-only"], "applies to seq2seq"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path: Path, argv: list[str], expect: str) -> None:
    out = tmp_path / "o"
    for to in ("npy", "peft") if "--names" in argv else ("npy",):
        res = run_cli("export", CAUSAL, "--to", to, *argv, "--out", out)
        assert res.exit_code == 1, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and expect in res.stderr, res.stderr
        assert not out.exists()


def test_an_entry_that_is_or_holds_a_source_is_refused(tmp_path: Path) -> None:
    """A tester's finding: ``export src --names src,b,c --out . --force`` replaced the source folder
    with task 0's prompt (``--out`` is the source's parent, not the source, so the guard let it by)."""
    src = tmp_path / "src"
    shutil.copytree(CAUSAL, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    for to in ("peft", "tgis"):
        res = run_cli("export", src, "--to", to, "--names", "src,b,c", "--out", tmp_path, "--force")
        assert res.exit_code == 1 and "src here is the source's folder; mpt-tools never" in res.stderr, res.stderr
        assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    bare = tmp_path / "bare.npy"  # a task named like a bare source file (--to npy adds .npy)
    np.save(bare, np.zeros((4, 16), np.float32))
    res = run_cli("export", src / "adapter_model.safetensors", "--to", "npy", "--names", "bare,b,c", "--out", tmp_path)
    assert res.exit_code == 1 and "already exists" in res.stderr  # without --force: not overwritten either
    assert not (tmp_path / "b.npy").exists()


def test_the_base_model_folder_is_protected(tmp_path: Path) -> None:
    """A tester's finding: ``--base-model ./model --out ./model --force`` could replace the model's
    own files with exported tasks."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 16}))
    (model / "model.safetensors").write_bytes(b"weights")
    argv = ["--to", "peft", "--names", "model.safetensors,b,c", "--base-model", model, "--out", model, "--force"]
    res = run_cli("export", CAUSAL, *argv)
    assert res.exit_code == 1 and "never writes into a source" in res.stderr, res.stderr
    assert (model / "model.safetensors").read_bytes() == b"weights"
    export(CAUSAL, "--to", "npy", "--base-model", model, "--out", tmp_path / "ok")  # elsewhere it is fine


def test_tasks_all_or_a_list(tmp_path: Path) -> None:
    assert run_cli("export", CAUSAL, "--to", "npy", "--tasks", "x,1", "--out", tmp_path / "o").exit_code == 2
    export(CAUSAL, "--to", "npy", "--tasks", "ALL", "--out", tmp_path / "o")
    assert len(list((tmp_path / "o").glob("*.npy"))) == 3


# --- item 5: the serving hazard -------------------------------------------------------------------


def _codes(report: dict[str, Any]) -> list[str]:
    return [f["code"] for f in report["findings"]]


def test_serving_hazard_in_validate_and_inspect(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "store"
    export(CAUSAL, "--to", "tgis", "--out", store)  # a real prefix store: task_0/decoder.pt, ...
    shutil.copytree(CAUSAL, store / "mpt")  # and an MPT folder dropped into it
    for argv in (["validate", store / "mpt", "--json"], ["inspect", store / "mpt", "--no-norms", "--json"]):
        res = run_cli(*argv)
        assert res.exit_code == 0, res.stderr  # a warning, not an error
        report = json.loads(res.stdout)
        hazard = [f for f in report["findings"] if f["code"] == "serving-hazard"]
        assert len(hazard) == 1 and hazard[0]["level"] == "warning"
        assert "sibling folder(s) with decoder.pt" in hazard[0]["found"]
        assert f"mpt-tools export {store / 'mpt'} --to tgis" in hazard[0]["fix"]
    # the README's layout: the prefixes one level down (nested prefix ids, store2/sources/task_0), the
    # MPT folder beside them; a sibling whose subfolders hold no TGIS file is no sign
    store2 = tmp_path / "store2"
    export(CAUSAL, "--to", "tgis", "--out", store2 / "sources")
    shutil.copytree(CAUSAL, store2 / "mpt")
    hazard = json.loads(run_cli("validate", store2 / "mpt", "--json").stdout)["findings"]
    assert [f["code"] for f in hazard].count("serving-hazard") == 1
    assert "in their subfolders: sources" in next(f for f in hazard if f["code"] == "serving-hazard")["found"]
    quiet = tmp_path / "quiet"
    (quiet / "runs" / "a").mkdir(parents=True)
    (quiet / "runs" / "a" / "notes.pt").write_bytes(b"")
    shutil.copytree(CAUSAL, quiet / "mpt")
    assert "serving-hazard" not in _codes(json.loads(run_cli("validate", quiet / "mpt", "--json").stdout))
    # decoder.pt beside the MPT adapter
    solo = tmp_path / "solo" / "m"
    shutil.copytree(CAUSAL, solo)
    (solo / "decoder.pt").write_bytes(b"")
    report = json.loads(run_cli("validate", solo, "--json").stdout)
    assert "serving-hazard" in _codes(report)
    assert "decoder.pt beside" in next(f for f in report["findings"] if f["code"] == "serving-hazard")["found"]
    # inside $PREFIX_STORE_PATH
    plain = tmp_path / "plain" / "m"
    shutil.copytree(CAUSAL, plain)
    assert "serving-hazard" not in _codes(json.loads(run_cli("validate", plain, "--json").stdout))
    monkeypatch.setenv("PREFIX_STORE_PATH", str(tmp_path / "plain"))
    report = json.loads(run_cli("validate", plain, "--json").stdout)
    assert "PREFIX_STORE_PATH" in next(f for f in report["findings"] if f["code"] == "serving-hazard")["found"]
    # the human output says it too
    assert "every task would be served with P*" in run_cli("validate", plain).stdout
    # however the folder is spelled (a tester's finding: "validate ." from inside it saw no hazard)
    monkeypatch.delenv("PREFIX_STORE_PATH")
    monkeypatch.chdir(store / "mpt")
    for spelling in (".", "adapter_model.safetensors", "../mpt", str(store / "mpt" / ".")):
        report = json.loads(run_cli("validate", spelling, "--json").stdout)
        assert _codes(report).count("serving-hazard") == 1, spelling  # the weights file: its folder's config


def test_no_serving_hazard_for_fixtures_files_or_exports(tmp_path: Path) -> None:
    for src in (CAUSAL, SEQ2SEQ, CAUSAL / "adapter_model.safetensors"):
        assert "serving-hazard" not in _codes(json.loads(run_cli("validate", src, "--json").stdout))
    export(CAUSAL, "--to", "peft", "--out", tmp_path / "p")  # baked PROMPT_TUNING folders are the fix
    res = run_cli("validate", tmp_path / "p" / "task_0", "--json")
    assert "serving-hazard" not in _codes(json.loads(res.stdout))


# --- README ---------------------------------------------------------------------------------------


def serving_section() -> str:
    readme = (ROOT / "README.md").read_text()
    return readme.split("## Serving", 1)[1].split("\n## ", 1)[0]


def test_readme_serving_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `mpt-tools export` line of the README's Serving section runs as written (``sources``
    is the causal fixture) and writes what the section says."""
    shutil.copytree(CAUSAL, tmp_path / "sources")
    monkeypatch.chdir(tmp_path)
    lines = [
        line.split("#")[0].split()
        for block in re.findall(r"```bash\n(.*?)```", serving_section(), flags=re.S)
        for line in block.splitlines()
        if line.startswith("mpt-tools export")
    ]
    assert len(lines) >= 5
    for argv in lines:
        res = run_cli(*argv[1:])
        assert res.exit_code == 0, (argv, res.stderr)
    assert (tmp_path / "store" / "sources" / "task_2" / "decoder.pt").is_file()
    assert (tmp_path / "prompts" / "task_2" / "adapter_config.json").is_file()
    assert (tmp_path / "embeds" / "task_2.b64").is_file()
    assert np.load(tmp_path / "table" / "prompt_table.npy").shape == (3, 4, 16)


def test_readme_serving_python_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The section's Python blocks run as written against the files its commands wrote
    (``base_model`` a tiny GPT-2) and hold task 2's prompt."""
    test_readme_serving_commands_run(tmp_path, monkeypatch)
    blocks = re.findall(r"```python\n(.*?)```", serving_section(), flags=re.S)
    namespace: dict[str, Any] = {"base_model": tiny_model("CAUSAL_LM")}
    for block in blocks:
        exec(compile(block, "README.md#serving", "exec"), namespace)
    want = mpt_prompt(CAUSAL, "CAUSAL_LM", 2)
    with torch.no_grad():
        assert torch.equal(namespace["model"].get_prompt(batch_size=1)[0], want)
    assert torch.equal(namespace["prompt"], want.to(torch.bfloat16))
    got = vllm_load(
        namespace["request"]["prompt_embeds"].encode(), hidden_size=16, dtype=torch.float32, max_model_len=64
    )
    assert torch.equal(got, want.to(torch.bfloat16).float())
    assert np.array_equal(namespace["rows"], want.numpy())


@pytest.mark.parametrize("existing", [False, True])
def test_two_exports_at_once_both_stay_in_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    """A tester's finding: two ``export --force`` runs into one folder at once each merged the
    manifest they read before the other finished: 1200 files, 600 listed. The merge now runs under
    the folder's lock. Here the other export finishes between this one's staging and its commit."""
    import mpt_tools.export as ex

    out = tmp_path / "o"
    if existing:
        export(CAUSAL, "--to", "npy", "--tasks", "2", "--out", out)
    real = ex.replace_entries
    calls: list[int] = []

    def other_finishes_first(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(1)
            export_prompts(str(CAUSAL), "npy", out, tasks=[1], force=True)
        return real(*args, **kwargs)

    monkeypatch.setattr(ex, "replace_entries", other_finishes_first)
    export_prompts(str(CAUSAL), "npy", out, tasks=[0], force=True)
    listed = sorted(t["name"] for t in json.loads((out / "manifest.json").read_text())["tasks"])
    on_disk = sorted(p.stem for p in out.glob("*.npy"))
    assert listed == on_disk == (["task_0", "task_1", "task_2"] if existing else ["task_0", "task_1"])
