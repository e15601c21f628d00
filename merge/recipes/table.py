"""The table ``merge plan`` prints: the resolved parameter of every layer and tensor group."""

from __future__ import annotations

from ..tensor_names import Structure, group_of

COLUMNS = ("attn", "mlp", "norm", "other")
_OUTSIDE = ("embed", "final norm", "lm_head", "other")


def parameter_table(plan, op_for, n_layers: "int | Structure") -> str:
    """Rows: embed, each layer, final norm, lm_head (and other non-layer tensors); columns: attn, mlp, norm
    (and other in-layer tensors). A cell shows the value its tensors get (several when they differ).

    A model with several stacks gets each stack's rows, named after it ("vision layer 0", "text layer 0"),
    in depth order (vision, projector, text)."""
    structure = Structure.coerce(n_layers)
    cells: dict[tuple[str, str], list[str]] = {}
    for job in plan.jobs:
        if not job.out_dtype.is_floating_point:
            continue
        pos, group = structure.position(job.name), group_of(job.name)
        prefix = f"{pos.stack} " if structure.multi else ""
        if pos.stack == "projector":
            row, column = "projector", "value"
        elif pos.layer is None:
            row = prefix + {"embed": "embed", "lm_head": "lm_head", "norm": "final norm"}.get(group, "other")
            column = "value"
        else:
            row, column = f"{prefix}{pos.layer}", group if group in COLUMNS else "other"
        values = cells.setdefault((row, column), [])
        text = op_for.describe(job.name)
        if text not in values:
            values.append(text)
    columns = [c for c in COLUMNS if any(col == c for _, col in cells)]
    rows: list[tuple[str, bool]] = []  # (row key, is a layer row)
    for stack in (("vision", "projector", "text") if structure.multi else ("text",)):
        prefix = f"{stack} " if structure.multi else ""
        if stack == "projector":
            rows.append(("projector", False))
            continue
        rows += [(prefix + "embed", False)] + [(f"{prefix}{i}", True) for i in range(structure.counts.get(stack, 0))]
        rows += [(prefix + r, False) for r in _OUTSIDE[1:]]
    body = []
    for row, is_layer in rows:
        if not is_layer:
            if (row, "value") in cells:
                body.append([row, _cell(cells[(row, "value")])])
        elif any((row, c) in cells for c in columns):
            stack, _, index = row.rpartition(" ")
            label = f"{stack} layer {index}" if stack else f"layer {index}"
            body.append([label] + [_cell(cells.get((row, c), [])) for c in columns])
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
