"""Planning FP8 block-scaled output (``--dtype fp8``): which weights are written as FP8 codes, and the scale
tensor each one gets (an :class:`Fp8Scales` job). The codes and scales themselves are computed by
:mod:`merge.io.quantized`'s functions, in the executor."""

from __future__ import annotations

from dataclasses import dataclass, field
from dataclasses import replace as update
from typing import Any, ClassVar

import torch

from .io.quantized import SCALE_SUFFIX, dequantised_of, fp8_output_block, quantised_in_input, scale_shape
from .io.writer import PlannedTensor, layout_shards
from .methods.base import Copy, Operation
from .methods.linear import Linear
from .methods.precision import compute_dtypes
from .plan import Plan, TensorJob
from .tensor_names import group_of


@dataclass(frozen=True)
class Fp8Scales(Operation):
    """The ``scale_inv`` tensor of an FP8 output ``weight`` (a TensorJob): the block maxima of the weight's
    merged values over 448, from the weight's own kernel (the executor computes them once for both jobs)."""

    kind: ClassVar[str] = "fp8_scales"
    weight: Any = field(default=None, compare=False)


def fp8_output_plan(plan, models: dict, primary: str, max_shard_size: int):
    """``plan`` with its FP8 weights written as float8_e4m3fn codes followed by their float32 ``_scale_inv``.

    The weights written FP8 are those an input stores FP8 (the same layout back); with no FP8 input, every
    2-D ``.weight`` outside the embeddings and lm_head (DeepSeek-V3's choice). Each code job carries
    ``fp8_block``; its scale tensor is an :class:`Fp8Scales` job computing the same merged values' block maxima.
    """
    block = fp8_output_block(models, primary)
    any_fp8 = any(dequantised_of(m) is not None for m in models.values())
    jobs, count = [], 0
    for job in plan.jobs:
        chosen = (quantised_in_input(job, models) if any_fp8 else
                  job.name.endswith(".weight") and group_of(job.name) not in ("embed", "lm_head"))
        if not (chosen and len(job.shape) == 2 and job.out_dtype.is_floating_point
                and job.merged_numel == job.numel):
            jobs.append(job)
            continue
        weight = update(job, out_dtype=torch.float8_e4m3fn, fp8_block=block)
        if isinstance(job.op, Copy):  # a copy becomes a one-input linear merge, computed like the others
            op = Linear(job.op.inputs, (1.0,))
            compute, round_to = compute_dtypes(op, [models[k].info(job.source_name(k)).dtype for k in op.inputs])
            weight = update(weight, op=op, compute=compute, round_to=round_to)
        op = weight.op
        grid = scale_shape(job.shape, block)
        reads = {k: job.source_name(k) for k in dict.fromkeys(op.inputs + (job.primary,))}
        scales = TensorJob(job.name + SCALE_SUFFIX, grid, torch.float32, Fp8Scales(op.inputs, weight),
                           grid[0] * grid[1], job.primary, reads)
        jobs += [weight, scales]
        count += 1
    planned = [PlannedTensor(j.name, j.out_dtype, j.shape) for j in jobs]
    note = (f"--dtype fp8: {count} weight(s) written as FP8 block-scaled ({block[0]}x{block[1]}): "
            f"scale_inv = amax(|block|)/448 of the merged float32 values, code = W/scale_inv as float8_e4m3fn; "
            "other floating tensors as bfloat16")
    return Plan(jobs, layout_shards(planned, max_shard_size), list(plan.notes) + [note])
