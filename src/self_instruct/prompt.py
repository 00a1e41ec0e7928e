"""The self-instruct prompt in Alpaca's layout, and the parser that reads new tasks back out of a completion.

A prompt is a short brief followed by k example tasks, numbered, separated by `###`, and the start of task k+1;
the model continues the list:

    ...List of 20 tasks:
    ###
    1. Instruction: Give three tips for staying healthy.
    1. Input:
    <noinput>
    1. Output:
    Eat well, sleep enough and move every day.
    ###
    2. Instruction: ...
    ###
    4. Instruction:

This is the layout of Stanford Alpaca's prompt.txt / encode_prompt (the brief is in our own words). The
completion is split at `###`; piece j must read `N. Instruction: ... N. Input: ... N. Output: ...` with N = k+1+j,
in that order, or it is unparseable. A piece the model was cut off in (the last one, when it stopped at
max_new_tokens rather than at EOS) is dropped, and so are tasks numbered past the list (Alpaca stops the model
there with stop sequences; the generation interface has none, so they are cut here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NO_INPUT = "<noinput>"

BRIEF = """\
Write a list of {n} varied tasks for an AI assistant that works with text only. Each task has an instruction, \
an input (which may be empty) and the output the assistant should give.

Requirements:
1. Vary the verbs and the wording: mix questions with commands.
2. Vary the kind of task: open-ended writing, classification, rewriting, reasoning, question answering and more.
3. Every task must be doable by a text-only model: no pictures, sound or other media, and no actions in the \
world such as setting a reminder.
4. Write in English.
5. Keep each instruction to one or two sentences.
6. Where a task needs an input, give a concrete, realistic one (no placeholders), ideally under 100 words. Where \
it needs none, write {no_input}.
7. Give an output that answers the instruction and input well, in under 100 words.

List of {n} tasks:
"""


def encode_prompt(tasks: list[dict], list_length: int = 20) -> str:
    """The prompt for one request: the brief, `tasks` ({instruction, input, output}) numbered 1..k, then `k+1.
    Instruction:` for the model to continue. Whitespace runs in an instruction become one space and a trailing
    colon is dropped (as Alpaca does), so examples read as one line."""
    prompt = BRIEF.format(n=list_length, no_input=NO_INPUT) + "\n"
    for i, task in enumerate(tasks, start=1):
        instruction = re.sub(r"\s+", " ", task["instruction"]).strip().rstrip(":")
        inp = task.get("input", "") or NO_INPUT
        prompt += f"###\n{i}. Instruction: {instruction}\n{i}. Input:\n{inp}\n{i}. Output:\n{task['output']}\n"
    return prompt + f"###\n{len(tasks) + 1}. Instruction:"


@dataclass
class Parsed:
    """One piece of a completion: a task, or the reason there is none (`unparseable`, `truncated`)."""

    number: int
    text: str
    task: dict | None = None
    reason: str | None = None


def parse_completion(text: str, num_examples: int, list_length: int = 20, finished: bool = True) -> list[Parsed]:
    """The pieces of a completion that continues a prompt with `num_examples` examples, in order.

    Every piece numbered within the list comes back, as a task or with the reason it is none; pieces numbered
    past `list_length` are not returned (the list is over)."""
    raw = f"{num_examples + 1}. Instruction:" + text
    pieces = raw.split("###")
    out = []
    for j, piece in enumerate(pieces):
        number = num_examples + 1 + j
        if number > list_length:
            break
        if j == len(pieces) - 1 and not finished:
            out.append(Parsed(number, piece, reason="truncated"))
            continue
        parts = re.split(rf"{number}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7 or parts[1::2] != ["Instruction", "Input", "Output"] or parts[0].strip():
            out.append(Parsed(number, piece, reason="unparseable"))
            continue
        inp = parts[4].strip()
        task = {"instruction": parts[2].strip(), "input": "" if inp.lower() == NO_INPUT else inp,
                "output": parts[6].strip()}
        out.append(Parsed(number, piece, task=task))
    return out
