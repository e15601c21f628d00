"""mergekit conformance: the same recipe through `merge run` and through mergekit 0.1.5 gives the same tensors.

All oracle runs happen in ONE mergekit process (session fixture). Tolerances: exact for linear in float32;
float32 rounding for the others in float32 (mergekit computes slerp coefficients and L1 norms in float32,
we in float64); one-or-two bf16 ulps where mergekit computes in bf16. DARE is compared structurally: the
random generators differ (documented), so only the shape of the result can agree.
"""

from __future__ import annotations

import threading

import pytest
import torch
import yaml
from click.testing import CliRunner

from merge.cli import main
from tests.helpers import load_tensors
from tests.mergekit_runner import load_folder_tensors, run_mergekit_many


@pytest.fixture(scope="session")
def ckpt(pairs):
    """Absolute paths of the tiny checkpoints every recipe uses."""
    base, (s0, s1) = pairs("llama", torch.float32, sft_count=2)
    far_base, far = pairs("llama", torch.float32, scale=0.5)  # big deltas: slerp takes the spherical branch
    bf_base, bf = pairs("llama", torch.bfloat16)
    qb, qs = pairs("qwen2", torch.bfloat16)
    return {k: str(v) for k, v in dict(base=base, s0=s0, s1=s1, far_base=far_base, far=far, bf_base=bf_base,
                                       bf=bf, qbase=qb, qsft=qs).items()}


def recipes(c: dict) -> dict[str, dict]:
    """name -> mergekit config (also run unchanged through `merge run`)."""
    def m(ref, **params):
        return {"model": c[ref], "parameters": params} if params else {"model": c[ref]}

    return {
        "linear_fp32": {"merge_method": "linear", "models": [m("s0", weight=0.7), m("base", weight=0.3)],
                        "dtype": "float32"},
        "linear_gradient_global_base": {  # base_model added with the global weight; per-model beats global
            "merge_method": "linear", "base_model": c["base"],
            "models": [m("s0", weight=[1.0, 0.2]), m("s1", weight=0.5)], "parameters": {"weight": 0.4}},
        "linear_filter_bf16_unnormalized": {
            "merge_method": "linear", "base_model": c["bf_base"],
            "models": [m("bf", weight=[{"filter": "self_attn", "value": 0.2}, {"value": 0.9}]),
                       m("bf_base", weight=[{"filter": "self_attn", "value": 0.8}, {"value": 0.1}])],
            "parameters": {"normalize": False}},
        "linear_slices": {  # the gradient restarts in every slice
            "merge_method": "linear",
            "slices": [{"sources": [{"model": c["s0"], "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                                    {"model": c["base"], "layer_range": [0, 2], "parameters": {"weight": 0.5}}]},
                       {"sources": [{"model": c["s0"], "layer_range": [2, 3], "parameters": {"weight": 0.25}},
                                    {"model": c["base"], "layer_range": [2, 3]}],
                        "parameters": {"weight": 0.75}}]},
        "slerp_spherical": {"merge_method": "slerp", "base_model": c["far_base"],
                            "models": [m("far_base"), m("far")],
                            "parameters": {"t": [{"filter": "mlp", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}},
        "slerp_bf16_qwen": {"merge_method": "slerp", "base_model": c["qbase"], "models": [m("qsft")],
                            "parameters": {"t": 0.4}},
        "task_arithmetic_fp32": {"merge_method": "task_arithmetic", "base_model": c["base"],
                                 "models": [m("base", weight=5.0), m("s0", weight=0.6), m("s1")],
                                 "parameters": {"weight": [0.3, 0.9], "lambda": 0.8}, "dtype": "float32"},
        "task_arithmetic_bf16_math": {"merge_method": "task_arithmetic", "base_model": c["bf_base"],
                                      "models": [m("bf", weight=0.7)]},
        "task_arithmetic_bf16_dtype_fp32_out": {"merge_method": "task_arithmetic", "base_model": c["base"],
                                                "models": [m("s0", weight=0.7), m("s1", weight=0.4)],
                                                "dtype": "bfloat16", "out_dtype": "float32"},
        "ties_two": {"merge_method": "ties", "base_model": c["base"],
                     "models": [m("s0", weight=0.6, density=0.5), m("s1", weight=[0.2, 0.8], density=0.3)],
                     "dtype": "float32"},
        "ties_rescale_lambda": {"merge_method": "ties", "base_model": c["base"],
                                "models": [m("s0", weight=1.0), m("s1", weight=0.5)],
                                "parameters": {"density": 0.4, "normalize": False, "rescale": True, "lambda": 1.5}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": c["base"],
                        "models": [m("s0", weight=0.8, density=0.6, gamma=0.05)]},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": c["base"],
                             "models": [m("s0", weight=0.5), m("s1", weight=0.5)],
                             "parameters": {"density": 0.7, "gamma": 0.1}},
        "dare_linear": {"merge_method": "dare_linear", "base_model": c["base"],
                        "models": [m("s0", weight=0.8, density=0.5)]},
        "dare_ties": {"merge_method": "dare_ties", "base_model": c["base"],
                      "models": [m("s0", weight=0.6, density=0.4)], "parameters": {"lambda": 0.5}},
        # issue 2: our CLI commands (our t convention) against the mapped mergekit config
        "cli_slerp": {"merge_method": "slerp", "base_model": c["far_base"], "models": [m("far")],
                      "parameters": {"t": 1 - 0.3}},
        "cli_linear": {"merge_method": "linear", "models": [m("bf", weight=1 - 0.3), m("bf_base", weight=0.3)]},
        "cli_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": c["base"],
                                "models": [m("s0", weight=0.6), m("s1", weight=0.3)], "dtype": "float32"},
    }


CLI = {  # name -> our command line (t = share of the base)
    "cli_slerp": ["slerp", "--sft", "{far}", "--base", "{far_base}", "--t", "0.3"],
    "cli_linear": ["linear", "--sft", "{bf}", "--base", "{bf_base}", "--t", "0.3"],
    "cli_task_arithmetic": ["task-arithmetic", "--base", "{base}", "--sft", "{s0}", "--sft", "{s1}",
                            "--scale", "0.6", "--scale", "0.3"],
}


@pytest.fixture(scope="session")
def outputs(ckpt, tmp_path_factory):
    """name -> (mergekit's tensors, ours), every oracle run in one mergekit process."""
    configs = recipes(ckpt)
    root = tmp_path_factory.mktemp("conformance")
    oracle: dict = {}
    # mergekit runs in its own process; our merges run meanwhile
    batch = threading.Thread(target=lambda: oracle.update(run=_catch(run_mergekit_many, configs, root / "mergekit",
                                                                       random_seed=0)))
    batch.start()
    runner = CliRunner()
    (root / "ours").mkdir()
    for name, config in configs.items():
        ours = root / "ours" / name
        if name in CLI:
            args = [a.format(**ckpt) for a in CLI[name]] + ["-o", str(ours), "-q"]
        else:
            path = root / f"{name}.yaml"
            path.write_text(yaml.safe_dump(config, sort_keys=False))
            args = ["run", str(path), "-o", str(ours), "-q"]
        result = runner.invoke(main, args)
        assert result.exit_code == 0, (name, result.output, result.exception)
    batch.join()
    if isinstance(oracle["run"], BaseException):
        raise oracle["run"]
    return {name: (load_folder_tensors(oracle["run"][name]), load_tensors(root / "ours" / name)) for name in configs}


def _catch(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except BaseException as e:  # re-raised in the fixture's thread
        return e


def _same_names(theirs, ours):
    assert set(ours) == set(theirs), set(ours) ^ set(theirs)


EXACT = ["linear_fp32", "linear_gradient_global_base", "linear_filter_bf16_unnormalized", "linear_slices",
         "task_arithmetic_fp32", "ties_two", "breadcrumbs", "breadcrumbs_ties"]
FP32 = ["slerp_spherical", "ties_rescale_lambda", "cli_slerp", "cli_task_arithmetic"]
BF16 = ["slerp_bf16_qwen", "task_arithmetic_bf16_math", "task_arithmetic_bf16_dtype_fp32_out", "cli_linear"]


@pytest.mark.parametrize("name", EXACT)
def test_bit_exact(outputs, name):
    theirs, ours = outputs[name]
    _same_names(theirs, ours)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        assert torch.equal(ours[k], theirs[k]), (k, (ours[k].float() - theirs[k].float()).abs().max())


@pytest.mark.parametrize("name", FP32)
def test_float32_rounding(outputs, name):
    theirs, ours = outputs[name]
    _same_names(theirs, ours)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype == torch.float32, k
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("name", BF16)
def test_bf16_rounding(outputs, name):
    theirs, ours = outputs[name]
    _same_names(theirs, ours)
    equal = total = 0
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        a, b = ours[k].float(), theirs[k].float()
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-5, msg=k)  # within ~1 bf16 ulp
        equal += int((a == b).sum())
        total += a.numel()
    assert equal / total > 0.99  # bf16 math reproduced, not merely approximated


def test_bf16_math_rounds_the_weight(outputs, ckpt):
    """mergekit computes task arithmetic in bf16 for bf16 inputs: weight 0.7 acts as 0.69921875."""
    theirs, ours = outputs["task_arithmetic_bf16_math"]
    base, sft = load_tensors(ckpt["bf_base"]), load_tensors(ckpt["bf"])
    k = "model.layers.0.mlp.up_proj.weight"
    w = torch.tensor(0.7, dtype=torch.bfloat16)
    expected = base[k] + (sft[k] - base[k]) * w
    assert torch.equal(ours[k], expected) and torch.equal(theirs[k], expected)


def _dare_structure(out, base, sft, weight, lam, density):
    """Each delta entry is 0 or weight*lam*d*s with one s per tensor, s = L1(d)/L1(kept d); ~density kept."""
    kept_total = n_total = 0
    for k in base:
        d = (sft[k] - base[k]).reshape(-1).double()
        got = (out[k] - base[k]).reshape(-1).double() / (weight * lam)
        kept = got != 0
        if d.numel() < 64 or not kept.any():
            continue
        s = d.abs().sum() / d[kept].abs().sum()
        torch.testing.assert_close(got[kept], d[kept] * s, rtol=1e-4, atol=1e-7)
        kept_total += int(kept.sum())
        n_total += d.numel()
    assert abs(kept_total / n_total - density) < 0.02


@pytest.mark.parametrize("name,weight,lam,density", [("dare_linear", 0.8, 1.0, 0.5), ("dare_ties", 0.6, 0.5, 0.4)])
def test_dare_structure(outputs, ckpt, name, weight, lam, density):
    theirs, ours = outputs[name]
    _same_names(theirs, ours)
    base, sft = load_tensors(ckpt["base"]), load_tensors(ckpt["s0"])
    for out in (theirs, ours):  # the same check holds for both; the masks differ (different RNGs)
        _dare_structure(out, base, sft, weight, lam, density)

