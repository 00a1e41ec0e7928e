"""Prompt templates: Alpaca's for base models, the tokenizer's chat template for chat models.

A canonical prompt is either a string already rendered with the Alpaca template, or a list of chat messages
(``[{"role": "user", "content": ...}, ...]``) that the tokenizer's chat template renders at tokenization time.
Rendered text becomes token ids through `encode` alone, which gives it exactly one BOS.
"""

from __future__ import annotations

from typing import Any

# Stanford Alpaca's two prompt variants (train.py, PROMPT_DICT), verbatim.
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    if input and input.strip():
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def make_prompt(instruction: str, input: str, template: str) -> str | list[dict]:
    """An instruction (and optional input) as the canonical prompt for `template`."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input)
    content = instruction if not (input and input.strip()) else f"{instruction}\n\n{input}"
    return [{"role": "user", "content": content}]


def messages_to_prompt(messages: list[dict], template: str) -> str | list[dict]:
    """Chat turns (ending before the answer) as the canonical prompt for `template`.

    With the Alpaca template, earlier turns become `### Instruction:` / `### Response:` blocks."""
    if template == "chat":
        return messages
    system = "".join(m["content"] + "\n\n" for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    if len(turns) == 1:
        return system + alpaca_prompt(turns[0]["content"]) if system else alpaca_prompt(turns[0]["content"])
    text = system or ALPACA_NO_INPUT.split("### Instruction")[0]
    for m in turns:
        head = "### Instruction:\n" if m["role"] == "user" else "### Response:\n"
        text += head + m["content"] + "\n\n"
    return text + "### Response:\n"


def render_prompt(prompt: Any, tokenizer=None) -> str:
    """Canonical prompt -> the text the model sees (chat messages go through the tokenizer's chat template)."""
    if isinstance(prompt, str):
        return prompt
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("a chat-format prompt needs a tokenizer with a chat template (or use template: alpaca)")
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def system_message(messages: list[dict], how: str) -> list[dict]:
    """A chat prompt's system messages as `DatasetSpec.system_message` says: `keep` them as they are, `merge` them
    into the head of the first user turn (their text, then a blank line), or `drop` them. `merge` is for a chat
    template with no system role (Gemma-2's and Mistral-v0.1's raise on one): the instruction reaches the model in
    the only place such a template can put it, the first user turn, as Gemma's documentation advises."""
    if how == "keep" or not any(m["role"] == "system" for m in messages):
        return messages
    turns = [m for m in messages if m["role"] != "system"]
    if how == "drop":
        return turns
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    first = next((i for i, m in enumerate(turns) if m["role"] == "user"), None)
    if first is None:
        return [{"role": "user", "content": system}, *turns]
    return [*turns[:first], {**turns[first], "content": f"{system}\n\n{turns[first]['content']}"}, *turns[first + 1:]]


class ChatCheck:
    """Whether a tokenizer's chat template renders a conversation, asked once per sequence of roles.

    Templates refuse conversations by their shape, not their text: Gemma-2's raises on a system role, Mistral's
    when user and assistant turns do not alternate. The loaders ask this of every chat row when a stage hands them
    its tokenizer, so a row the template refuses is a DataError naming the file, row and field (or skipped with
    `skip_bad_rows`) instead of a crash deep inside a stage; caching by roles keeps a 60,000-row file at a few
    renders."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, {}

    def problem(self, messages: list[dict], generation_prompt: bool) -> str | None:
        """The template's own message when it refuses `messages`, else None."""
        from jinja2.exceptions import TemplateError

        key = (tuple(m["role"] for m in messages), generation_prompt)
        if key not in self.seen:
            try:
                self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
                self.seen[key] = None
            except TemplateError as e:
                self.seen[key] = str(e.message or e)
        return self.seen[key]


def special_tokens_for(text: str, tokenizer) -> bool:
    """Whether `text` is tokenized with the tokenizer's special tokens (its BOS): not when it already starts with
    the BOS token.

    Chat templates that write `{{ bos_token }}` (Llama-3, Gemma-2) render text that starts with it, and the same
    tokenizer adds BOS again when special tokens are on: `<bos><bos>...`, a sequence the model never saw. Text
    without it (Alpaca prompts, ChatML templates) gets the tokenizer's own BOS, as it always did."""
    bos = getattr(tokenizer, "bos_token", None)
    return not (bos and text.startswith(bos))


def encode(text: str, tokenizer, **kw) -> list[int]:
    """Token ids of rendered prompt text (or prompt + response), starting with exactly one BOS when the tokenizer
    uses one. Every stage turns prompt text into ids here, so generation, training, scoring and evaluation read the
    same sequence. `kw` goes to the tokenizer (truncation, max_length).

    With add_special_tokens off the tokenizer adds nothing else either; the text then carries its own special
    tokens, which is what a chat template that writes BOS means it to."""
    return tokenizer(text, add_special_tokens=special_tokens_for(text, tokenizer), **kw)["input_ids"]


def encode_many(texts, tokenizer, **kw) -> list[list[int]]:
    """`[encode(t, tokenizer, **kw) for t in texts]`, in as few tokenizer calls as there are BOS cases (usually one),
    each distinct text once. The same ids as `encode` (a batch call runs the same pipeline per text): a stage that
    tokenizes thousands of rows, a reward model scoring a validation split every few steps, spent more time in the
    tokenizer's per-call Python than in its Rust (4.8 s of the quickstart's evaluate stage, one call per text)."""
    texts = list(texts)
    distinct = list(dict.fromkeys(texts))
    ids: dict[str, list[int]] = {}
    for special in (True, False):
        group = [t for t in distinct if special_tokens_for(t, tokenizer) is special]
        if group:
            ids.update(zip(group, tokenizer(group, add_special_tokens=special, **kw)["input_ids"]))
    return [ids[t] for t in texts]


def prompt_messages(row: dict) -> list[dict] | None:
    """The prompt of a row as the user wrote it, as chat turns: what a hub reward model's own chat template renders
    (`score.rm_format: chat`). Taken from the row's data, never parsed back out of the policy's rendered text: the
    canonical prompt when it is already messages (`template: chat`), the messages the generate stage kept in
    `meta`, or Alpaca's instruction and input as one user turn. None when the row carries none of these (a bare
    `prompt` string, which may be rendered text)."""
    prompt, meta = row.get("prompt"), row.get("meta") or {}
    if isinstance(prompt, list):
        return prompt
    if isinstance(meta.get("messages"), list):
        return meta["messages"]
    if isinstance(meta.get("instruction"), str) and meta["instruction"].strip():
        return make_prompt(meta["instruction"], meta.get("input") or "", "chat")
    return None


def prompt_text(prompt: Any) -> str:
    """A readable one-string form of a prompt (for logs, hashes and AlpacaEval rows)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
