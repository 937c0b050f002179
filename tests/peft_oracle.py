"""Real PEFT as the oracle: tiny models built from configs (nothing downloaded)."""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

D_MODEL = 16


def tiny_model(task_type: str, d: int = D_MODEL) -> Any:
    """A tiny randomly initialised GPT-2 (causal) or T5 (seq2seq) with hidden size ``d``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if task_type == "SEQ_2_SEQ_LM":
        cfg = T5Config(
            d_model=d,
            d_ff=2 * d,
            num_layers=1,
            num_decoder_layers=1,
            num_heads=2,
            d_kv=d // 2,
            vocab_size=64,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
        return T5ForConditionalGeneration(cfg)
    cfg2 = GPT2Config(n_embd=d, n_layer=1, n_head=2, vocab_size=64, n_positions=64)
    return GPT2LMHeadModel(cfg2)


def peft_init(
    source_file: str, mode: str, *, task_type: str, nvt: int, r: int, d: int, num_tasks: int = 1, task: int = 0
) -> dict[str, Any]:
    """Build a PEFT model with PEFT's own init path reading ``source_file``; return its prompt tensors."""
    from peft import MultitaskPromptTuningConfig, get_peft_model

    cfg = MultitaskPromptTuningConfig(
        task_type=task_type,
        num_virtual_tokens=nvt,
        num_tasks=num_tasks,
        num_ranks=r,
        token_dim=d,
        prompt_tuning_init=mode,
        prompt_tuning_init_state_dict_path=source_file,
        prompt_tuning_init_task=task,
    )
    model = get_peft_model(tiny_model(task_type, d), cfg)
    enc = model.prompt_encoder["default"]
    return {
        "prompt_embeddings": enc.embedding.weight.detach().clone(),
        "prefix_task_cols": enc.prefix_task_cols.detach().clone(),
        "prefix_task_rows": enc.prefix_task_rows.detach().clone(),
    }
