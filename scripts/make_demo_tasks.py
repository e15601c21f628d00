"""Build the demo's two cloze tasks (lm-eval YAML + jsonl) from the demo's report probes.

    python scripts/make_demo_tasks.py   # writes merge/demo/assets/tasks/

demo_general_cloze: the first words of an English paragraph, then which of 3 continuations is the real one
(the others are the same words in shuffled order, so word frequencies cannot tell them apart).
demo_domain_cloze: an arithmetic-tutor question, then which of 3 answers is the real one (the others: its
words shuffled). 12 documents each.
"""

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "merge" / "demo" / "assets"
OUT = ROOT / "tasks"
COUNT, CHOICES = 12, 3


def _yaml(name: str, data: str, what: str) -> str:
    return f"""# {what} ({COUNT} documents, built by scripts/make_demo_tasks.py)
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _shuffled(text: str, rng: random.Random) -> str:
    words = text.split()
    while True:
        rng.shuffle(words)
        if " ".join(words) != text:
            return " ".join(words)


def _docs(pairs: list[tuple[str, str]], rng: random.Random) -> list[dict]:
    docs = []
    for context, answer in pairs[:COUNT]:
        others = []
        while len(others) < CHOICES - 1:
            other = _shuffled(answer, rng)
            if other not in others:
                others.append(other)
        label = rng.randrange(CHOICES)
        choices = others[:label] + [answer] + others[label:]
        docs.append({"context": context, "choices": choices, "label": label})
    return docs


def main() -> None:
    rng = random.Random(0)
    paragraphs = [p.split() for p in (ROOT / "probes" / "general_report.txt").read_text().split("\n\n") if p.strip()]
    general = [(" ".join(p[:12]), " ".join(p[12:20])) for p in paragraphs if len(p) >= 20][:COUNT * 2]
    rows = [json.loads(line) for line in (ROOT / "probes" / "domain_report.jsonl").read_text().splitlines() if line]
    domain = [((r["instruction"] + (" " + r["input"] if r["input"] else "")).strip(), r["output"]) for r in rows]
    OUT.mkdir(exist_ok=True)
    for name, pairs, what in (("demo_general_cloze", general, "English paragraph continuations"),
                              ("demo_domain_cloze", domain[:COUNT * 2], "arithmetic-tutor answers")):
        (OUT / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _docs(pairs, rng)))
        (OUT / f"{name}.yaml").write_text(_yaml(name, f"{name}.jsonl", what))


if __name__ == "__main__":
    main()
