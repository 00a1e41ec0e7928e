"""Reference answers: every policy against fixed answers to the same prompts, as AlpacaEval compares models.

AlpacaEval sets a model's answer to each of its 805 instructions beside a reference model's answer to the same
instruction (text-davinci-003 in AlpacaEval 1.0, gpt4_1106_preview in 2.0) and reports how often the model's is
preferred, raw and length-controlled (Dubois et al. 2024). `evaluate.reference` names such answers: AlpacaEval's
`model_outputs.json` (instruction, input, output) or any rows an SFT dataset may hold (prompt / completion,
messages, ...). Each evaluated prompt is matched to the reference row with the same prompt (for Alpaca rows: the
same instruction and input), and every policy's samples are compared with that one answer:

    win_rate_vs_ref = mean over prompts x of  1/n sum_j ( 1[r(x, y_j) > r(x, y_ref)] + 1/2 1[r(x, y_j) = r(x, y_ref)] )

by the reward model (or `reward_fn`), `win_rate_vs_ref_gold` by the task's gold score, each ± its standard error
over prompts; `win_rate_vs_ref_lc` is the length-controlled rate (`metrics.length_controlled_win_rate`, lengths in
the policies' tokens) and, with a judge, `judge_win_rate_vs_ref(_lc)` the order-swapped judge's. The reference's
own scores and length are in the summary's `reference`. These are figures `figures.figures_of` computes against
any baseline's samples: the reference is one more sample set, of one fixed answer per prompt, that is not sampled
and has no log-probs (no KL).
"""

from __future__ import annotations

import json

from prefopt.data.errors import DataError
from prefopt.data.loaders import load_sft
from prefopt.evaluate.figures import figures_of
from prefopt.evaluate.samples import alpaca_judge_instruction
from prefopt.generation.base import Completion

NAME = "_ref"  # the reference's sample set (not a policy: never sampled, no log-probs, not a table row)

# figures_of's names for "against the baseline" -> the names against the reference
RENAME = {"win_rate_vs_sft": "win_rate_vs_ref", "win_rate_vs_sft_lc": "win_rate_vs_ref_lc",
          "win_rate_vs_sft_gold": "win_rate_vs_ref_gold", "rm_length_coef": "rm_vs_ref_length_coef",
          "identical_pairs": "ref_identical_pairs"}


def _key(prompt) -> str:
    """A prompt as a matching key: its text, or its turns (chat rows) in order."""
    return json.dumps(prompt, sort_keys=True, ensure_ascii=False)


def _shown(row: dict) -> str:
    """A prompt as an error shows it: its instruction (the Alpaca template's preamble says nothing), else its text."""
    return alpaca_judge_instruction(row)[:80]


def answers(spec, template: str, rows: list[dict], prompts_label: str, resolve=None,
            tokenizer=None) -> tuple[list[str], str]:
    """(the reference answer to each of `rows`, the evaluated prompts; where they were read), read from `spec` as
    SFT rows are read.

    A prompt the reference does not answer, or one it answers twice with different texts, is a DataError naming
    the file and `evaluate.reference`: a figure on the prompts that happen to match is not the figure asked for."""
    loaded = load_sft(spec, template, resolve=resolve, tokenizer=tokenizer)
    found: dict[str, tuple[int, str]] = {}
    for i, r in enumerate(loaded.rows, start=1):
        key = _key(r["prompt"])
        if key in found and found[key][1] != r["completion"]:
            raise DataError(loaded.path, None, "evaluate.reference",
                            f"answers one prompt twice, differently (usable rows {found[key][0]} and {i}: "
                            f"{_shown(r)!r}); keep one answer per prompt")
        found.setdefault(key, (i, r["completion"]))
    missing = [r for r in rows if _key(r["prompt"]) not in found]
    if missing:
        first = missing[0]
        raise DataError(loaded.path, None, "evaluate.reference",
                        f"has no answer to {len(missing)} of the {len(rows)} prompts of {prompts_label}, the first: "
                        f"{_shown(first)!r} (prompt_id {first['prompt_id']}); prompts are "
                        "matched by their instruction and input (or their turns): give an answer to every prompt, "
                        "or evaluate on the prompts the reference answers")
    return [found[_key(r["prompt"])][1] for r in rows], loaded.path


def sample_set(texts: list[str], like: dict, tokenizer) -> dict:
    """The reference as a sample set of one finished completion per prompt, on the prompts `like` (a policy's
    sample set) rendered, its tokens counted by `tokenizer` (the policies' own: lengths are compared in them)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return {**like, "completions": [[Completion(text=t, token_ids=list(i), finished=True)] for t, i in zip(texts, ids)]}


def figures(s: dict, gold, rm, ref_s: dict, ref_gold, ref_rm) -> dict:
    """A policy's figures against the reference (`RENAME` of `figures_of` with the reference as its baseline)."""
    f = figures_of("", s, gold, rm, None, None, ref_gold, ref_rm, ref_s)
    return {new + suffix: f[old + suffix] for old, new in RENAME.items() for suffix in ("", "_se", "_why")
            if old + suffix in f}


def own_figures(ref_s: dict, gold, rm, path: str) -> dict:
    """The reference's own scores and length, for the summary (`reference`) and the line under the table."""
    f = figures_of("", ref_s, gold, rm, None, None, None, None)
    keep = ("gold_score", "gold_score_se", "rm_score", "rm_score_se", "length")
    return {"path": path, "prompts": len(ref_s["completions"]), **{k: f[k] for k in keep if k in f}}


def judge_keys(f: dict) -> dict:
    """`judge_figures`' names against the baseline -> against the reference (judge_win_rate -> judge_win_rate_vs_ref,
    judge_order_disagreement -> judge_vs_ref_order_disagreement, ...)."""
    out = {}
    for k, v in f.items():
        out[k.replace("judge_win_rate", "judge_win_rate_vs_ref") if k.startswith("judge_win_rate")
            else k.replace("judge_", "judge_vs_ref_", 1)] = v
    return out
