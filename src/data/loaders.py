"""Format loaders: every supported row format -> one canonical row form.

    load_sft(spec, template)          -> rows {"prompt", "completion", "meta"}
    load_preferences(spec, template)  -> rows {"prompt", "chosen", "rejected", "meta"}
    load_prompts(spec, template)      -> rows {"prompt_id", "prompt", "meta"}

Rows come from a JSON/JSONL file, a parquet/Arrow/CSV file, a dataset folder, a Hub id or a mixture of them
(sources.py: `path`, `split`, `name`, `revision`, `columns`, `mixture`); what follows is the same for all of them.

Formats (DatasetSpec.format; `auto` decides from the first row's keys):

    alpaca             instruction / input / output, or chosen / rejected instead of output; `en_*` fields (or
                       `spec.field_prefix`) for bilingual files; Stanford's seed_tasks `instances[0]`
    prompt_completion  prompt / completion
    messages           [{role, content}]; the last (assistant) turn is the completion, earlier turns the prompt
    sharegpt           conversations [{from, value}] (human / gpt / system), with LLaMA-Factory's preference form
                       `chosen` / `rejected` {from: gpt, value}
    preference         prompt / chosen / rejected, each a string or a message list
    hh                 chosen / rejected full transcripts with a shared prompt: Anthropic HH strings
                       ("\n\nHuman: ... \n\nAssistant: ...") or message lists (TRL's implicit-prompt form)
    prompt             prompt alone
    text               text alone (`text`): language-model data for `sft`, an empty prompt and every token trained
                       on (continued pretraining; a document longer than max_length is split, not cut)

`prompt` is canonical (see templates.py): with template `alpaca` a rendered string, with `chat` a list of chat
messages. A `prompt` that is already a string in the file is used verbatim: it is the text the model sees (files
written by earlier stages hold such rendered prompts). SFT from preference data trains on the chosen answer.
`meta` keeps the original instruction/input where the format has them (AlpacaEval output rows need them).

A bad row (invalid JSON or UTF-8, a missing, empty or wrongly typed field) raises DataError naming the file or
dataset, the row (1-based line, or array or split index) and the field (the dataset's own column name where
`columns` renamed it), unless `spec.skip_bad_rows` is set; then it is counted in
`LoadResult.skipped`. `spec.languages` keeps rows in those languages (others counted in
`LoadResult.language_filtered`), `spec.dedup` drops exact duplicates (`LoadResult.deduplicated`) and
`spec.near_dedup` near duplicates (`LoadResult.near_duplicates`; see clean.py). A dataset that ends
up empty is always an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prefopt.data.clean import NearDuplicates, dedup_key, in_languages, prompt_text, row_text
from prefopt.data.counts import note
from prefopt.data.errors import DataError
from prefopt.data.records import json_object, read_records  # noqa: F401 - read_records is this module's API too
from prefopt.data.sources import open_rows, report_mixture
from prefopt.data.spec import DatasetSpec
from prefopt.data.templates import ChatCheck, make_prompt, messages_to_prompt, system_message
from prefopt.io import content_hash

TEMPLATES = ("alpaca", "chat")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_SURROGATE = re.compile("[\ud800-\udfff]")
# appended to a row's error when the dataset does not skip bad rows, so the way out is in the same line
SKIP_HINT = "`skip_bad_rows: true` on this dataset skips such rows"


KTO_LABEL = "label"
"""KTO's unpaired feedback (TRL's `prompt`/`completion`/`label`, LLaMA-Factory's `kto_tag`): a boolean per answer.
SFT keeps the answers labelled true; a pair reader refuses such a row, naming the field."""


@dataclass
class LoadResult:
    path: str
    rows: list[dict]
    skipped: int = 0
    skipped_reasons: list[str] = field(default_factory=list)
    deduplicated: int = 0
    near_duplicates: int = 0
    language_filtered: int = 0
    undesirable: int = 0
    """SFT rows labelled undesirable (KTO's `label: false`), which are not trained on."""
    blank_texts: int = 0
    """`text` rows with no text (a corpus's blank lines, as in wikitext), dropped."""
    parts: list[dict] = field(default_factory=list)
    """A mixture's parts: source, weight, rows available, drawn and kept (empty for one dataset)."""

    def __len__(self):
        return len(self.rows)

    def stats(self) -> dict:
        """What a stage writes to its summary and logs."""
        out = {"rows": len(self.rows), "skipped": self.skipped, "deduplicated": self.deduplicated,
               "near_duplicates": self.near_duplicates, "language_filtered": self.language_filtered}
        if self.undesirable:
            out["undesirable"] = self.undesirable
        if self.blank_texts:
            out["blank_texts"] = self.blank_texts
        return {**out, "parts": self.parts} if self.parts else out


# ------------------------------------------------------------------------------------------------ reading


# ------------------------------------------------------------------------------------------------ fields


class _Row:
    """One record being parsed; its errors name the file, the row and the field."""

    def __init__(self, data: dict, path, n: int, prefix: str = "", allow_empty_answers: bool = False,
                 max_chars: int = 0):
        self.data, self.path, self.n, self.prefix = data, path, n, prefix
        self.allow_empty_answers, self.max_chars = allow_empty_answers, max_chars

    def error(self, field: str | None, problem: str) -> DataError:
        return DataError(self.path, self.n, field, problem)

    def text(self, key: str, required: bool = True) -> str:
        return _string(self.data.get(key), key, self, required)

    def alpaca_prefix(self) -> str:
        # Bilingual Alpaca files (alpaca-chinese-dataset) carry en_* and zh_* fields and no plain ones.
        if self.prefix or "instruction" in self.data or "en_instruction" not in self.data:
            return self.prefix
        return "en_"


def _string(value: Any, name: str, r: _Row, required: bool = True) -> str:
    if value is None:
        if required:
            raise r.error(name, "missing")
        return ""
    if not isinstance(value, str):
        raise r.error(name, f"expected a string, got {type(value).__name__}")
    if r.max_chars and len(value) > r.max_chars:
        raise r.error(name, f"{len(value):,} characters, over the limit max_chars={r.max_chars:,} (raise the dataset's "
                            "`max_chars` if such rows are intended)")
    bad = _SURROGATE.search(value)
    if bad:  # JSON's \ud800 escapes decode to lone surrogates: not text a tokenizer or UTF-8 writer accepts
        raise r.error(name, f"contains a lone surrogate {bad.group()!a} at character {bad.start()} (not valid Unicode)")
    if required and not value.strip() and not (r.allow_empty_answers and name in ANSWER_FIELDS):
        raise r.error(name, "empty")
    return value


# Fields that hold a response; with DatasetSpec.allow_empty_answers an empty one is valid (a sampled candidate).
ANSWER_FIELDS = {"chosen", "rejected", "completion", "output"}


def _messages(value: Any, name: str, r: _Row) -> list[dict]:
    """A validated list of {role, content} messages (extra keys dropped)."""
    if value is None:
        raise r.error(name, "missing")
    if not isinstance(value, list):
        raise r.error(name, f"expected a list of messages, got {type(value).__name__}")
    if not value:
        raise r.error(name, "empty")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise r.error(f"{name}[{i}]", f"expected a message object, got {type(m).__name__}")
        role = _string(m.get("role"), f"{name}[{i}].role", r)
        if role not in ROLES:
            raise r.error(f"{name}[{i}].role", f"unknown role '{role}' (expected one of {', '.join(ROLES)})")
        out.append({"role": role, "content": _string(m.get("content"), f"{name}[{i}].content", r)})
    return out


def _sharegpt_turn(t: Any, name: str, r: _Row) -> dict:
    if not isinstance(t, dict):
        raise r.error(name, f"expected a {{from, value}} object, got {type(t).__name__}")
    who = _string(t.get("from"), f"{name}.from", r)
    if who not in SHAREGPT_ROLES:
        raise r.error(f"{name}.from", f"unsupported speaker '{who}' (expected human, gpt or system)")
    return {"role": SHAREGPT_ROLES[who], "content": _string(t.get("value"), f"{name}.value", r)}


def _answer(value: Any, name: str, r: _Row) -> str:
    """An answer given as a string, a message list ending with the assistant's turn, or one {from|role, ...} object."""
    if isinstance(value, dict):
        m = _sharegpt_turn(value, name, r) if "from" in value else _messages([value], name, r)[0]
        value = [m]
    if isinstance(value, list):
        msgs = _messages(value, name, r)
        if msgs[-1]["role"] != "assistant":
            raise r.error(name, f"the last message must be the assistant's answer, not '{msgs[-1]['role']}'")
        return msgs[-1]["content"]
    return _string(value, name, r)


def _chat_prompt(msgs: list[dict], name: str, r: _Row, template: str) -> str | list[dict]:
    if not any(m["role"] == "user" for m in msgs) or msgs[-1]["role"] != "user":
        raise r.error(name, "the prompt turns must end with a user turn")
    return messages_to_prompt(msgs, template)


def _prompt_value(value: Any, name: str, r: _Row, template: str) -> str | list[dict]:
    """A `prompt` field: a string is used verbatim (already the model's input), a message list is rendered."""
    if isinstance(value, list):
        return _chat_prompt(_messages(value, name, r), name, r, template)
    return _string(value, name, r)


def _flat_answers(r: _Row, need: str, completion_key: str) -> dict:
    """completion (falling back to `chosen`) or chosen/rejected, read from top-level fields."""
    if need == "completion":
        for key in (completion_key, "chosen"):
            if r.data.get(key) is not None:
                return {"completion": _answer(r.data[key], key, r)}
        raise r.error(completion_key, "missing")
    if need == "pair":
        return {k: _answer(r.data.get(k), k, r) for k in ("chosen", "rejected")}
    return {}


# ------------------------------------------------------------------------------------------------ formats
# Each parser: (row, need, template) -> {"prompt", "meta", + "completion" | "chosen"/"rejected"}, where need is
# "completion" (SFT), "pair" (preferences) or "prompt" (generation).


def _parse_alpaca(r: _Row, need: str, template: str) -> dict:
    p = r.alpaca_prefix()
    instruction = r.text(p + "instruction")
    src, where = r.data, ""
    if p + "input" not in src and p + "output" not in src and isinstance(src.get("instances"), list):
        # Stanford's seed_tasks.jsonl: input/output pairs under `instances`; the first one is the example.
        if not src["instances"] or not isinstance(src["instances"][0], dict):
            raise r.error("instances", "expected a non-empty list of {input, output} objects")
        src, where = src["instances"][0], "instances[0]."
    inp = _string(src.get(p + "input"), f"{where}{p}input", r, required=False)
    out = {"prompt": make_prompt(instruction, inp, template), "meta": {"instruction": instruction, "input": inp}}
    if where and need == "completion":
        out["completion"] = _string(src.get("output"), "instances[0].output", r)
        return out
    return {**out, **_flat_answers(r, need, p + "output")}


def _parse_prompt_field(r: _Row, need: str, template: str) -> dict:
    out = {"prompt": _prompt_value(r.data.get("prompt"), "prompt", r, template), "meta": {}}
    return {**out, **_flat_answers(r, need, "completion")}


def _conversation(msgs: list[dict], name: str, r: _Row, need: str, template: str) -> dict:
    """Chat turns -> prompt + answers: a trailing assistant turn is the answer, or `chosen`/`rejected` give it."""
    ends_with_answer = msgs[-1]["role"] == "assistant"
    context = msgs[:-1] if ends_with_answer else msgs
    if not context:
        raise r.error(name, "no prompt turns before the answer")
    out = {"prompt": _chat_prompt(context, name, r, template), "meta": {}}
    if need == "completion":
        if ends_with_answer:
            out["completion"] = msgs[-1]["content"]
        elif r.data.get("chosen") is not None:
            out["completion"] = _answer(r.data["chosen"], "chosen", r)
        else:
            raise r.error(name, "the last turn must be the assistant's answer")
    elif need == "pair":
        if ends_with_answer:
            raise r.error(name, "a preference row's turns must end before the answer (given in chosen/rejected)")
        out.update(_flat_answers(r, need, "completion"))
    return out


def _parse_text(r: _Row, need: str, template: str) -> dict:
    """Language-model text: no prompt, the whole text is what is trained on (the `sft` stage's continued
    pretraining). A pair or a generation prompt cannot be read from it."""
    if need != "completion":
        what = "preference pairs (chosen / rejected)" if need == "pair" else "prompts to sample from"
        raise r.error("text", f"is language-model text, which trains `sft` only (every token); {what} need "
                      "another format")
    return {"prompt": "", "completion": r.text("text"), "meta": {}}


def _parse_messages(r: _Row, need: str, template: str) -> dict:
    return _conversation(_messages(r.data.get("messages"), "messages", r), "messages", r, need, template)


def _parse_sharegpt(r: _Row, need: str, template: str) -> dict:
    turns = r.data.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise r.error("conversations", "missing" if turns is None else "expected a non-empty list of turns")
    msgs = [_sharegpt_turn(t, f"conversations[{i}]", r) for i, t in enumerate(turns)]
    system = r.data.get("system")  # LLaMA-Factory's optional system column
    if system is not None and _string(system, "system", r, required=False).strip():
        msgs.insert(0, {"role": "system", "content": system})
    return _conversation(msgs, "conversations", r, need, template)


def _hh_turns(transcript: str, r: _Row) -> list[dict]:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> user/assistant messages a, b, c."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip():
        raise r.error("chosen", "text before the first '\\n\\nHuman:' turn")
    msgs = [
        {"role": "user" if who == "Human" else "assistant", "content": text.strip()}
        for who, text in zip(parts[1::2], parts[2::2])
    ]
    return msgs[:-1]  # the final, empty "Assistant:" turn the answers continue


def _parse_hh(r: _Row, need: str, template: str) -> dict:
    chosen, rejected = r.data.get("chosen"), r.data.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        c, j = _messages(chosen, "chosen", r), _messages(rejected, "rejected", r)
        if c[:-1] != j[:-1]:
            raise r.error("rejected", "does not share the chosen conversation's prompt turns")
        answers = {"chosen": _answer(c, "chosen", r), "rejected": _answer(j, "rejected", r)}
        if len(c) < 2:
            raise r.error("chosen", "no prompt turns before the answer")
        prompt, meta = _chat_prompt(c[:-1], "chosen", r, template), {}
    else:
        c, j = r.text("chosen"), r.text("rejected")
        cut = c.rfind(HH_ASSISTANT)
        if cut < 0:
            raise r.error("chosen", "no '\\n\\nAssistant:' turn")
        shared = c[: cut + len(HH_ASSISTANT)]
        if j[: j.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)] != shared:
            raise r.error("rejected", "does not share the chosen transcript's prompt (up to its last Assistant turn)")
        answers = {"chosen": c[len(shared):].strip(), "rejected": j[len(shared):].strip()}
        for k, v in answers.items():
            if not v:
                raise r.error(k, "empty final answer")
        msgs = _hh_turns(shared, r)
        if not msgs or msgs[-1]["role"] != "user":
            raise r.error("chosen", "the prompt turns must end with a Human turn")
        prompt, meta = messages_to_prompt(msgs, template), {"transcript_prompt": shared}
    out = {"prompt": prompt, "meta": meta}
    if need == "completion":
        out["completion"] = answers["chosen"]
    elif need == "pair":
        out.update(answers)
    return out


PARSERS: dict[str, Callable[[_Row, str, str], dict]] = {
    "alpaca": _parse_alpaca,
    "prompt_completion": _parse_prompt_field,
    "preference": _parse_prompt_field,
    "prompt": _parse_prompt_field,
    "messages": _parse_messages,
    "sharegpt": _parse_sharegpt,
    "hh": _parse_hh,
    "text": _parse_text,
}


def detect_format(row: Any, prefix: str = "") -> str:
    """The format a row's keys suggest ("unknown" if none)."""
    if not isinstance(row, dict):
        return "unknown"
    keys = set(row)
    if "conversations" in keys:
        return "sharegpt"
    if "messages" in keys:
        return "messages"
    if {"instruction", "en_instruction", prefix + "instruction"} & keys:
        return "alpaca"
    if "prompt" in keys:
        if {"chosen", "rejected"} & keys:
            return "preference"
        return "prompt_completion" if "completion" in keys else "prompt"
    if {"chosen", "rejected"} & keys:
        return "hh"
    if "text" in keys:
        return "text"
    return "unknown"


# ------------------------------------------------------------------------------------------------ loading


def _load(spec: DatasetSpec, need: str, template: str, resolve=None, whitespace_pairs: bool = False,
          tokenizer=None) -> LoadResult:
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    chat = ChatCheck(tokenizer) if tokenizer is not None and template == "chat" else None
    for fmt_key in [spec.format] + [m.format for m in spec.mixture]:
        if fmt_key != "auto" and fmt_key not in PARSERS:
            known = ", ".join(["auto", *PARSERS])
            raise DataError("<config>", None, "format", f"unknown format '{fmt_key}' (one of {known})")
    source = open_rows(spec, resolve)
    result = LoadResult(path=source.label, rows=[])
    fmts: dict[int, str] = {}  # per part: with auto, the part's first good row fixes it
    seen: set[str] = set()
    near = (NearDuplicates(spec.near_dedup_threshold, spec.near_dedup_ngram, spec.near_dedup_num_perm)
            if spec.near_dedup else None)
    for part, n, rec in source:
        path = part.label
        try:
            try:
                json_object(path, n, rec)
                fmt = fmts.get(id(part)) or (None if part.format == "auto" else part.format)
                row_fmt = fmt or detect_format(rec, part.field_prefix)
                if row_fmt == "unknown":
                    raise DataError(path, n, None, f"cannot tell the format from the keys {sorted(rec)}; set "
                                    "`format` (or map the dataset's columns with `columns`)")
                r = _Row(rec, path, n, part.field_prefix, spec.allow_empty_answers, spec.max_chars)
                kto = isinstance(rec.get(KTO_LABEL), bool)
                if kto and need == "pair" and not ({"chosen", "rejected"} & set(rec)):
                    # the whole dataset's format, not one bad row: no row number, no advice to fix or skip rows
                    raise DataError(path, None, KTO_LABEL, f"marks unpaired answers (KTO feedback, row {n}: one "
                                    "answer, desirable or not); reward models, DPO and SimPO learn from pairs "
                                    "(chosen / rejected); SFT reads this file (the desirable answers)")
                if row_fmt == "text" and need == "completion" and isinstance(rec.get("text"), str) \
                        and not rec["text"].strip():
                    result.blank_texts += 1  # a corpus's blank line: nothing to learn, nothing wrong
                    continue
                if kto and need == "completion" and not rec[KTO_LABEL]:
                    result.undesirable += 1  # an answer marked bad: imitating it is the opposite of the label
                    continue
                parsed = PARSERS[row_fmt](r, need, template)
                if isinstance(parsed["prompt"], list):
                    parsed["prompt"] = system_message(parsed["prompt"], spec.system_message)
                    if chat is not None:
                        _check_chat(chat, parsed, need, r, row_fmt, spec.system_message)
                row = _canonical(parsed, rec, need)
                if need == "pair" and (row["chosen"] == row["rejected"] if whitespace_pairs
                                       else row["chosen"].strip() == row["rejected"].strip()):
                    raise r.error("rejected", "same text as 'chosen': a pair with no preference to learn")
                fmts[id(part)] = row_fmt
            except DataError as e:  # name the field as the dataset does, where `columns` renamed it
                raise DataError(e.path, e.row, part.column(e.field), e.problem) from None
        except DataError as e:
            if not spec.skip_bad_rows:
                raise DataError(e.path, e.row, e.field, e.problem, SKIP_HINT if e.row is not None else "") from None
            result.skipped += 1
            if len(result.skipped_reasons) < 20:
                result.skipped_reasons.append(str(e))
            continue
        if spec.languages and not in_languages(prompt_text(row), spec.languages):
            result.language_filtered += 1
            continue
        if spec.dedup:
            key = dedup_key(row)
            if key in seen:
                result.deduplicated += 1
                continue
            seen.add(key)
        if near is not None and near.check_and_add(row_text(row)) is not None:
            result.near_duplicates += 1
            continue
        result.rows.append(row)
        part.kept += 1
        if spec.limit and len(result.rows) >= spec.limit:
            break
    name = Path(source.label).name if not source.is_mixture and len(source.parts) == 1 else source.label
    note(f"rows skipped as bad (skip_bad_rows) in {name}", result.skipped)
    note(f"duplicate rows dropped (dedup) in {name}", result.deduplicated)
    note(f"near-duplicate rows dropped (near_dedup) in {name}", result.near_duplicates)
    note(f"rows dropped as not in {spec.languages} (languages) in {name}", result.language_filtered)
    note(f"rows labelled undesirable ({KTO_LABEL}: false, KTO feedback) not trained on in {name}", result.undesirable)
    note(f"blank text rows dropped in {name}", result.blank_texts)
    if source.is_mixture:
        result.parts = report_mixture(source)
        for i, d in enumerate(result.parts, start=1):
            note(f"rows from mixture part {i}, {d['source']} (weight {d['weight']:g}: {d['drawn']:,} of "
                 f"{d['available']:,} drawn)", d["kept"])
    if not result.rows:
        first = f"; the first skipped: {result.skipped_reasons[0]}" if result.skipped_reasons else ""
        other = f", {result.language_filtered} not in {spec.languages}" if result.language_filtered else ""
        raise DataError(source.label, None, None, f"no usable rows ({result.skipped} skipped{other}){first}")
    return result


# The field a format keeps its prompt's turns in: what a chat template's refusal of the conversation names.
PROMPT_FIELD = {"sharegpt": "conversations", "messages": "messages", "hh": "chosen", "alpaca": "instruction"}


def _check_chat(chat: ChatCheck, parsed: dict, need: str, r: _Row, fmt: str, system: str) -> None:
    """A chat prompt the tokenizer's template refuses (with the generation prompt, as generation and the aligners
    render it, and followed by the answer, as SFT renders it) is a bad row naming the template's reason."""
    model = getattr(chat.tokenizer, "name_or_path", "the model")
    if not getattr(chat.tokenizer, "chat_template", None):  # the stage's setting, not this row
        raise DataError(r.path, None, None, f"holds chat turns (row {r.n}) for template: chat, but the tokenizer of "
                        f"{model} has no chat template; set the stage's `template: alpaca` or give the model one")
    conversations = [(parsed["prompt"], True)]
    if need == "completion":
        conversations.append(([*parsed["prompt"], {"role": "assistant", "content": parsed["completion"]}], False))
    for messages, generation_prompt in conversations:
        problem = chat.problem(messages, generation_prompt)
        if problem is None:
            continue
        roles = "/".join(m["role"] for m in messages)
        if system == "keep" and any(m["role"] == "system" for m in messages):
            problem += ("; this template may have no system role: `system_message: merge` on this dataset puts the "
                        "system message at the head of the first user turn (`drop` leaves it out)")
        raise r.error(PROMPT_FIELD.get(fmt, "prompt"), f"the chat template of {model} refuses these turns "
                      f"({roles}): {problem}")


def _canonical(parsed: dict, rec: dict, need: str) -> dict:
    """Key order and the prompt id: the row's own id if it has one, else a hash of the prompt."""
    if need == "completion":
        return {"prompt": parsed["prompt"], "completion": parsed["completion"], "meta": parsed["meta"]}
    if need == "pair":
        keys = ("prompt", "chosen", "rejected", "meta")
        return {k: parsed[k] for k in keys}
    pid = next((rec[k] for k in ("prompt_id", "id") if isinstance(rec.get(k), (str, int)) and str(rec[k])), None)
    return {"prompt_id": str(pid) if pid is not None else content_hash(parsed["prompt"]), "prompt": parsed["prompt"],
            "meta": parsed["meta"]}


def load_sft(spec: DatasetSpec, template: str = "alpaca", resolve=None, tokenizer=None) -> LoadResult:
    """`tokenizer`: with `template: chat`, each row's turns are checked against its chat template (`ChatCheck`)."""
    return _load(spec, "completion", template, resolve, tokenizer=tokenizer)


def load_preferences(spec: DatasetSpec, template: str = "alpaca", resolve=None,
                     whitespace_pairs: bool = False, bad_row_hint: str = "", tokenizer=None) -> LoadResult:
    """`whitespace_pairs`: accept a chosen and rejected that differ only in surrounding whitespace (`7` and ` 7` are
    different tokens). Refused in human data, where it is a copy-paste slip; the pairs the pipeline builds accept
    it, since the reward model scored such sampled candidates apart (seen on `lookup`: -1.8 against -8.2).
    `bad_row_hint`: for a file given as a bare path, whose reader cannot set `skip_bad_rows`, the advice a bad
    row's error gives instead of the skip_bad_rows hint."""
    try:
        return _load(spec, "pair", template, resolve, whitespace_pairs, tokenizer)
    except DataError as e:
        if not bad_row_hint or e.hint != SKIP_HINT:
            raise
        raise DataError(e.path, e.row, e.field, e.problem, bad_row_hint) from None


def load_prompts(spec: DatasetSpec, template: str = "alpaca", resolve=None, tokenizer=None) -> LoadResult:
    return _load(spec, "prompt", template, resolve, tokenizer=tokenizer)
