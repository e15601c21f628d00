"""``merge demo`` end to end (run once: it is the slowest test) and the story its shipped models tell."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from merge.cli import main
from merge.demo import assets


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "mergeback-demo"
    result = CliRunner().invoke(main, ["demo", "-o", str(out)])
    return out, result


def test_demo_assets_ship_inside_the_package():
    paths = assets()
    for key in ("base", "sft"):
        assert (paths[key] / "model.safetensors").is_file() and (paths[key] / "tokenizer.json").is_file()
        assert "chat_template" in (paths[key] / "tokenizer_config.json").read_text() or \
            (paths[key] / "chat_template.jinja").is_file()


def test_demo_runs_end_to_end_and_says_where_everything_is(demo):
    out, result = demo
    assert result.exit_code == 0, result.output
    assert "forgetting: general probes" in result.output and "chosen: t = " in result.output
    assert f"everything is in {out}" in result.output
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "recovered" / "model.safetensors").is_file()
    assert "## Recovery" in (out / "recovered" / "README.md").read_text()
    again = CliRunner().invoke(main, ["demo", "-o", str(out)])
    assert again.exit_code == 2 and "--force" in again.output  # like merges: no silent overwrite


def test_shipped_models_show_forgetting_and_a_recovering_t(demo):
    out, result = demo
    data = json.loads((out / "sweep.json").read_text())
    rows = {row["t"]: row for row in data["rows"]}
    assert len(rows) == 11
    assert rows[0.0]["general_ppl"] >= 2 * rows[1.0]["general_ppl"]  # the SFT forgot
    chosen = rows[data["chosen_t"]]
    assert chosen["general_recovered"] >= 0.5 and chosen["domain_retained"] >= 0.9
    reported = next(r for r in data["report"] if r["label"] == f"t={data['chosen_t']:g}")
    assert reported["general_recovered"] >= 0.5 and reported["domain_retained"] >= 0.9  # also held out


def test_demo_shows_the_cloze_task_rows_when_lm_eval_is_installed(demo):
    pytest.importorskip("lm_eval")
    out, result = demo
    assert "report tasks: general = demo_general_cloze" in result.output
    data = json.loads((out / "sweep.json").read_text())
    reported = next(r for r in data["report"] if r["label"] == f"t={data['chosen_t']:g}")
    cloze = reported["tasks"]["general"]["demo_general_cloze"]
    sft = next(r for r in data["report"] if r["label"].startswith("SFT"))["tasks"]["general"]["demo_general_cloze"]
    assert cloze["n"] == 12 and cloze["value"] > sft["value"]  # the merge got back general items the SFT forgot
