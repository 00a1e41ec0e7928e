"""Shared fixtures: a tiny tokenizer + Llama built here (no downloads), offline W&B, one thread per test process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PREFOPT_SHARED_DATA") or REPO.parent / "shared" / "data")  # ../shared/data
TEST_DATA = Path(__file__).parent / "data"

TINY_TEXTS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nSort the numbers in ascending order.\n\n### Input:\n3 1 2\n\n### Response:\n1 2 3",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "Human: hello there Assistant: hi, how can I help you today?",
] * 20


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama (2 layers, hidden 32) and its byte-level BPE tokenizer, randomly initialised."""
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    tok = build_tokenizer(TINY_TEXTS, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, tok, out)
    return out


@pytest.fixture(scope="session")
def other_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A second random init of the tiny model (same tokenizer): a reference whose log-probs differ from the
    policy's."""
    from prefopt.dist.process import seed_everything
    from prefopt.models.loading import build_tiny_llama, load_tokenizer, save_model

    tok = load_tokenizer(str(tiny_model_dir))
    seed_everything(7)
    model = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64)
    return save_model(model, tok, tmp_path_factory.mktemp("other") / "model")


def pytest_collection_modifyitems(config, items):
    if not SHARED_DATA.exists():
        skip = pytest.mark.skip(reason=f"{SHARED_DATA} not present")
        for item in items:
            if "shared_data" in item.keywords:
                item.add_marker(skip)


def tiny_experiment(tmp_path: Path, name: str = "tiny", stages=None, **sections) -> dict:
    """A whole experiment at toy size (every stage in seconds): the plumbing, not the learning, is under test."""
    cfg = {
        "name": name,
        "seed": 1,
        "output_dir": str(tmp_path / "runs"),
        "wandb": {"mode": "offline"},
        "launch": {"launcher": "inline"},
        "task": {"name": "sort", "num_sft": 64, "num_prompts": 12, "num_test_prompts": 6, "num_val_prompts": 6, "num_preferences": 64,
                 "min_len": 3, "max_len": 4},
        "base": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                 "intermediate_size": 64, "vocab_size": 300},
        "sft": {"max_steps": 3, "per_device_train_batch_size": 8, "save_steps": 2, "logging_steps": 1},
        "generate": {"n": 2, "max_new_tokens": 8, "shard_size": 4, "batch_size": 8},
        # 3 steps on a handful of test pairs: the gate (tests/test_trust.py) would stop the plumbing under test
        "reward": {"max_steps": 3, "per_device_train_batch_size": 8, "save_steps": 2, "logging_steps": 1,
                   "min_eval_accuracy": 0},
        "pairs": {"margin": -1.0},
        "dpo": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 2, "logging_steps": 1},
        "simpo": {"max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 2, "logging_steps": 1},
        "ppo": {"total_episodes": 8, "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
                "max_new_tokens": 8, "save_every": 1},
        "evaluate": {"samples_per_prompt": 1, "max_new_tokens": 8, "batch_size": 8},
    }
    if stages is not None:
        cfg["stages"] = list(stages)
    for key, value in sections.items():
        cfg.setdefault(key, {})
        if isinstance(value, dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def pytest_report_header(config):
    """Which library versions this run tests (`make test-compat` overlays the GPU set's transformers)."""
    import torch
    import transformers
    import trl

    return f"prefopt stack: torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
