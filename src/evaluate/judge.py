"""Pairwise judging by a local causal LM, with both answer orders.

A judge LM sees the instruction and two responses labelled A and B and is asked which is better; its verdict is
P(A) = softmax([logit(A), logit(B)])[0] from the next-token logits. LM judges prefer a position (often the first),
so one order alone is biased: each pair is judged as (x, y) and as (y, x) and the two verdicts for x are averaged,

    p(x better) = ( P(A | A=x, B=y) + P(B | A=y, B=x) ) / 2,

and the fraction of pairs whose two orders pick different winners (order inconsistency) is reported beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from prefopt.data.templates import encode_many
from prefopt.training.padding import right_pad

JUDGE_TEMPLATE = (
    "Below is an instruction and two responses to it. Decide which response follows the instruction better.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Response A:\n{a}\n\n"
    "### Response B:\n{b}\n\n"
    "Which response is better? Answer A or B.\nAnswer:"
)

# (instruction, response labelled A, response labelled B) -> P(the judge says A), one per triple
ProbA = Callable[[Sequence[tuple[str, str, str]]], Sequence[float]]


def combine_orders(p_a_forward: Sequence[float], p_a_swapped: Sequence[float]) -> dict:
    """Combine the verdicts of the two orders for pairs (x_i, y_i).

    p_a_forward[i] = P(A | A=x_i, B=y_i), p_a_swapped[i] = P(A | A=y_i, B=x_i). Returns
      p_first_better[i] = (p_a_forward[i] + (1 - p_a_swapped[i])) / 2      (x_i judged better)
      win_rate          = mean_i p_first_better[i]
      disagreement      = mean_i 1[ (p_a_forward[i] > 1/2) != (1 - p_a_swapped[i] > 1/2) ]
    A judge that always says A gets p_first_better = 1/2 for every pair and disagreement 1."""
    if len(p_a_forward) != len(p_a_swapped):
        raise ValueError("the two orders judged different numbers of pairs")
    if not p_a_forward:
        raise ValueError("no pairs")
    fwd = [float(p) for p in p_a_forward]
    swp = [1.0 - float(p) for p in p_a_swapped]  # P(B | A=y, B=x): x wins in the swapped order
    p_first = [(f + s) / 2 for f, s in zip(fwd, swp)]
    disagree = [float((f > 0.5) != (s > 0.5)) for f, s in zip(fwd, swp)]
    return {
        "p_first_better": p_first,
        "win_rate": sum(p_first) / len(p_first),
        "disagreement": sum(disagree) / len(disagree),
    }


def judge_pairs(prob_a: ProbA, instructions: Sequence[str], firsts: Sequence[str], seconds: Sequence[str]) -> dict:
    """Judge each (instruction, first, second) in both orders with `prob_a` and combine (see `combine_orders`).

    `win_rate` is then how often `firsts` beat `seconds`."""
    forward = prob_a(list(zip(instructions, firsts, seconds)))
    swapped = prob_a(list(zip(instructions, seconds, firsts)))
    return combine_orders(forward, swapped)


class LMJudge:
    """A causal LM as a judge: `prob_a(triples)` gives P(A) from the next-token logits after the judging prompt.

    With `chat=True` the judging prompt is the user turn of the tokenizer's chat template (instruct judges) and
    the answer letter is the assistant's first token; otherwise the prompt ends with "Answer:" and the letters
    are " A" / " B" when the tokenizer has them as single tokens."""

    def __init__(self, model, tokenizer, chat: bool = False, batch_size: int = 8, template: str = JUDGE_TEMPLATE):
        self.model, self.tok = model.eval(), tokenizer
        self.chat, self.batch_size, self.template = chat, batch_size, template
        self.suffix, self.ids = self._letter_ids()

    def _letter_ids(self) -> tuple[str, tuple[int, int]]:
        """(text appended to the prompt, (id of A, id of B)): the first letter form that is one token each."""
        forms = [("", "A", "B"), (" ", "A", "B")] if self.chat else [("", " A", " B"), (" ", "A", "B")]
        for suffix, a, b in forms:
            ia = self.tok(a, add_special_tokens=False)["input_ids"]
            ib = self.tok(b, add_special_tokens=False)["input_ids"]
            if len(ia) == 1 and len(ib) == 1 and ia != ib:
                return suffix, (ia[0], ib[0])
        # Multi-token letters: the last token of each still tells them apart after the shared prefix is given.
        ia = self.tok(forms[0][1], add_special_tokens=False)["input_ids"]
        ib = self.tok(forms[0][2], add_special_tokens=False)["input_ids"]
        if ia[:-1] != ib[:-1] or ia[-1] == ib[-1]:
            raise ValueError("the judge's tokenizer cannot tell 'A' from 'B' with one next token")
        return forms[0][0] + self.tok.decode(ia[:-1]), (ia[-1], ib[-1])

    def render(self, instruction: str, a: str, b: str) -> str:
        text = self.template.format(instruction=instruction, a=a, b=b)
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                add_generation_prompt=True)
        return text + self.suffix

    @torch.no_grad()
    def prob_a(self, triples: Sequence[tuple[str, str, str]]) -> list[float]:
        out: list[float] = []
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        for s in range(0, len(triples), self.batch_size):
            # One BOS: the chat template's own when it writes one, else the tokenizer's (`encode`).
            ids = encode_many([self.render(*t) for t in triples[s:s + self.batch_size]], self.tok)
            batch, attn = right_pad(ids, pad)  # right padding: positions need no shifting
            logits = self.model(input_ids=batch.to(device), attention_mask=attn.to(device)).logits  # (B, T, V)
            last = logits[torch.arange(len(ids)), attn.sum(1).to(device) - 1]  # (B, V) at each last real token
            pair = last[:, list(self.ids)].float()  # (B, 2): logit(A), logit(B)
            out += torch.softmax(pair, -1)[:, 0].cpu().tolist()
        return out
