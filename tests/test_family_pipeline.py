"""The whole pipeline (`prefopt run`: task, SFT, reward model, generate, score, pairs, DPO, SimPO, PPO, evaluate) on
tiny instances of two families that differ from the quickstart's Llama where a pipeline can go wrong: Gemma-2
(eager attention with soft-capping, sliding layers, tied embeddings, a chat template that writes BOS itself) and
Qwen2.5 (ChatML, no BOS), every stage on the tokenizer's chat template. The numbers are checked against the
model's own forward: the DPO stage's cached reference log-probs of every pair (computed in the shared-prompt
layout with varlen attention) equal the SFT checkpoint's plain transformers forward on the chat-rendered text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo", "simpo", "ppo", "evaluate"]
CHAT = ("sft", "generate", "reward", "score", "dpo", "simpo", "ppo", "evaluate")


def own_forward_logp(model, tok, prompt: str, response: str) -> float:
    """log p(response + EOS | prompt) from the model's own forward on the text as its tokenizer reads it."""
    full = tok(prompt + response + tok.eos_token, add_special_tokens=False)["input_ids"]
    head = tok(prompt, add_special_tokens=False)["input_ids"]
    n = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), len(head))
    with torch.no_grad():
        lp = model(torch.tensor([full])).logits[0].float().log_softmax(-1)
    return float(sum(lp[t - 1, full[t]] for t in range(n, len(full))))


@pytest.mark.parametrize("family", ["gemma2", "qwen2.5"])
def test_pipeline_on_the_chat_template_of(family, tmp_path):
    from families import FAMILIES, save_family
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = FAMILIES[family]
    base = save_family(fam, tmp_path / family, attn="sdpa" if "sdpa" in fam.attn else "eager", hidden_size=64)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_MODE": "disabled"}
    args = [f"--output_dir={tmp_path}", "--name=fam", f"--base.model={base}", "--launch.launcher=inline",
            *[f"--{s}.template=chat" for s in CHAT],
            "--task.num_sft=200", "--task.num_prompts=32", "--task.num_val_prompts=12", "--task.num_test_prompts=12",
            "--task.num_preferences=200", "--sft.max_steps=12", "--reward.num_train_epochs=1",
            "--reward.min_eval_accuracy=0", "--ppo.total_episodes=64", "--evaluate.checkpoints=false",
            "--evaluate.best_of_n=[]"]
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", "experiments/quickstart.yaml", *args], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    root = tmp_path / "fam"
    assert all((root / s / "_DONE.json").exists() for s in STAGES)

    tok = AutoTokenizer.from_pretrained(str(root / "sft" / "model"))
    # generation prompted the SFT policy with the chat template it was trained on, the generation prompt included
    task = {r["prompt_id"]: r for r in map(json.loads, open(root / "task" / "prompts.jsonl"))}
    shard = [json.loads(line) for line in open(root / "generate" / "shard-00000.jsonl")]
    for row in shard[:4]:
        t = task[row["prompt_id"]]
        turn = {"role": "user", "content": f"{t['instruction']}\n\n{t['input']}"}
        assert row["prompt"] == tok.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    ids = tok(shard[0]["prompt"], add_special_tokens=False)["input_ids"]
    if fam.bos:  # Gemma's template writes BOS in the text: one BOS, not a second one from the tokenizer
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    else:
        assert tok.bos_token_id is None

    # the aligners' reference log-probs are the SFT checkpoint's own forward on those chat-rendered pairs
    # the family's own attention: Gemma-2's soft-capping lives in eager attention, which transformers 5.17 does
    # not pick by default (its SDPA drops the cap)
    attn = "sdpa" if "sdpa" in fam.attn else "eager"
    model = AutoModelForCausalLM.from_pretrained(str(root / "sft" / "model"), dtype=torch.float32,
                                                 attn_implementation=attn).eval()
    cache = torch.load(json.loads((root / "dpo" / "reference.json").read_text())["file"])["logps"]
    pairs = [json.loads(line) for line in open(root / "pairs" / "pairs.jsonl")]
    assert len(pairs) == cache.shape[0] > 0
    for i, p in enumerate(pairs[:8]):
        for j, key in enumerate(("chosen", "rejected")):
            want = own_forward_logp(model, tok, p["prompt"], p[key])
            assert cache[i, j].item() == pytest.approx(want, rel=1e-5, abs=1e-3), (i, key)

    figs = json.loads((root / "evaluate" / "summary.json").read_text())["policies"]
    assert set(figs) == {"sft", "dpo", "simpo", "ppo"}
    assert all(math.isfinite(figs[p]["rm_score"]) and math.isfinite(figs[p]["kl_to_sft"]) for p in figs)
