from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BaseConfig:
    """The `base` stage: a base model and tokenizer, built here or named."""

    model: Optional[str] = None
    """A local folder or hub id of a real model. When set, nothing is built and later stages use it."""
    tokenizer_data: list[str] = field(default_factory=lambda: ["stage:task/sft.jsonl"])
    """Files whose text trains the byte-level BPE tokenizer (and the optional pretraining)."""
    vocab_size: int = 384
    """Tokenizer vocabulary, special tokens included."""
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 256
    pretrain_steps: int = 0
    """Next-token steps on the tokenizer text packed into fixed blocks (0: no pretraining)."""
    pretrain_block_size: int = 128
    """Tokens per packed block (documents joined with EOS)."""
    pretrain_batch_size: int = 16
    pretrain_learning_rate: float = 1e-3
