"""Varlen attention (prefopt.models.varlen): the packed row's sequences found from the position ids, each computed
alone; nothing of the switch reaches a saved checkpoint. Its numbers against each family's own forward are in
tests/test_architectures.py."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, set_seed

from prefopt.models import varlen


def _tiny(attn: str = "sdpa") -> LlamaForCausalLM:
    set_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def test_the_plan_is_read_from_each_new_position_tensor():
    """Every layer of a forward reads the same position ids (planned once, kept); the next batch's, of the same
    shape and perhaps at the same address, are planned again, as is a tensor written in place."""
    a = torch.tensor([[0, 1, 2, 0, 1]])
    assert varlen.pieces(a) == [[((), 0, 3), ((), 3, 5)]]  # (prefix, start, end)
    assert varlen._plan(a, 1) is varlen._plan(a, 1)
    b = torch.tensor([[0, 1, 0, 1, 2]])
    assert varlen.pieces(b) == [[((), 0, 2), ((), 2, 5)]]
    [bucket], scatter = varlen._plan(b, 1)  # one bucket (16): pieces right-padded to the longest, 3
    assert bucket.keys.tolist() == [[0, 1, 0], [2, 3, 4]] and bucket.queries is bucket.keys
    assert bucket.offsets is None and scatter.tolist() == [0, 1, 3, 4, 5]
    b[0, 2:] = torch.tensor([2, 3, 4])  # written in place: planned again
    [bucket], _ = varlen._plan(b, 1)
    assert bucket.keys.tolist() == [[0, 1, 2, 3, 4]]


def test_a_branch_computes_only_its_own_queries_against_its_prompts_keys():
    """The shared prompt in one row: prompt 0-2, chosen 3-4, then the rejected answer whose positions drop back to 3.
    Its piece's keys are the prompt's three tokens then its own; its queries only its own, each at key position 3 +
    j, so it sees the prompt and its own earlier tokens and never the chosen answer."""
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    assert varlen.pieces(pos) == [[((), 0, 5), ((0, 1, 2), 5, 8)]]
    (root, branch), scatter = varlen._plan(pos, 1)
    assert root.keys.tolist() == [[0, 1, 2, 3, 4]] and root.offsets is None
    assert branch.keys.tolist() == [[0, 1, 2, 5, 6, 7]] and branch.queries.tolist() == [[5, 6, 7]]
    assert branch.offsets.tolist() == [3]
    assert scatter.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # the root's 5 output slots, then the branch's 3
    mask = varlen._piece_mask(branch, None, False, torch.float32)
    assert mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    window = varlen._piece_mask(branch, 2, False, torch.float32)  # the last 2 positions only
    assert window[0, 0].int().tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_a_branch_continues_the_sequence_before_it_so_a_prefix_can_span_pieces():
    """The prefix tree's rule: a drop to p continues the first p tokens of the sequence before (its prefix, then
    its own tokens). Sequences a b c | a b d e | a b d f laid down as 0 1 2 | 2 3 | 3: the last one's prefix is
    a b (from the first piece) and d (from the second)."""
    pos = torch.tensor([[0, 1, 2, 2, 3, 3]])
    assert varlen.pieces(pos) == [[((), 0, 3), ((0, 1), 3, 5), ((0, 1, 3), 5, 6)]]
    with pytest.raises(ValueError, match="position ids jump to 5 at index 3, past the 3 tokens"):
        varlen.pieces(torch.tensor([[0, 1, 2, 5]]))
    with pytest.raises(ValueError, match="jump to 4 at index 5, past the 3 tokens"):  # the branch before holds 3
        varlen.pieces(torch.tensor([[0, 1, 2, 1, 2, 4]]))


def test_pieces_of_very_different_lengths_go_to_different_buckets():
    pos = torch.tensor([[*range(3), *range(40), *range(5)]])
    (short, long), scatter = varlen._plan(pos, 1)
    assert short.keys.shape == (2, 5) and long.keys.shape == (1, 40)
    # outputs laid end to end: the short bucket's 2 x 5 slots (pieces at 0 and 43), then the long one's 40
    assert scatter.tolist() == [0, 1, 2, *range(10, 50), *range(5, 10)]


def test_a_packed_row_gives_each_sequence_its_own_logits_and_the_saved_config_is_untouched(tmp_path):
    model = _tiny()
    a, b = torch.randint(0, 64, (1, 6)), torch.randint(0, 64, (1, 4))
    with torch.no_grad():
        alone = [model(a).logits, model(b).logits]
        base = varlen.use_varlen(model)
        packed = model(torch.cat([a, b], 1), position_ids=torch.tensor([[*range(6), *range(4)]])).logits
    assert base == "sdpa" and model.config._attn_implementation == varlen.VARLEN
    torch.testing.assert_close(packed[:, :6], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, 6:], alone[1], atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not [k for k in saved if "varlen" in k or "attn_implementation" in k]
    varlen.restore(model, base)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, varlen.BASE_ATTR) for m in model.modules())


def test_an_unpacked_batch_through_a_switched_model_is_the_models_own_forward():
    """Rows of one sequence each (the model makes position ids 0..T-1 itself): one piece per row, the same logits."""
    model = _tiny("eager")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        own = model(ids).logits
        varlen.use_varlen(model)
        switched = model(ids).logits
    torch.testing.assert_close(switched, own, atol=1e-5, rtol=1e-5)
