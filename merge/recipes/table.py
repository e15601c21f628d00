"""The table ``merge plan`` prints: the resolved parameter of every layer and tensor group."""

from __future__ import annotations

from ..tensor_names import group_of, layer_index

COLUMNS = ("attn", "mlp", "norm", "other")


def parameter_table(plan, op_for, n_layers: int) -> str:
    """Rows: embed, each layer, final norm, lm_head (and other non-layer tensors); columns: attn, mlp, norm
    (and other in-layer tensors). A cell shows the value its tensors get (several when they differ)."""
    cells: dict[tuple[str, str], list[str]] = {}
    for job in plan.jobs:
        if not job.out_dtype.is_floating_point:
            continue
        layer, group = layer_index(job.name), group_of(job.name)
        if layer is None:
            row = {"embed": "embed", "lm_head": "lm_head", "norm": "final norm"}.get(group, "other")
            column = "value"
        else:
            row, column = str(layer), group if group in COLUMNS else "other"
        values = cells.setdefault((row, column), [])
        text = op_for.describe(job.name)
        if text not in values:
            values.append(text)
    columns = [c for c in COLUMNS if any(col == c for _, col in cells)]
    rows = ["embed"] + [str(i) for i in range(n_layers)] + ["final norm", "lm_head", "other"]
    body = []
    for row in rows:
        if row in ("embed", "final norm", "lm_head", "other"):
            if (row, "value") in cells:
                body.append([row, _cell(cells[(row, "value")])])
        elif any((row, c) in cells for c in columns):
            body.append([f"layer {row}"] + [_cell(cells.get((row, c), [])) for c in columns])
    header = ["tensors"] + columns
    widths = [max(len(r[i]) for r in [header] + body if i < len(r)) for i in range(len(header))]
    lines = [f"resolved parameters: {op_for.legend}"]
    for r in [header] + body:
        lines.append("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return "\n".join(lines)


def _cell(values: list[str]) -> str:
    if not values:
        return "-"
    return values[0] if len(values) == 1 else " | ".join(values)
