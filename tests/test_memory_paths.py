"""Memory at real sizes (issue 22, item 5), checked on tiny models by where tensors and weights are, not by bytes:

- evaluation's response log-probs go through the preference loop's chunked vocabulary projection: the numbers of a
  plain `log_softmax(model(ids).logits)`, and no tensor of (tokens x vocabulary) larger than one chunk;
- the reward model reads as many tokens as it can take (its own limit) unless the config says fewer, and a config
  asking for more is a config error naming the key;
- PPO loads its trained models on the CPU in float32 and its frozen ones in the run's precision, and hands them to
  accelerate's `prepare` that way (never whole on the GPU first); the rollout engine is built after `prepare`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefopt.evaluate import metrics as M

V = 97  # a vocabulary size no other dimension of these models has


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    def logits_rows(self, hidden: int) -> int:
        """The most vocabulary-sized rows any one tensor held (the lm_head weight's transpose, (hidden, V), is a
        weight, not logits)."""
        rows = [int(torch.Size(s).numel()) // V for s in self.shapes if s and s[-1] == V and s != (hidden, V)]
        return max(rows, default=0)


def llama(vocab: int = V):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()


def gemma2(softcap: float = 0.5):
    """Gemma-2 with a final-logit soft-cap small enough to matter at random init (the real one is 30)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, set_seed

    set_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                          final_logit_softcapping=softcap)).eval()


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
RESPONSES = [[12, 13, 14, 2], [15, 16, 17, 18, 19, 2], [20]]  # 11 response tokens in all
CHUNK = 4  # fewer than the batch's response tokens: the projection runs in 3 chunks


@torch.no_grad()
def plain_logps(model, temperature: float = 1.0) -> list[float]:
    """log p(response | prompt) from the model's own forward, one unpadded sequence at a time: the reference."""
    out = []
    for p, r in zip(PROMPTS, RESPONSES):
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float() / temperature  # (T, V)
        logp = torch.log_softmax(logits, -1)
        out.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(r)))
    return out


def test_the_shape_recorder_sees_the_full_logits_of_a_plain_forward():
    """What the tests below rule out: the old path (`completion_logps`) makes (B, T, V) logits."""
    from prefopt.logps import completion_logps

    model = llama()
    batch = M.response_batch(PROMPTS, RESPONSES)
    comp = torch.zeros_like(batch["input_ids"]).flatten()
    comp[batch["source_index"] + 1] = 1
    with Shapes() as rec, torch.no_grad():
        completion_logps(model, batch["input_ids"], batch["attention_mask"], comp.view_as(batch["input_ids"]))
    B, T = batch["input_ids"].shape
    assert rec.logits_rows(hidden=32) >= B * (T - 1) > CHUNK


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluation_logps_are_exact_and_chunked(temperature):
    """Llama: every response's summed log-prob equals the plain forward's within 1e-5 (fp32), and no tensor ever
    held more than CHUNK tokens' vocabulary rows (the decoder's forward projects none)."""
    model = llama()
    with Shapes() as rec:
        got = M.response_logps(model, PROMPTS, RESPONSES, temperature=temperature, batch_size=3, chunk_size=CHUNK)
    assert got == pytest.approx(plain_logps(model, temperature), abs=1e-5)
    assert 0 < rec.logits_rows(hidden=32) <= CHUNK


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluation_logps_of_a_soft_capped_model(temperature):
    """Gemma-2 caps its logits after the lm_head: at T = 1 the chunked projection applies the cap; at T != 1 each row
    goes through the model's own forward with only its response positions projected, so the largest vocabulary
    tensor is one response's (6 tokens here), never the batch's (3 x 9)."""
    model = gemma2()
    want = plain_logps(model, temperature)
    assert max(abs(a - b) for a, b in zip(want, plain_logps(gemma2(softcap=None), temperature))) > 1e-2  # it bites
    with Shapes() as rec:
        got = M.response_logps(model, PROMPTS, RESPONSES, temperature=temperature, batch_size=3, chunk_size=CHUNK)
    assert got == pytest.approx(want, abs=1e-5)
    assert 0 < rec.logits_rows(hidden=32) <= max(CHUNK, max(len(r) for r in RESPONSES))


def test_response_batch_layout():
    """The padded layout pair_logps reads: right padding, and the flat index r*T + t of the position predicting
    each response token."""
    b = M.response_batch([[1, 5], [1]], [[7, 8], [9]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 7, 8], [1, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["source_index"].tolist() == [1, 2, 4]  # row 0 positions 1, 2; row 1 position 0 (4 * 1 + 0)
    assert b["target_ids"].tolist() == [7, 8, 9]
    assert b["seq_index"].tolist() == [0, 0, 1] and int(b["num_sequences"]) == 2
