"""Prompt templates: Alpaca's for base models, the tokenizer's chat template for chat models.

A canonical prompt is either a string already rendered with the Alpaca template, or a list of chat messages
(``[{"role": "user", "content": ...}, ...]``) that the tokenizer's chat template renders at tokenization time.
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


def prompt_text(prompt: Any) -> str:
    """A readable one-string form of a prompt (for logs, hashes and AlpacaEval rows)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt)
