"""Rebuild the small real-data slices in tests/data from ../shared/data (see README.md for provenance).

    python tests/data/make_slices.py [SHARED_DATA]

SHARED_DATA: the argument, else $PREFOPT_SHARED_DATA, else ../shared/data beside the repository.
"""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent
REPO = OUT.parents[1]
SRC = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("PREFOPT_SHARED_DATA") or REPO.parent / "shared" / "data")

ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def load(rel):
    return json.loads((SRC / rel).read_text(encoding="utf-8"))


def dump_json(name, rows):
    (OUT / name).write_text(json.dumps(rows, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def dump_jsonl(name, rows):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if name.endswith(".gz"):
        with gzip.GzipFile(OUT / name, "wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
    else:
        (OUT / name).write_text(text, encoding="utf-8")


def main():
    # Verbatim slices.
    dump_json("alpaca_en_demo.json", load("llama-factory/alpaca_en_demo.json")[:8])
    dump_json("alpaca_chinese_part_0.json", load("alpaca-chinese-dataset/data_v3_alpaca_chinese_part_0.json")[:6])
    dpo = load("llama-factory/dpo_en_demo.json")
    dump_json("dpo_en_demo.json", [dpo[i] for i in (0, 1, 4, 10, 11)])  # single-turn, system, multi-turn
    dpo_zh = load("llama-factory/dpo_zh_demo.json")
    dump_json("dpo_zh_demo.json", [dpo_zh[i] for i in (1, 2, 6)])  # row 6 has a system turn
    dump_json("kto_en_demo.json", load("llama-factory/kto_en_demo.json")[:4])
    dump_json("alpaca_eval_outputs.json", load("alpaca_eval/example/outputs.json")[:5])
    with open(SRC / "stanford_alpaca/seed_tasks.jsonl", encoding="utf-8") as f:
        dump_jsonl("seed_tasks.jsonl", [json.loads(next(f)) for _ in range(5)])
    with gzip.open(SRC / "hh-rlhf/harmless-base/test.jsonl.gz", "rt", encoding="utf-8") as f:
        hh = [json.loads(line) for line in f]
    # Lines 1-6 are good; line 7 (upstream 87) has an empty final chosen answer; line 8 (upstream 1255) has
    # chosen and rejected transcripts that differ before the last "\n\nAssistant:".
    dump_jsonl("hh_harmless_test.jsonl.gz", [hh[i] for i in (0, 1, 2, 3, 4, 5, 86, 1254)])

    # DERIVED: the same real rows, rewritten into the other supported layouts.
    alpaca = load("llama-factory/alpaca_en_demo.json")[:6]
    dump_jsonl("prompt_completion.jsonl", [
        {"prompt": r["instruction"] + (f"\n\n{r['input']}" if r["input"] else ""), "completion": r["output"]}
        for r in alpaca
    ])
    single = [dpo[i] for i in (0, 10, 11)]
    dump_jsonl("preference_strings.jsonl", [
        {"prompt": r["conversations"][0]["value"], "chosen": r["chosen"]["value"], "rejected": r["rejected"]["value"]}
        for r in single
    ])
    dump_json("alpaca_preference.json", [
        {"instruction": r["conversations"][0]["value"], "input": "", "chosen": r["chosen"]["value"],
         "rejected": r["rejected"]["value"]}
        for r in single
    ])
    conv = [dpo[i] for i in (1, 4)]  # system + human; multi-turn

    def msgs(turns):
        return [{"role": ROLE[t["from"]], "content": t["value"]} for t in turns]

    dump_jsonl("preference_messages.jsonl", [
        {"prompt": msgs(r["conversations"]), "chosen": msgs([r["chosen"]]), "rejected": msgs([r["rejected"]])}
        for r in conv
    ])
    dump_jsonl("preference_implicit_messages.jsonl", [
        {"chosen": msgs(r["conversations"] + [r["chosen"]]), "rejected": msgs(r["conversations"] + [r["rejected"]])}
        for r in conv
    ])


if __name__ == "__main__":
    main()
