"""Tensor-wise comparison of merged checkpoints, one tensor in memory at a time.

`compare_dirs` checks two outputs against each other (ours vs mergekit);
`check_against_reference` recomputes sampled tensors from the inputs with the
project's convention (t = share of BASE) to show which tool matches it.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, via the index when the checkpoint is sharded."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, "pt") as handle:
            files.update({name: path for name in handle.keys()})
    return files


class TensorReader:
    """Lazy reader over a checkpoint directory; use as a context manager."""

    def __init__(self, model_dir: Path):
        self.files = weight_files(Path(model_dir))
        self._stack = ExitStack()
        self._handles: dict[Path, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, "pt"))
        return self._handles[path].get_tensor(name)


# torch.testing's default tolerances for bfloat16.
BF16_RTOL = 1.6e-2
BF16_ATOL = 1e-5


class DiffStats:
    """Accumulates element-wise differences between pairs of tensors."""

    def __init__(self):
        self.tensors = 0
        self.elements = 0
        self.differing = 0
        self.beyond_tolerance = 0
        self.max_abs_diff = 0.0
        self.dtype_mismatches: list[str] = []
        self.shape_mismatches: list[str] = []

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape:
            self.shape_mismatches.append(name)
            return
        if a.dtype != b.dtype:
            self.dtype_mismatches.append(f"{name}: {a.dtype} vs {b.dtype}")
        a32, b32 = a.float(), b.float()
        diff = (a32 - b32).abs()
        self.tensors += 1
        self.elements += diff.numel()
        self.differing += int((diff != 0).sum())
        self.beyond_tolerance += int((diff > BF16_ATOL + BF16_RTOL * b32.abs()).sum())
        if diff.numel():
            self.max_abs_diff = max(self.max_abs_diff, float(diff.max()))

    def verdict(self) -> str:
        if self.shape_mismatches:
            return "shape mismatch"
        if self.differing == 0:
            return "identical"
        if self.beyond_tolerance == 0:
            return "allclose (bf16 tolerance)"
        return "differs"

    def as_dict(self) -> dict:
        return {
            "verdict": self.verdict(),
            "tensors_compared": self.tensors,
            "elements": self.elements,
            "differing_elements": self.differing,
            "differing_fraction": self.differing / self.elements if self.elements else 0.0,
            "beyond_bf16_tolerance": self.beyond_tolerance,
            "tolerance": {"rtol": BF16_RTOL, "atol": BF16_ATOL},
            "max_abs_diff": self.max_abs_diff,
            "dtype_mismatches": self.dtype_mismatches[:5],
            "shape_mismatches": self.shape_mismatches[:5],
        }


def compare_dirs(dir_a: Path, dir_b: Path) -> dict:
    """Compare every tensor two checkpoints share; list names only one of them has."""
    stats = DiffStats()
    with TensorReader(dir_a) as a, TensorReader(dir_b) as b:
        only_a, only_b = sorted(a.names() - b.names()), sorted(b.names() - a.names())
        for name in sorted(a.names() & b.names()):
            stats.add(name, a.get(name), b.get(name))
    result = stats.as_dict()
    result["only_in_first"] = only_a[:5]
    result["only_in_second"] = only_b[:5]
    if only_a or only_b:
        result["verdict"] = "different tensor sets"
    return result


def slerp(a: torch.Tensor, b: torch.Tensor, s: float, dot_threshold: float = 0.9995) -> torch.Tensor:
    """Spherical interpolation from a (s=0) to b (s=1) on the raw flattened tensors, in fp64."""
    a64, b64 = a.double().flatten(), b.double().flatten()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    if cos.abs() > dot_threshold:
        out = (1 - s) * a64 + s * b64
    else:
        theta = torch.arccos(cos.clamp(-1, 1))
        out = (torch.sin((1 - s) * theta) * a64 + torch.sin(s * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape)


def magnitude_cut(delta: torch.Tensor, density: float) -> torch.Tensor:
    """|delta| of the k-th largest entry, k = int(density * numel) (at least 1)."""
    k = max(1, int(density * delta.numel()))
    flat = delta.abs().flatten()
    return flat.kthvalue(flat.numel() - k + 1).values


REFERENCE_METHODS = ("linear", "slerp", "ta", "ties", "svd", "svd_threshold")


def spectral_reference(base32: torch.Tensor, sft32: torch.Tensor, params: dict, threshold: bool) -> torch.Tensor:
    """base + scale * D_k, D = sft - base in fp64 (exact SVD) for 2-D tensors: k = rank, or the count of singular
    values above (0.56 b^3 - 0.95 b^2 + 1.82 b + 1.43) * median(s), b = min(m, n) / max(m, n); else the whole D."""
    d = (sft32 - base32).double()
    if d.dim() != 2:
        return base32 + params["scale"] * d.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    if threshold:
        b = min(d.shape) / max(d.shape)
        k = int((s > (0.56 * b ** 3 - 0.95 * b ** 2 + 1.82 * b + 1.43) * float(s.median())).sum())
    else:
        k = min(params["rank"], s.numel())
    return (base32.double() + params["scale"] * ((u[:, :k] * s[:k]) @ vh[:k])).float()


def reference_merge(method: str, base: torch.Tensor, sft: torch.Tensor, params: dict,
                    keep_ties: bool = True) -> torch.Tensor:
    """One tensor merged with the project's convention (t = share of BASE), returned as bf16.

    For ties, entries whose |delta| equals the magnitude cut are kept when keep_ties,
    else dropped; any choice among them is a valid top-k, so tools may legitimately differ there.
    """
    base32, sft32 = base.float(), sft.float()
    if method == "linear":
        out = (1 - params["t"]) * sft32 + params["t"] * base32
    elif method == "slerp":
        out = slerp(sft32, base32, params["t"])
    elif method == "ta":
        out = base32 + params["scale"] * (sft32 - base32)
    elif method == "ties":
        delta = sft32 - base32
        cut = magnitude_cut(delta, params["density"])
        kept = delta.abs() >= cut if keep_ties else delta.abs() > cut
        out = base32 + params["scale"] * torch.where(kept, delta, torch.zeros_like(delta))
    elif method in ("svd", "svd_threshold"):
        out = spectral_reference(base32, sft32, params, threshold=method == "svd_threshold")
    else:
        raise ValueError(f"unknown method {method!r}")
    return out.to(base.dtype)


def expected_output(method: str, base: torch.Tensor, sft: torch.Tensor, out: torch.Tensor,
                    params: dict) -> tuple[torch.Tensor, int]:
    """The reference for `out`, resolving TIES ties at the cut the way `out` did.

    Returns (expected tensor, number of entries tied at the magnitude cut).
    """
    expected = reference_merge(method, base, sft, params)
    if method != "ties":
        return expected, 0
    delta = sft.float() - base.float()
    at_cut = delta.abs() == magnitude_cut(delta, params["density"])
    dropped = reference_merge(method, base, sft, params, keep_ties=False)
    return torch.where(at_cut & (out == dropped), dropped, expected), int(at_cut.sum())


def sample_names(names, limit: int) -> list[str]:
    """A spread of tensor names: first, last and evenly spaced ones in between."""
    ordered = sorted(names)
    if len(ordered) <= limit:
        return ordered
    step = (len(ordered) - 1) / (limit - 1)
    return [ordered[round(i * step)] for i in range(limit)]


def check_against_reference(method: str, base_dir: Path, sft_dir: Path, out_dir: Path,
                            params: dict, max_tensors: int = 8) -> dict:
    """Compare sampled output tensors with `reference_merge` of the inputs.

    For ties, an entry tied at the magnitude cut counts as correct whether kept or dropped.
    """
    stats = DiffStats()
    with TensorReader(base_dir) as base, TensorReader(sft_dir) as sft, TensorReader(out_dir) as out:
        names = sample_names(base.names() & out.names(), max_tensors)
        tied = 0
        for name in names:
            merged = out.get(name)
            expected, at_cut = expected_output(method, base.get(name), sft.get(name), merged, params)
            stats.add(name, merged, expected)
            tied += at_cut
    result = stats.as_dict()
    result["tensors_sampled"] = names
    if method == "ties":
        result["entries_tied_at_cut"] = tied
    return result


def compare_bytes(a: Path, b: Path) -> dict:
    """Whether two output folders hold byte-identical weights and index (what ``cmp`` would say per file)."""
    import filecmp

    names = sorted(p.name for p in Path(a).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    other = sorted(p.name for p in Path(b).iterdir() if p.suffix == ".safetensors" or p.name.endswith(".index.json"))
    same = names == other and all(filecmp.cmp(Path(a) / n, Path(b) / n, shallow=False) for n in names)
    return {"verdict": "identical" if same else "differs", "files": names,
            "differing_fraction": 0.0 if same else 1.0, "max_abs_diff": 0.0 if same else float("nan")}
