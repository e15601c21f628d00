"""Probe files: what a model is scored on, parsed, split and rendered into token ids with a scoring mask.

Formats (chosen per file):

* ``.txt``: plain text, documents separated by blank lines; every token is scored.
* ``.jsonl``: one record per line, Alpaca (``instruction``, optional ``input``, ``output``), ShareGPT
  (``conversations`` = ``[{from, value}]``) or ``{"text": ...}`` (plain). For chat records only the assistant
  turns are scored: the prompt's labels are masked.

Bits per byte divide by the UTF-8 bytes of the *scored text*: the document for plain text, the assistant
messages' content for chat records (template markup is scored as tokens but adds no bytes, identically for
every candidate model).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "bot": "assistant", "system": "system"}
BUILTIN_GENERAL = Path(__file__).with_name("general_probes.txt")


@dataclass(frozen=True)
class Document:
    """One probe: plain ``text``, or chat ``messages`` (``[{role, content}]``) whose assistant turns are scored."""

    text: str | None = None
    messages: tuple[dict, ...] = ()
    where: str = ""  # "file:line", for messages

    @property
    def key(self) -> str:
        return self.text if self.text is not None else json.dumps(list(self.messages), sort_keys=True)


@dataclass(frozen=True)
class ProbeSet:
    """Named documents (``name`` is the file, or ``built-in general probes``)."""

    name: str
    documents: tuple[Document, ...]

    def split(self, fraction: float) -> tuple[ProbeSet, ProbeSet]:
        """(selection, report): a document goes to the report part when the SHA-256 of its content, read as a
        number in [0, 1), is below ``fraction`` - deterministic and independent of the documents' order."""
        report = [d for d in self.documents if _unit_hash(d.key) < fraction]
        select = [d for d in self.documents if _unit_hash(d.key) >= fraction]
        if not report or not select:
            raise InputError(f"{self.name}: {len(self.documents)} document(s) are too few to split "
                             f"{fraction:g} for reporting; give more documents or a separate report file")
        return (ProbeSet(f"{self.name} (selection part)", tuple(select)),
                ProbeSet(f"{self.name} (report part)", tuple(report)))


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def load_probes(path: str | Path | None) -> ProbeSet:
    """Parse a probe file (``.txt`` or ``.jsonl``; None = the built-in general probes). Errors name file and line."""
    if path is None:
        return ProbeSet("built-in general probes", _parse_text(BUILTIN_GENERAL.read_text(encoding="utf-8")))
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such probe file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder; give a .txt or .jsonl probe file") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); probe files must be UTF-8") from None
    if path.suffix.lower() in (".jsonl", ".json"):
        documents = _parse_jsonl(text, path)
    else:
        documents = _parse_text(text)
    if not documents:
        raise InputError(f"{path}: holds no probe documents")
    return ProbeSet(str(path), documents)


def _parse_text(text: str) -> tuple[Document, ...]:
    docs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return tuple(Document(text=d) for d in docs)


def _parse_jsonl(text: str, path: Path) -> tuple[Document, ...]:
    docs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); one JSON object per line") from None
        docs.append(_record(record, where))
    return tuple(docs)


def _record(record, where: str) -> Document:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return _sharegpt(record["conversations"], where)
    if "instruction" in record or "output" in record:
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise InputError(f"{where}: Alpaca record needs a string {key!r}")
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise InputError(f"{where}: Alpaca 'input' must be a string")
        user = record["instruction"] + (f"\n\n{extra}" if extra else "")
        return Document(messages=({"role": "user", "content": user},
                                  {"role": "assistant", "content": record["output"]}), where=where)
    if isinstance(record.get("text"), str):
        return Document(text=record["text"], where=where)
    raise InputError(f"{where}: unknown record (keys {sorted(record)[:5]}); expected Alpaca "
                     "(instruction/input/output), ShareGPT (conversations) or {\"text\": ...}")


def _sharegpt(turns, where: str) -> Document:
    if not isinstance(turns, list) or not turns:
        raise InputError(f"{where}: 'conversations' must be a non-empty list of {{from, value}}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in ROLES:
            raise InputError(f"{where}: conversations[{i}] needs 'from' (one of {', '.join(ROLES)}) and a "
                             "string 'value'")
        messages.append({"role": ROLES[turn["from"]], "content": turn["value"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: the conversation has no assistant (gpt) turn to score")
    return Document(messages=tuple(messages), where=where)


# -- rendering into token ids ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Encoded:
    """A document as ``ids`` and ``scored[i]``: whether token ``i`` is predicted and counted (never token 0)."""

    ids: tuple[int, ...]
    scored: tuple[bool, ...]
    num_bytes: int

    @property
    def num_scored(self) -> int:
        return sum(self.scored)


def encode(documents: Sequence[Document], tokenizer, max_tokens: int | None = None) -> list[Encoded]:
    """Tokenize documents in order until ``max_tokens`` scored tokens (at least one document, cut to fit)."""
    out, total = [], 0
    for doc in documents:
        enc = encode_document(doc, tokenizer)
        if max_tokens is not None and total + enc.num_scored > max_tokens:
            if not out:
                out.append(_truncate(enc, max_tokens, tokenizer))
            break
        out.append(enc)
        total += enc.num_scored
    return out


def encode_document(doc: Document, tokenizer) -> Encoded:
    if doc.text is not None:
        return _encode_text(doc.text, tokenizer)
    return _encode_chat(doc, tokenizer)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_text(text: str, tokenizer) -> Encoded:
    ids = _ids(tokenizer, text)
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is not None:  # a start token lets the first real token be scored too
        return Encoded(tuple([start] + ids), (False,) + (True,) * len(ids), len(text.encode("utf-8")))
    unscored = tokenizer.decode(ids[:1])  # no start token: the first token is context only
    return Encoded(tuple(ids), (False,) + (True,) * (len(ids) - 1),
                   max(0, len(text.encode("utf-8")) - len(unscored.encode("utf-8"))))


def _encode_chat(doc: Document, tokenizer) -> Encoded:
    """Segments of the rendered conversation: the prompt up to each assistant turn (masked), then that turn."""
    segments = _chat_segments(list(doc.messages), tokenizer, doc.where)
    ids: list[int] = []
    scored: list[bool] = []
    for text, is_response in segments:
        piece = _ids(tokenizer, text)
        ids += piece
        scored += [is_response] * len(piece)
    if not ids:
        raise InputError(f"{doc.where}: renders to no tokens")
    scored[0] = False
    content = sum(len(m["content"].encode("utf-8")) for m in doc.messages if m["role"] == "assistant")
    return Encoded(tuple(ids), tuple(scored), content)


def _chat_segments(messages: list[dict], tokenizer, where: str) -> list[tuple[str, bool]]:
    if not getattr(tokenizer, "chat_template", None):
        return _plain_chat_segments(messages, tokenizer)
    segments, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
            full = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        except Exception as e:  # template errors (e.g. a template that insists on alternating roles)
            raise InputError(f"{where}: the SFT tokenizer's chat template cannot render this record ({e})") from None
        if not (prompt.startswith(done) and full.startswith(prompt)):
            if segments:  # a template that rewrites earlier turns: score only the last assistant turn
                return _chat_segments_last(messages, tokenizer, where)
            raise InputError(f"{where}: the chat template's rendering of the reply does not extend its prompt; "
                             "cannot tell prompt tokens from response tokens")
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    return segments


def _chat_segments_last(messages, tokenizer, where):
    """Only the last assistant turn is scored, after everything before it rendered as its prompt."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    prompt = tokenizer.apply_chat_template(messages[:last], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template(messages[:last + 1], tokenize=False)
    if not full.startswith(prompt):
        raise InputError(f"{where}: the chat template's rendering of the reply does not extend its prompt; "
                         "cannot tell prompt tokens from response tokens")
    return [(prompt, False), (full[len(prompt):], True)]


def _plain_chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """No chat template: Alpaca-style headers; the reply ends with the EOS token's text."""
    bos = tokenizer.bos_token or ""
    eos = tokenizer.eos_token or ""
    headers = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
    segments, prompt = [], bos
    for m in messages:
        if m["role"] == "assistant":
            segments += [(prompt + headers["assistant"], False), (m["content"] + eos + "\n\n", True)]
            prompt = ""
        else:
            prompt += headers[m["role"]] + m["content"] + "\n\n"
    return segments


def _truncate(enc: Encoded, max_tokens: int, tokenizer) -> Encoded:
    """Keep tokens up to the ``max_tokens``-th scored one; bytes become those of the kept scored tokens' text."""
    kept, count = 0, 0
    for i, s in enumerate(enc.scored):
        count += s
        kept = i + 1
        if count >= max_tokens:
            break
    ids, scored = enc.ids[:kept], enc.scored[:kept]
    text = tokenizer.decode([t for t, s in zip(ids, scored) if s])
    return Encoded(ids, scored, len(text.encode("utf-8")))
