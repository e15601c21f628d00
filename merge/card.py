"""The model card (README.md) of a merge: Hub front matter plus what was done, in words and numbers."""

from __future__ import annotations

import yaml


def render_card(summary, recipe_yaml: str, command: str, extra_sections: list[str] = ()) -> str:
    """Markdown with ``base_model`` (Hub inputs), ``base_model_relation: merge``, the method, t's meaning,
    the inputs, the merge summary, the exact command and the recipe."""
    hub_inputs = [m.repo_id for m in summary.inputs.values() if m.repo_id]  # only inputs fetched from the Hub
    front = {"library_name": "transformers", "tags": ["merge", "mergeback"], "base_model_relation": "merge"}
    if hub_inputs:
        front["base_model"] = list(dict.fromkeys(hub_inputs))
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {summary.out.name if summary.out else 'merged model'}", "",
             f"This model is a **{summary.method}** merge made with "
             "[mergeback](https://pypi.org/project/mergeback/) to recover the general abilities a fine-tune "
             "lost, by merging the fine-tuned (SFT) checkpoint back with its base model.", "",
             "## Method", "", summary.method_description(), "", "## Inputs", "",
             "| role | model |", "| --- | --- |"]
    lines += [f"| {role} | `{model.pinned}` ({'Hub' if model.repo_id else 'local folder'}) |"
              for role, model in summary.inputs.items()]
    if any(not m.repo_id for m in summary.inputs.values()):
        lines += ["", "Local folders are paths on the machine that made this merge, not Hub models, so the front "
                  "matter's `base_model` does not list them."]
    lines += ["", "## Summary", "", "```", summary.report(), "```", ""]
    lines += list(extra_sections)
    lines += ["## Reproduce", "", "```bash", command, "```", "", "Recipe (`merge_recipe.yaml`):", "",
              "```yaml", recipe_yaml.strip(), "```", ""]
    return "\n".join(lines)
