"""Varlen attention (prefopt.models.varlen): the packed row's sequences found from the position ids, each computed
alone; nothing of the switch reaches a saved checkpoint. Its numbers against each family's own forward are in
tests/test_architectures.py."""

from __future__ import annotations

import json

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
    assert varlen._pieces(a) == [[(0, 0, 0, 3), (3, 0, 3, 5)]]  # (prefix start, length, start, end)
    assert varlen._plan(a, 1) is varlen._plan(a, 1)
    b = torch.tensor([[0, 1, 0, 1, 2]])
    assert varlen._pieces(b) == [[(0, 0, 0, 2), (2, 0, 2, 5)]]
    (gather, L), (scatter, _) = varlen._plan(b, 1)  # one bucket (16): pieces right-padded to the longest, 3
    assert L == 3 and gather.tolist() == [[0, 1, 0], [2, 3, 4]] and scatter.tolist() == [0, 1, 3, 4, 5]
    b[0, 2:] = torch.tensor([2, 3, 4])  # written in place: planned again
    (gather, _), _ = varlen._plan(b, 1)
    assert gather.tolist() == [[0, 1, 2, 3, 4]]


def test_a_branch_gathers_its_prompt_and_keeps_only_its_own_outputs():
    """The shared prompt in one row: prompt 0-2, chosen 3-4, then the rejected answer whose positions drop back to 3.
    Its piece is the prompt's three tokens then its own; the scatter takes the prompt's outputs from the first piece
    and only the rejected tokens' from the second."""
    pos = torch.tensor([[0, 1, 2, 3, 4, 3, 4, 5]])
    assert varlen._pieces(pos) == [[(0, 0, 0, 5), (0, 3, 5, 8)]]
    (gather, L), (scatter, _) = varlen._plan(pos, 1)
    assert L == 6 and gather.tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 5, 6, 7]]
    assert scatter.tolist() == [0, 1, 2, 3, 4, 9, 10, 11]  # second piece's slots 6-11: its own outputs at 9-11


def test_pieces_of_very_different_lengths_go_to_different_buckets():
    pos = torch.tensor([[*range(3), *range(40), *range(5)]])
    (short, ls), (long, ll), (scatter, _) = varlen._plan(pos, 1)
    assert (ls, ll) == (5, 40) and short.shape == (2, 5) and long.shape == (1, 40)
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
