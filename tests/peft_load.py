"""Load adapter folders with whatever PEFT this Python has, by both routes, and print the prompts.

A standalone script (it imports no mpt_tools, only the tests' ``peft_oracle.tiny_model``, which
needs nothing beyond torch and transformers), so that it runs in a second virtual environment with
an old PEFT release::

    OLD/bin/python tests/peft_load.py ADAPTER_DIR...

For each folder it prints one JSON object per line: ``{"path", "peft", "routes": {route: {"ok",
"error", "warnings", "prompts"}}}``. Route ``from_pretrained`` is ``PeftModel.from_pretrained``;
route ``config`` is ``MultitaskPromptTuningConfig.from_pretrained`` (``PromptTuningConfig`` for
a PROMPT_TUNING adapter), ``get_peft_model`` and ``set_peft_model_state_dict`` (the README's
training route). ``prompts`` holds the sha256 of each task's float32 prompt bytes
(``get_prompt`` with ``task_ids``), so two environments can be compared bitwise; ``warnings``
the messages PEFT warned with while loading. The base model is a tiny GPT-2 or T5 built from a
config (nothing is downloaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# beside this script, so on sys.path whether it is run or imported; needs only torch and transformers
from peft_oracle import tiny_model


def prompts(model: Any, config: dict[str, Any]) -> list[str]:
    """sha256 of each task's prompt (one for PROMPT_TUNING)."""
    import torch

    with torch.no_grad():
        if config["peft_type"] == "PROMPT_TUNING":
            out = model.get_prompt(batch_size=1)
        else:
            n = int(config.get("num_tasks", 1))
            out = model.get_prompt(batch_size=n, task_ids=torch.arange(n))
    out = out.detach().to(torch.float32).contiguous()
    return [hashlib.sha256(row.numpy().tobytes()).hexdigest() for row in out]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def load(folder: Path, route: str) -> dict[str, Any]:
    """Load ``folder`` by ``route``; the outcome as a JSON-ready dict."""
    import peft

    config = json.loads((folder / "adapter_config.json").read_text())
    base = tiny_model(config.get("task_type") or "CAUSAL_LM", int(config["token_dim"]))
    base.name_or_path = config.get("base_model_name_or_path")  # else get_peft_model warns that it renames it
    records = _Records()
    logging.getLogger("peft").addHandler(records)
    result: dict[str, Any] = {"ok": False, "error": None, "warnings": [], "prompts": []}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if route == "from_pretrained":
                model = peft.PeftModel.from_pretrained(base, str(folder))
            else:
                cls = (
                    peft.PromptTuningConfig
                    if config["peft_type"] == "PROMPT_TUNING"
                    else peft.MultitaskPromptTuningConfig
                )
                cfg = cls.from_pretrained(str(folder))
                cfg.inference_mode = False
                model = peft.get_peft_model(base, cfg)
                weights = folder / "adapter_model.safetensors"
                if weights.exists():
                    from safetensors.torch import load_file

                    state = load_file(str(weights))
                else:
                    import torch

                    state = torch.load(str(folder / "adapter_model.bin"), weights_only=True)
                peft.set_peft_model_state_dict(model, state)
        result["warnings"] = [str(w.message) for w in caught if "peft" in (w.filename or "")] + records.messages
        result["prompts"] = prompts(model, config)
        result["ok"] = True
    except Exception as exc:  # the point: report how this release fails
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        logging.getLogger("peft").removeHandler(records)
    return result


def main(argv: list[str]) -> int:
    """Print one JSON line per folder in ``argv``."""
    import peft

    for arg in argv:
        folder = Path(arg)
        routes = {route: load(folder, route) for route in ("from_pretrained", "config")}
        print(json.dumps({"path": arg, "peft": peft.__version__, "routes": routes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
