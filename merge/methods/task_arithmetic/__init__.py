"""Task arithmetic: add (weighted, possibly pruned) task vectors to the base.

Per chunk the kernel composes ``delta -> prune -> rescale -> elect -> combine``: ``delta_i = W_i - W_base``;
pruning (:mod:`.sparsify`: magnitude/breadcrumbs bands found by the exact streaming top-k of
:mod:`.selection`, DARE's random keep-mask, or DELLA's rank-weighted one per row from :mod:`.della`);
rescaling (DARE: ``/ density``; mergekit: each delta's L1 norm restored); sign election
(:func:`sign_consensus_mask`, :func:`elect_signs_mergekit`); the combination (:func:`task_arithmetic`, or
:func:`task_arithmetic_mergekit` with mergekit's order of rounding). mergekit's ties, dare_linear, dare_ties,
breadcrumbs, breadcrumbs_ties, della and della_linear are this method with other settings.
"""

from ..base import MergekitVariant, MethodSpec
from .formulas import elect_signs_mergekit, sign_consensus_mask, task_arithmetic, task_arithmetic_mergekit
from .kernel import Sparsification, TaskArithmetic, TaskArithmeticKernel, TieCursor
from .recipe import (
                     FAMILY,
                     PYTHON_PARAMS,
                     Family,
                     TaskArithmeticParams,
                     check_mergekit,
                     check_recipe,
                     convert,
                     mergekit_params,
                     plan,
                     plan_mergekit,
                     python_fields,
)
from .wording import settings

__all__ = ["FAMILY", "SPEC", "Family", "Sparsification", "TaskArithmetic", "TaskArithmeticParams", "TieCursor",
           "elect_signs_mergekit", "sign_consensus_mask", "task_arithmetic", "task_arithmetic_mergekit"]

SPEC = MethodSpec(
    name="task_arithmetic",
    operation=TaskArithmetic,
    kernel=TaskArithmeticKernel(),
    params=TaskArithmeticParams,
    settings=settings,
    check_recipe=check_recipe,
    plan=plan,
    legend=lambda recipe: "scale of each SFT's delta" + (" (sft0/sft1/...)" if len(recipe.sft) > 1 else ""),
    describe=lambda t: "Task arithmetic `W = W_base + sum_i s_i * sparsify(W_sft_i - W_base)`.",
    mergekit=tuple(MergekitVariant(name, mergekit_params(f), f) for name, f in FAMILY.items()),
    lora_note=("for LoRA-targeted tensors this task arithmetic merge is exactly W_base + scale_i*s*B@A, "
              "computed tensor by tensor without materialising the merged model"),
    plan_mergekit=plan_mergekit,
    check_mergekit=check_mergekit,
    convert=convert,
    mergekit_legend="mergekit weight of each model's delta (d = density)",
    sweepable=True,
    python_params=PYTHON_PARAMS,
    python_fields=python_fields,
    hints={"t": "task-arithmetic uses --scale (the multiplier of each delta; scale 1-t equals linear with t), "
                "not --t"},
)
