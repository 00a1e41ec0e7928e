"""Helpers for the DPO / SimPO tests: a hand-made pairs file, an experiment YAML, running a stage as a user does."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


def write_pairs(path: Path, n: int = 16, seed: int = 0) -> Path:
    """Sorting prompts: chosen = the sorted digits, rejected = them reversed (short prompts, no input field)."""
    from prefopt.data.templates import alpaca_prompt

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            xs = [rng.randint(0, 9) for _ in range(4)]
            prompt = alpaca_prompt("Sort " + " ".join(map(str, xs)))
            f.write(json.dumps({"prompt": prompt, "chosen": " ".join(map(str, sorted(xs))),
                                "rejected": " ".join(map(str, sorted(xs, reverse=True)))}) + "\n")
    return path


def write_config(tmp_path: Path, stage: str, section: dict, name: str = "t") -> Path:
    cfg = {"name": name, "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"}, "stages": [stage],
           stage: section}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_prefopt(*args: str, launcher: list[str] | None = None, timeout: int = 300,
                env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    cmd = (launcher or [PY, "-m"]) + ["prefopt", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def pair_logps(model_dir, pairs_file) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed log-probs (chosen, rejected) and completion lengths (chosen, rejected) of every pair in the file."""
    from prefopt.training.logps import sequence_logps
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference.data import collate_pairs, load_pairs, tokenize_pairs

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), "float32").eval()
    batch = collate_pairs(tokenize_pairs(load_pairs(str(pairs_file), "alpaca", tok), tok, 512), tok.pad_token_id, 512)
    with torch.no_grad():
        sums, lengths = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    b = sums.shape[0] // 2
    return sums[:b], sums[b:], lengths[:b], lengths[b:]


def state_dict(model_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
