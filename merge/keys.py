"""The keys naming a merge's inputs everywhere (plans, operations, summaries, manifests).

``base`` is the base model; the SFTs are ``sft0``, ``sft1``... in recipe order, and ``sft0`` is the primary:
the input whose config, tokenizer and tensor names the output takes. A leaf module, importable from anywhere.
"""

BASE = "base"
PRIMARY = "sft0"


def sft_key(index: int) -> str:
    """The key of the recipe's ``index``-th SFT (0-based): ``sft0``, ``sft1``..."""
    return f"sft{index}"


def input_label(key: str, ref: str) -> str:
    """How messages name an input: ``base REF`` or ``SFT REF``."""
    return f"{'base' if key == BASE else 'SFT'} {ref}"
