from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from prefopt.config import FieldError, check_ranges


@dataclass
class BaseConfig:
    """The `base` stage: a base model and tokenizer, built here or named."""

    model: Optional[str] = None
    """A local folder or hub id of a real model. When set, nothing is built and later stages use it (extended
    first when `extend_vocab` or `new_tokens` is set)."""
    extend_vocab: int = 0
    """With `model`: learn this many new tokens (BPE merges) from `tokenizer_data` and add them to the model's
    tokenizer after its own merges, so text it already handled tokenizes as before (Chinese-LLaMA's vocabulary
    extension); embedding rows for them start at the mean of the old ones. The stage saves the extended model,
    which later stages use: continue pretraining it with an `sft` stage on `text` rows (docs/data.md)."""
    new_tokens: list[str] = field(default_factory=list)
    """With `model`: whole strings added as tokens (domain words), embeddings grown the same way."""
    tokenizer_data: list[str] = field(default_factory=lambda: ["stage:task/sft.jsonl"])
    """Files whose text trains the byte-level BPE tokenizer (and the optional pretraining), or, with `model` and
    `extend_vocab`, the text the new tokens are learned from (a tenth of its documents held out to measure them)."""
    vocab_size: int = 1024
    """Tokenizer vocabulary, special tokens included: an upper bound (BPE stops when no pair is left to merge). Too
    small a vocabulary stops merging midway, so one letter gets its own space token and the next does not, which a
    tiny model learns slowly (reverse task: SFT gold 0.43 at 384, 0.53 at 1024; docs/methods.md)."""
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

    @property
    def extends(self) -> bool:
        """A named model whose vocabulary this stage extends (and saves)."""
        return bool(self.model and (self.extend_vocab or self.new_tokens))

    @property
    def as_named(self) -> bool:
        """A named model used as it is: the stage builds nothing, reads no text, and `stage:base` is that model."""
        return bool(self.model) and not self.extends

    def __post_init__(self):
        check_ranges(self, extend_vocab=dict(ge=0), vocab_size=dict(ge=16), hidden_size=dict(ge=1), num_hidden_layers=dict(ge=1),
                     num_attention_heads=dict(ge=1), num_key_value_heads=dict(ge=1), intermediate_size=dict(ge=1),
                     max_position_embeddings=dict(ge=2), pretrain_steps=dict(ge=0), pretrain_block_size=dict(ge=2),
                     pretrain_batch_size=dict(ge=1), pretrain_learning_rate=dict(gt=0))
        if not self.model and (self.extend_vocab or self.new_tokens):
            key = "extend_vocab" if self.extend_vocab else "new_tokens"
            raise FieldError(key, "extends the tokenizer of a model named in base.model; the tokenizer built here "
                                  "learns its whole vocabulary from tokenizer_data (base.vocab_size)")
        if self.model and self.pretrain_steps:
            raise FieldError("pretrain_steps", "pretrains the model built here; continue pretraining base.model "
                                               "with the sft stage on `text` rows (docs/data.md), which scales")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
