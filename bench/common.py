"""What every whole-process bench shares: run one system in a fresh process with a fixed thread count and read the
`BENCH_RESULT {json}` line it prints, wall time added; and issue 24's job (word stretches of alpaca_en_demo, a
19M-parameter Llama with a 512-token vocabulary), which the SFT and preference benches both build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run_child(script: str, args: list[str], threads: int, label: str) -> dict:
    """`python script --child ...args` with `threads` BLAS/OpenMP threads, offline, W&B off; its result and wall
    seconds. A failure raises with the child's last output, naming `label`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, script, "--child", *args], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"{label} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads(line[len("BENCH_RESULT "):])
    out["wall_seconds"] = wall
    return out


def word_stretches(n: int, spans: list[tuple[int, int]]) -> list[list[str]]:
    """n consecutive stretches of alpaca_en_demo's word stream (its instructions, inputs and outputs in order), each
    cut into parts of lengths drawn uniformly from `spans` (seed 0); the stream starts again where it runs out."""
    import random

    data = json.loads((SHARED / "llama-factory" / "alpaca_en_demo.json").read_text())
    words = " ".join(f"{r['instruction']} {r.get('input', '')} {r['output']}" for r in data).split()
    rng, at, out = random.Random(0), 0, []
    for _ in range(n):
        lengths = [rng.randint(lo, hi) for lo, hi in spans]
        if at + sum(lengths) > len(words):
            at = 0
        parts = []
        for k in lengths:
            parts.append(" ".join(words[at:at + k]))
            at += k
        out.append(parts)
    return out


def build_issue24_model(texts: list[str], out_dir: Path) -> None:
    """Issue 24's model, saved in out_dir: a byte-level BPE of 512 trained on `texts` and an 18.9M-parameter Llama
    (hidden 512, 8 layers, 8 heads, MLP 832), seeded."""
    from prefopt.dist.process import seed_everything
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model

    seed_everything(0)
    tok = build_tokenizer(texts, vocab_size=512)
    model = build_tiny_llama(tok, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                             intermediate_size=832, max_position_embeddings=1024)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, vocabulary {len(tok)}")
    save_model(model, tok, out_dir)
