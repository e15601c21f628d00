"""The output dtypes a merge can be asked for by name (``--dtype``, recipes' ``dtype``), in one table."""

from __future__ import annotations

import torch

OUTPUT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
