"""A causal LM whose next-token distribution is set by hand, whatever the context: evaluation figures against
closed-form values (KL between two known categorical distributions, collision probability, win rates).

A one-layer Llama whose attention and MLP write nothing (o_proj = down_proj = 0) and whose every input embedding is
the all-ones vector: the final hidden state is the same at every position, and the untied lm_head row of token v sums
to the logit chosen for v. Tokens outside the chosen few get logit -1e4, so no other token (EOS included) is ever
sampled and every response is exactly max_new_tokens long.
"""

from __future__ import annotations

import math
from pathlib import Path

LETTERS = ("a", "b", "c")  # the tokens the model samples, one byte-level token each in the tiny tokenizer


def letter_ids(tok) -> list[int]:
    ids = [tok.convert_tokens_to_ids(ch) for ch in LETTERS]
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids, ids
    return ids


def save_unigram_lm(tokenizer_dir: str | Path, out: Path, probs: tuple[float, ...]) -> Path:
    """Save a model sampling LETTERS with probabilities `probs` (at temperature 1) at every position."""
    import torch
    from prefopt.models.loading import load_tokenizer, save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=16, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False, rms_norm_eps=1e-12)
    model = LlamaForCausalLM(config)
    logits = torch.full((len(tok),), -1e4)
    for i, p in zip(letter_ids(tok), probs):
        logits[i] = math.log(p)
    with torch.no_grad():
        model.model.embed_tokens.weight.fill_(1.0)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.copy_((logits / config.hidden_size)[:, None].expand(-1, config.hidden_size))
    save_model(model, tok, out)
    return out


def letter_distribution(model_dir: str | Path, temperature: float = 1.0) -> list[float]:
    """The saved model's own next-token probabilities of LETTERS at `temperature`, read from one forward pass (the
    closed-form figures use these, not the intended ones)."""
    import torch
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(model_dir))
    model = load_causal_lm(str(model_dir), dtype="float32").eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([tok("Sort 3 1 2")["input_ids"]])).logits[0, -1].double()
    p = torch.softmax(logits / temperature, -1)
    ids = letter_ids(tok)
    assert abs(float(p[ids].sum()) - 1) < 1e-9  # nothing else is ever sampled
    return [float(p[i]) for i in ids]


def count_a(example: dict, response: str) -> float:
    """A reward function (`evaluate.reward_fn: unigram_lm:count_a`): how many times the first letter appears."""
    return float(response.count(LETTERS[0]))
