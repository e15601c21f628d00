"""Probe parsing and rendering, perplexity / bits per byte, recovery scores and the selection rule."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from merge.errors import InputError
from merge.evaluate import encode, load_probes, recovery, score, select
from merge.evaluate.probes import BUILTIN_GENERAL, Document, encode_document
from merge.evaluate.scoring import windows
from merge.evaluate.selection import Recovery, harmonic_mean

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|> {% endif %}")
WORDS = ["hello", "world", "add", "two", "and", "three", "five", "is", "the", "answer", "say", "hi", "again"]


@pytest.fixture(scope="module")
def tokenizer():
    specials = ["<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<unk>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>",
                                   additional_special_tokens=specials[2:5])
    fast.chat_template = TEMPLATE
    return fast


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_plain_text_documents_are_split_on_blank_lines_and_every_token_is_scored(tmp_path, tokenizer):
    path = _write(tmp_path, "g.txt", "hello world\nagain\n\n\n  \nsay hi\n")
    probes = load_probes(path)
    assert [d.text for d in probes.documents] == ["hello world\nagain", "say hi"]
    enc = encode_document(probes.documents[0], tokenizer)
    assert _tokens(tokenizer, enc.ids) == ["<s>", "hello", "world", "again"]
    assert enc.scored == (False, True, True, True)
    assert enc.num_bytes == len(b"hello world\nagain")


def test_alpaca_record_scores_only_the_response_tokens(tmp_path, tokenizer):
    record = {"instruction": "add two and three", "input": "say the answer", "output": "five is the answer"}
    probes = load_probes(_write(tmp_path, "d.jsonl", json.dumps(record) + "\n"))
    enc = encode_document(probes.documents[0], tokenizer)
    toks = _tokens(tokenizer, enc.ids)
    assert toks == ["<s>", "<|user|>", "add", "two", "and", "three", "say", "the", "answer", "<|end|>",
                    "<|assistant|>", "five", "is", "the", "answer", "<|end|>"]
    scored = [t for t, s in zip(toks, enc.scored) if s]
    masked = [t for t, s in zip(toks, enc.scored) if not s]
    assert scored == ["five", "is", "the", "answer", "<|end|>"]  # the reply and its end-of-turn token
    assert masked == toks[:11]
    assert enc.num_bytes == len("five is the answer")


def test_sharegpt_scores_every_assistant_turn(tmp_path, tokenizer):
    conv = {"conversations": [{"from": "system", "value": "say hi"}, {"from": "human", "value": "hello"},
                              {"from": "gpt", "value": "hi world"}, {"from": "human", "value": "again"},
                              {"from": "gpt", "value": "hello again"}]}
    enc = encode_document(load_probes(_write(tmp_path, "c.jsonl", json.dumps(conv))).documents[0], tokenizer)
    toks = _tokens(tokenizer, enc.ids)
    assert [t for t, s in zip(toks, enc.scored) if s] == ["hi", "world", "<|end|>", "hello", "again", "<|end|>"]
    assert [t for t, s in zip(toks, enc.scored) if not s] == [
        "<s>", "<|system|>", "say", "hi", "<|end|>", "<|user|>", "hello", "<|end|>", "<|assistant|>",
        "<|user|>", "again", "<|end|>", "<|assistant|>"]
    assert enc.num_bytes == len("hi world") + len("hello again")


def test_without_a_chat_template_responses_are_still_the_only_scored_part(tokenizer):
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                    eos_token="<|end|>", unk_token="<unk>")
    doc = Document(messages=({"role": "user", "content": "add two"}, {"role": "assistant", "content": "five"}))
    enc = encode_document(doc, plain)
    scored = [t for t, s in zip(_tokens(plain, enc.ids), enc.scored) if s]
    assert scored == ["five", "<|end|>"]


@pytest.mark.parametrize("line, message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', "d.jsonl:2: unknown record"),
    ('{"conversations": [{"from": "human", "value": "hi"}]}', "d.jsonl:2: the conversation has no assistant"),
    ('{"instruction": "x"}', "d.jsonl:2: Alpaca record needs a string 'output'"),
    ('[1, 2]', "d.jsonl:2: expected a JSON object"),
])
def test_bad_records_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"instruction": "a", "output": "b"})
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        load_probes(_write(tmp_path, "d.jsonl", good + "\n" + line + "\n"))


def test_missing_and_empty_probe_files(tmp_path):
    with pytest.raises(InputError, match="no such probe file"):
        load_probes(tmp_path / "nope.txt")
    with pytest.raises(InputError, match="holds no probe documents"):
        load_probes(_write(tmp_path, "e.txt", "\n\n  \n"))


def test_builtin_general_probes_ship_and_parse():
    probes = load_probes(None)
    assert BUILTIN_GENERAL.is_file() and len(probes.documents) >= 10


def test_holdout_split_is_deterministic_and_order_free(tmp_path):
    docs = [f"document number {i}" for i in range(40)]
    a = load_probes(_write(tmp_path, "a.txt", "\n\n".join(docs)))
    b = load_probes(_write(tmp_path, "b.txt", "\n\n".join(reversed(docs))))
    sa, ra = a.split(0.5)
    sb, rb = b.split(0.5)
    assert {d.text for d in ra.documents} == {d.text for d in rb.documents}
    assert len(sa.documents) + len(ra.documents) == 40 and ra.documents and sa.documents


def test_max_tokens_keeps_whole_documents(tmp_path, tokenizer):
    probes = load_probes(_write(tmp_path, "g.txt", "hello world\n\nsay hi again\n\nhello"))
    assert [e.num_scored for e in encode(probes.documents, tokenizer, max_tokens=5)] == [2, 3]
    assert [e.num_scored for e in encode(probes.documents, tokenizer, max_tokens=1)] == [1]  # cut to fit


def test_windows_predict_every_scored_token_exactly_once():
    from merge.evaluate.probes import Encoded

    enc = Encoded(tuple(range(10)), (False, True, True, False, True, True, True, True, True, True), 1)
    targets = [y for _, labels in windows([enc], 4) for y in labels if y != -100]
    assert targets == [1, 2, 4, 5, 6, 7, 8, 9]


def test_score_equals_a_direct_computation(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    model = LlamaForCausalLM(config).eval()
    docs = [Document(text="hello world say hi again and again hello world the answer is five"),
            Document(messages=({"role": "user", "content": "add two"}, {"role": "assistant", "content": "five"}))]
    encoded = encode(docs, tokenizer)
    result = score(model, encoded, window=8)
    nll = 0.0
    with torch.no_grad():
        for enc in encoded:
            ids = list(enc.ids)
            for i in range(1, len(ids)):
                if enc.scored[i]:
                    # the window holding target i starts at a multiple of 7 (windows overlap by one token)
                    start = ((i - 1) // 7) * 7
                    context = ids[start:i]
                    logits = model(torch.tensor([context])).logits[0, -1].float()
                    nll -= float(torch.log_softmax(logits, -1)[ids[i]])
    n_tokens = sum(e.num_scored for e in encoded)
    n_bytes = len(docs[0].text.encode()) + len("five")
    assert result.tokens == n_tokens and result.num_bytes == n_bytes
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.bpb == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(nll / n_tokens), rel=1e-5)


def test_recovery_scores_against_hand_computed_values():
    # G: base 1.0, SFT 2.0, m 1.25 -> recovered 0.75; D: base 3.0, SFT 1.0, m 1.2 -> retained 0.9
    rec = recovery(1.0, 2.0, 1.25, 3.0, 1.0, 1.2)
    assert rec.general_recovered == pytest.approx(0.75)
    assert rec.domain_retained == pytest.approx(0.9)
    assert rec.score == pytest.approx(2 * 0.75 * 0.9 / 1.65)
    assert harmonic_mean(-0.1, 0.9) == 0.0
    assert math.isnan(recovery(1.0, 0.9, 1.0, 3.0, 1.0, 2.0).general_recovered)  # no forgetting to measure


def _table(*pairs):
    return [(i, Recovery(gr, dr)) for i, (gr, dr) in enumerate(pairs)]


def test_selection_rule_on_synthetic_tables():
    rows = _table((0.0, 1.0), (0.4, 0.97), (0.6, 0.91), (0.8, 0.7), (1.0, 0.0))
    pick = lambda table, **kw: select(table, lambda r: r[1], **kw)[0]  # noqa: E731
    assert pick(rows) == 2  # most recovery while keeping >= 90% of the domain gain
    assert pick(rows, keep_domain=0.95) == 1
    assert pick(rows, rule="score") == 3  # harmonic means: 0, .568, .724, .747, 0
    none_keep = _table((0.5, 0.5), (0.7, 0.6), (0.9, 0.2))
    assert pick(none_keep, keep_domain=0.99) == 1  # nobody keeps 99%: best score
    ties = _table((0.5, 0.95), (0.5, 0.95))
    assert pick(ties) == 0  # the first of equals (closer to the SFT)
