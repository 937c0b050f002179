"""The names of the float dtypes mpt-tools reads and writes, and what a user may type for them.

Safetensors' tags (``F32``, ``BF16``, ...) are what files hold; :data:`DTYPE_NAMES` gives their
torch-style names, :data:`DTYPE_CHOICES` the three dtypes adapters are trained in (what ``--dtype``
takes), :data:`UNIT_ROUND_OFF` their precision, and :func:`canonical_dtype` turns an alias
(``bf16``, ``fp16``, ``half``, ``torch.bfloat16``, any case) into its name. Nothing here imports
numpy or torch: the command line takes these at start-up.
"""

from __future__ import annotations

DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
"""The torch-style name of each float safetensors tag."""
DTYPE_CHOICES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
"""The three dtypes adapters are trained in, by name, with their tags (``--dtype``'s choices)."""
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
UNIT_ROUND_OFF = {"F64": 2.0**-53, "F32": 2.0**-24, "F16": 2.0**-11, "BF16": 2.0**-8}
"""Half the spacing of each float tag's values around 1: its relative rounding error, at most."""
DTYPE_MAX = {"float32": 3.4028234663852886e38, "bfloat16": 3.3895313892515355e38, "float16": 65504.0}
"""The largest finite value of each trained-in dtype."""


def canonical_dtype(text: str) -> str:
    """``float32``, ``bfloat16`` or ``float16`` for a dtype name or alias (``fp16``, ``half``,
    ``torch.bfloat16``, any case); other text comes back lower-cased, for the caller to refuse."""
    key = text.strip().lower().removeprefix("torch.")
    return _DTYPE_ALIASES.get(key, key)
