"""mergeback: recover what fine-tuning forgot by merging the SFT checkpoint back with its base.

``t`` is always the share of the base model: ``t=0`` is the SFT unchanged, ``t=1`` is the base.

    import merge
    summary = merge.merge("slerp", sft="./med", base="./llama3-8b", t=0.3, out="./med-recovered")
    merge.run(merge.Recipe.load("recipe.yaml"))
"""

from .errors import MergeError

__version__ = "0.1.0"

__all__ = ["MergeError", "MergeSummary", "Recipe", "__version__", "evaluate", "fold", "inspect", "list_aliases",
           "merge", "push", "run", "sweep", "verify", "extract_lora", "interpolate_adapter", "Options",
           "ExecutionOptions", "OutputOptions", "HubOptions", "ReportOptions"]


# Public names served lazily from their modules, so `import merge` and `merge --help` import neither torch nor
# pydantic.
_LAZY = {
    "Recipe": ".recipes",
    "merge": ".api", "run": ".api", "fold": ".api", "verify": ".integrity", "push": ".hub",
    "list_aliases": ".io.aliases", "sweep": ".recover", "inspect": ".diagnostics", "MergeSummary": ".summary",
    "evaluate": ".evaluate",  # a callable package: merge.evaluate(...) runs lm-eval tasks on written models
    "extract_lora": ".adapters", "interpolate_adapter": ".adapters",
    **dict.fromkeys(("Options", "ExecutionOptions", "OutputOptions", "HubOptions", "ReportOptions"), ".options"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'merge' has no attribute {name!r}")
    import importlib

    module = importlib.import_module(_LAZY[name], __name__)
    return module if module.__name__ == f"{__name__}.{name}" else getattr(module, name)
