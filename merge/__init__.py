"""mergeback: recover what fine-tuning forgot by merging the SFT checkpoint back with its base.

``t`` is always the share of the base model: ``t=0`` is the SFT unchanged, ``t=1`` is the base.

    import merge
    summary = merge.merge("slerp", sft="./med", base="./llama3-8b", t=0.3, out="./med-recovered")
    merge.run(merge.Recipe.load("recipe.yaml"))
"""

from .errors import MergeError
from .recipes import Recipe

__version__ = "0.1.0"

__all__ = ["MergeError", "MergeSummary", "Recipe", "__version__", "fold", "inspect", "list_aliases", "merge", "push",
           "run", "sweep", "verify"]


def __getattr__(name):
    # torch is imported only when a merge is asked for, so `merge --help` stays fast.
    if name in ("merge", "run", "fold"):
        from . import api

        return getattr(api, name)
    if name == "verify":
        from .integrity import verify

        return verify
    if name == "push":
        from .hub import push

        return push
    if name == "list_aliases":
        from .io.aliases import list_aliases

        return list_aliases
    if name == "sweep":
        from .recover import sweep

        return sweep
    if name == "inspect":
        from .diagnostics import inspect

        return inspect
    if name == "MergeSummary":
        from .summary import MergeSummary

        return MergeSummary
    raise AttributeError(f"module 'merge' has no attribute {name!r}")
