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
SHARED_DATA = REPO.parent / "shared" / "data"
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
    from prefopt.models import build_tiny_llama, build_tokenizer, save_model
    from prefopt.utils import seed_everything

    seed_everything(0)
    tok = build_tokenizer(TINY_TEXTS, vocab_size=300)
    model = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=256)
    out = tmp_path_factory.mktemp("tiny") / "model"
    save_model(model, tok, out)
    return out


def pytest_collection_modifyitems(config, items):
    if not SHARED_DATA.exists():
        skip = pytest.mark.skip(reason=f"{SHARED_DATA} not present")
        for item in items:
            if "shared_data" in item.keywords:
                item.add_marker(skip)
