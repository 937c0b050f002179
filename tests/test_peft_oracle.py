"""mpt-tools init against PEFT's own init, bitwise, across shapes, dtypes and modes; and the
written adapters load into real PEFT anywhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from peft_oracle import peft_init, tiny_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mpt_tools import init_adapter  # noqa: E402
from mpt_tools.modes import TargetPlan  # noqa: E402
from mpt_tools.options import ConfigOverrides, SourceSpec  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_NAMES = {"average": "AVERAGE_SOURCE_TASKS", "exact": "EXACT_SOURCE_TASK", "shared": "ONLY_SOURCE_SHARED"}


def make_source(tmp: Path, n: int, t: int, r: int, d: int, dtype: torch.dtype, seed: int = 0) -> Path:
    """A source state dict file as PEFT saves it (plain keys, contiguous)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "prompt_embeddings": torch.randn(t, d, generator=g),
        "prefix_task_cols": torch.randn(n, t, r, generator=g) * 0.5,
        "prefix_task_rows": torch.randn(n, r, d, generator=g) * 0.5,
    }
    path = tmp / "source.safetensors"
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("nts", [1, 2])
@pytest.mark.parametrize(("n", "r"), [(1, 1), (2, 3), (3, 1), (64, 4)])
@pytest.mark.parametrize("mode", ["average", "exact", "shared"])
def test_init_matches_peft_bitwise(tmp_path: Path, mode: str, n: int, r: int, nts: int, dtype: str) -> None:
    nvt, d = 3, 16
    task_type = "SEQ_2_SEQ_LM" if nts == 2 else "CAUSAL_LM"
    src = make_source(tmp_path, n, nvt * nts, r, d, DTYPES[dtype], seed=n * 10 + r)
    task = n - 1
    out = tmp_path / "target"
    spec = SourceSpec(str(src), overrides=ConfigOverrides(task_type=task_type, num_virtual_tokens=nvt))
    init_adapter(spec, TargetPlan(mode, task=task, seed=7), out)
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = peft_init(str(src), PEFT_NAMES[mode], task_type=task_type, nvt=nvt, r=r, d=d, task=task)
    assert set(ours) == {"prompt_embeddings", "prefix_task_cols", "prefix_task_rows"}
    for key, value in ours.items():
        assert value.dtype == torch.float32 == theirs[key].dtype
        assert value.shape == theirs[key].shape, key
        assert value.is_contiguous()
    assert torch.equal(ours["prompt_embeddings"], theirs["prompt_embeddings"])
    if mode == "shared":
        # PEFT draws from its global RNG; ours from the seed: same shapes and distribution.
        both = torch.cat([ours["prefix_task_cols"].flatten(), ours["prefix_task_rows"].flatten()])
        if both.numel() > 100:
            assert abs(both.std().item() - 0.02) < 0.006
    else:
        assert torch.equal(ours["prefix_task_cols"], theirs["prefix_task_cols"])
        assert torch.equal(ours["prefix_task_rows"], theirs["prefix_task_rows"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["num_tasks"] == 1 and cfg["num_ranks"] == r
    assert cfg["prompt_tuning_init"] == "RANDOM" and cfg["prompt_tuning_init_state_dict_path"] is None
    assert cfg["num_transformer_submodules"] == nts and cfg["task_type"] == task_type


def test_average_bf16_is_averaged_in_bf16(tmp_path: Path) -> None:
    """The trap: averaging upcast values differs; PEFT averages in the source dtype."""
    src = make_source(tmp_path, 64, 4, 2, 16, torch.bfloat16)
    init_adapter(SourceSpec(str(src), overrides=ConfigOverrides(task_type="CAUSAL_LM")), "average", tmp_path / "t")
    ours = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    raw = load_file(str(src))
    assert torch.equal(ours["prefix_task_rows"], raw["prefix_task_rows"].mean(0, keepdim=True).float())
    assert not torch.equal(ours["prefix_task_rows"], raw["prefix_task_rows"].float().mean(0, keepdim=True))


@pytest.mark.parametrize(
    ("fixture", "subfolder", "mode"),
    [
        ("causal", None, "average"),
        ("causal", None, "exact"),
        ("seq2seq", None, "average"),
        ("causal_bin", None, "exact"),
        ("causal_bf16", None, "average"),
        ("causal_fp16", None, "average"),
        ("named", "sources", "exact"),
    ],
)
def test_fixture_targets_match_peft_and_load_anywhere(
    tmp_path: Path, fixture: str, subfolder: str | None, mode: str
) -> None:
    """Targets from the PEFT-written fixtures equal PEFT's own init and load with
    PeftModel.from_pretrained after the source is gone (no reload trap)."""
    from conftest import FIXTURES
    from peft import PeftModel

    src_dir = tmp_path / "src"
    shutil.copytree(FIXTURES / fixture, src_dir)
    folder = src_dir / subfolder if subfolder else src_dir
    weights = folder / ("adapter_model.bin" if fixture == "causal_bin" else "adapter_model.safetensors")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    out = tmp_path / "target"
    init_adapter(SourceSpec(str(src_dir), subfolder=subfolder), TargetPlan(mode, task=1), out)
    theirs = peft_init(
        str(weights),
        PEFT_NAMES[mode],
        task_type=cfg["task_type"],
        nvt=cfg["num_virtual_tokens"],
        r=cfg["num_ranks"],
        d=cfg["token_dim"],
        task=1,
    )
    shutil.rmtree(src_dir)  # the source is gone: the target must not need it
    model = PeftModel.from_pretrained(tiny_model(cfg["task_type"], cfg["token_dim"]), str(out))
    enc = model.prompt_encoder["default"]
    assert torch.equal(enc.embedding.weight, theirs["prompt_embeddings"])
    assert torch.equal(enc.prefix_task_cols, theirs["prefix_task_cols"])
    assert torch.equal(enc.prefix_task_rows, theirs["prefix_task_rows"])


def test_readme_training_route(tmp_path: Path) -> None:
    """The README's route: build the PEFT model from the written config, load the weights, train.
    The prompt PEFT trains from is the one mpt-tools built, and one optimiser step changes it."""
    from conftest import FIXTURES

    out = tmp_path / "target"
    init_adapter(FIXTURES / "causal", "average", out)
    # --- the README snippet, verbatim in spirit ---
    from peft import MultitaskPromptTuningConfig, get_peft_model, set_peft_model_state_dict

    config = MultitaskPromptTuningConfig.from_pretrained(str(out))
    config.inference_mode = False
    model = get_peft_model(tiny_model("CAUSAL_LM", 16), config)
    set_peft_model_state_dict(model, load_file(str(out / "adapter_model.safetensors")))
    # ---
    written = load_file(str(out / "adapter_model.safetensors"))
    enc = model.prompt_encoder["default"]
    expected = (
        written["prompt_embeddings"]
        * torch.matmul(written["prefix_task_cols"][0:1], written["prefix_task_rows"][0:1])[0]
    )
    indices = torch.arange(4).unsqueeze(0)
    prompt = enc(indices, torch.tensor([0]))
    assert torch.equal(prompt[0], expected)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} >= {id(enc.prefix_task_cols), id(enc.prefix_task_rows)}
    opt = torch.optim.SGD(trainable, lr=0.5)
    ids = torch.randint(0, 64, (2, 6))
    loss = model(input_ids=ids, labels=ids, task_ids=torch.tensor([0, 0])).loss
    loss.backward()
    opt.step()
    after = enc(indices, torch.tensor([0]))
    assert not torch.equal(after[0], expected)
