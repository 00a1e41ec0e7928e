"""Fewer tokens, same numbers: every batch layout and chunked log-probs give the plain padded path's loss and
gradients (to 1e-5) on pairs of very different lengths; and the reference cache is reused, recomputed or refused,
under a key that holds everything that changes the reference log-probs (precision, revision, layout, attention)."""

from __future__ import annotations

import pytest
import torch

from prefopt.dpo.loss import dpo_loss
from prefopt.training.logps import sequence_logps
from prefopt.preference.batching import collate
from prefopt.training.forward import pair_logps
from prefopt.preference.data import collate_pairs, tokenize_pairs


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir), "float32")
    rows = [{"prompt": "Sort the numbers " + "3 1 2 " * (4 * k), "chosen": " 1 2 3" * (3 * k + 1),
             "rejected": " no" * (9 - 2 * k)} for k in range(4)]  # prompts 3..50 tokens, completions 2..40
    return tok, model, tokenize_pairs(rows, tok, 200)


def _loss_and_grads(model, logps_fn):
    model.zero_grad()
    sums, lengths = logps_fn()
    b = sums.shape[0] // 2
    # a reference offset so the loss is not at its symmetric point; sft_weight exercises the lengths too
    loss, _ = dpo_loss(sums[:b], sums[b:], sums[:b].detach() - 1.0, sums[b:].detach() + 0.5, beta=0.1,
                       chosen_lengths=lengths[:b], rejected_lengths=lengths[b:], sft_weight=0.3)
    loss.backward()
    return loss.detach(), sums.detach(), lengths, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("layout,chunk", [("padded", 0), ("packed", 0), ("shared_prompt", 0), ("prefix_tree", 0),
                                          ("padded", 16), ("shared_prompt", 16), ("packed+varlen", 0),
                                          ("shared_prompt+varlen", 16), ("prefix_tree+varlen", 16)])
def test_layout_matches_plain_padded_path(setup, layout, chunk):
    """+varlen: the model switched to varlen attention and the batch collated without masks, as the loop runs it."""
    from prefopt.models import varlen

    tok, model, examples = setup
    plain = collate_pairs(examples, tok.pad_token_id, 200)
    ref = _loss_and_grads(model, lambda: sequence_logps(model, **plain))
    layout, switched = layout.removesuffix("+varlen"), layout.endswith("+varlen")
    base = varlen.use_varlen(model) if switched else None
    try:
        batch = collate(examples, tok.pad_token_id, 200, layout, masks=not switched)
        got = _loss_and_grads(model, lambda: pair_logps(model, batch, chunk))
    finally:
        if switched:
            varlen.restore(model, base)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[2], ref[2])
    for name, g in ref[3].items():
        torch.testing.assert_close(got[3][name], g, atol=1e-5, rtol=1e-4)
    if layout == "shared_prompt":  # the prompt once per pair: fewer token positions than padding
        assert batch["input_ids"].numel() < plain["input_ids"].numel()
        assert (batch["input_ids"] != tok.pad_token_id).sum() < plain["attention_mask"].sum()
    if layout == "prefix_tree":  # also "Sort the numbers 3 1 2 ..." once across the pairs
        shared = collate(examples, tok.pad_token_id, 200, "shared_prompt", masks=False)
        assert int(batch["num_tokens"]) < int(shared["num_tokens"]) and "attention_mask" not in batch
    if switched:  # one row, no padding, no mask
        assert batch["input_ids"].shape[0] == 1 and batch["input_ids"].numel() == int(batch["num_tokens"])
        assert "attention_mask" not in batch


@pytest.mark.parametrize("layout", ["padded", "packed", "shared_prompt", "prefix_tree"])
def test_the_sharded_models_path_matches(setup, layout):
    """Under FSDP the vocabulary projection runs inside the model's forward (`logits_to_keep` positions), not on
    hooked hidden states: same log-probs, lengths and gradients as the plain padded path, in every layout."""
    from prefopt.training.forward import _pair_logps_inside_forward

    tok, model, examples = setup
    plain = collate_pairs(examples, tok.pad_token_id, 200)
    ref = _loss_and_grads(model, lambda: sequence_logps(model, **plain))
    batch = collate(examples, tok.pad_token_id, 200, layout)
    got = _loss_and_grads(model, lambda: _pair_logps_inside_forward(model, batch))
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(got[2], ref[2])
    for name, g in ref[3].items():
        torch.testing.assert_close(got[3][name], g, atol=1e-5, rtol=1e-4)


def test_shared_prompt_mask_and_positions(setup):
    """One short pair by hand: prompt P tokens, chosen C, rejected R in one segment. Rejected tokens see the prompt
    and themselves, never the chosen; both completions' positions start at P."""
    tok, _, _ = setup
    ex = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]}
    b = collate([ex], tok.pad_token_id, 0, "shared_prompt")
    assert b["input_ids"][0].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    assert b["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    m = b["attention_mask"][0, 0]
    assert m[5].tolist() == [True, True, True, False, False, True, False, False]  # first rejected token
    assert m[4].tolist() == [True] * 5 + [False] * 3  # last chosen token
    # chosen 4 is predicted at position 2 (last prompt token), rejected 6 also at position 2
    assert b["source_index"].tolist() == [2, 3, 2, 5, 6] and b["target_ids"].tolist() == [4, 5, 6, 7, 8]
    assert b["seq_index"].tolist() == [0, 0, 1, 1, 1]


def test_shared_prompt_without_masks_says_it_in_the_position_ids(setup):
    """Collated without masks, the shared prompt is one row whose position ids carry the mask: a restart at 0 begins
    a pair, a drop to P > 0 its rejected answer. The mask built from them is collate's, pair by pair, and varlen
    cuts the same pieces (the rejected answer with its prompt's first P tokens)."""
    from prefopt.models.varlen import pieces
    from prefopt.training.forward import allowed_from_positions

    tok, _, examples = setup
    ex = {"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6, 7, 8]}
    one = collate([ex], tok.pad_token_id, 0, "shared_prompt", masks=False)
    assert "attention_mask" not in one and one["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    masked = collate([ex], tok.pad_token_id, 0, "shared_prompt")
    assert torch.equal(allowed_from_positions(one["position_ids"]), masked["attention_mask"])
    assert pieces(one["position_ids"]) == [[((), 0, 5), ((0, 1, 2), 5, 8)]]  # (prefix, start, end)
    row = collate(examples, tok.pad_token_id, 200, "shared_prompt", masks=False)
    blocks = [collate([e], tok.pad_token_id, 200, "shared_prompt")["attention_mask"][0, 0] for e in examples]
    assert torch.equal(allowed_from_positions(row["position_ids"])[0, 0], torch.block_diag(*blocks))


def test_prefix_tree_lays_down_each_shared_prefix_once(setup):
    """SFT examples by hand: a b | c d, a b | c e (the same prompt, answers that share c), a | f, and a b | c d again.
    Sorted, each is laid down from the end of what it shares with the one before: a b c d, then e at position 3,
    then f at position 1; the repeat adds nothing. Every target is read from the one position that computes it,
    and the mask from the position ids lets each token see exactly its own sequence's earlier tokens."""
    from prefopt.training.forward import allowed_from_positions

    tok, _, _ = setup
    a, b, c, d, e, f = 11, 12, 13, 14, 15, 16
    examples = [{"prompt_ids": [a, b], "completion_ids": [c, d]}, {"prompt_ids": [a, b], "completion_ids": [c, e]},
                {"prompt_ids": [a], "completion_ids": [f]}, {"prompt_ids": [a, b], "completion_ids": [c, d]}]
    batch = collate(examples, tok.pad_token_id, 0, "prefix_tree")
    assert batch["input_ids"].tolist() == [[a, b, c, d, e, f]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 3, 1]]
    assert int(batch["num_tokens"]) == 6 and int(batch["num_sequences"]) == 4
    by_seq = {}
    for src, tgt, sq in zip(*(batch[k].tolist() for k in ("source_index", "target_ids", "seq_index"))):
        by_seq.setdefault(sq, []).append((src, tgt))
    assert by_seq == {0: [(1, c), (2, d)], 1: [(1, c), (2, e)], 2: [(0, f)], 3: [(1, c), (2, d)]}
    allowed = allowed_from_positions(batch["position_ids"])[0, 0].int().tolist()
    assert allowed[4] == [1, 1, 1, 0, 1, 0]  # e (a b c e) sees a b c and itself, not d
    assert allowed[5] == [1, 0, 0, 0, 0, 1]  # f (a f) sees a and itself


def test_reference_cache_reused_recomputed_and_refused(tmp_path, tiny_model_dir):
    """A beta sweep reuses the reference log-probs of the first run (same key: weights, pairs, tokenizer, max_length);
    a truncated cache file is recomputed, not used; a file made for another reference is refused, naming both."""
    from pair_helpers import write_config, write_pairs
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    base = {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": 1, "per_device_train_batch_size": 8,
            "logging_steps": 1, "max_length": 256}

    def run(name, **kw):
        cfg = load_config(str(write_config(tmp_path, "dpo", {**base, **kw}, name=name)))
        return cfg, run_stage(cfg, "dpo")

    cfg, first = run("a", beta=0.1)
    cache = first["reference_cache"]
    assert first["reference_reused"] is False and cache.startswith(str(cfg.root / "cache" / "reference"))
    stored = torch.load(cache, weights_only=True)["logps"]
    assert stored.shape == (8, 2) and torch.isfinite(stored).all()
    _, second = run("a", beta=0.3)  # another beta: a new stage fingerprint, the same reference
    assert second["reference_reused"] is True and second["reference_cache"] == cache

    with open(cache, "r+b") as f:  # a partial file, as a kill during a non-atomic write would leave
        f.truncate(100)
    _, third = run("a", beta=0.5)
    assert third["reference_reused"] is False
    torch.testing.assert_close(torch.load(cache, weights_only=True)["logps"], stored)

    other = tmp_path / "other.jsonl"
    other.write_text(pairs.read_text().replace("Sort", "Order"))
    with pytest.raises(ValueError, match=r"reference cache .*other key.*pairs_file"):
        run("b", pairs=str(other), reference_cache=cache)


def _dpo_runner(tmp_path, tiny_model_dir):
    from pair_helpers import write_config, write_pairs
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=8)
    base = {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": 1, "per_device_train_batch_size": 8,
            "logging_steps": 1, "max_length": 256}

    def run(name, **kw):
        cfg = load_config(str(write_config(tmp_path, "dpo", {**base, **kw}, name=name)))
        return run_stage(cfg, "dpo")

    return run


@pytest.mark.parametrize("corrupt", ["wrong_shape", "nan"])
def test_reference_cache_of_wrong_shape_or_nan_is_recomputed(tmp_path, tiny_model_dir, corrupt):
    """A cache file under this run's key whose tensor has the wrong shape (7 pairs of 8), or holds a NaN, is
    recomputed, never used: the rerun says `reference_reused: False`, the file again holds the first run's numbers,
    and step 1 (policy = reference) has the DPO loss log 2 exactly as a clean run does, not NaN or a crash."""
    import math

    run = _dpo_runner(tmp_path, tiny_model_dir)
    first = run("a", beta=0.1)
    cache = first["reference_cache"]
    data = torch.load(cache, weights_only=True)
    good = data["logps"].clone()
    bad = good[:7].clone() if corrupt == "wrong_shape" else good.clone()
    if corrupt == "nan":
        bad[3, 1] = float("nan")
    torch.save({"key": data["key"], "logps": bad}, cache)

    second = run("a", beta=0.2)
    assert second["reference_reused"] is False and second["reference_cache"] == cache
    torch.testing.assert_close(torch.load(cache, weights_only=True)["logps"], good)
    assert second["loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_another_objective_reuses_the_reference(tmp_path, tiny_model_dir):
    """A DPO sigmoid run, then `loss_type: ipo` on the same policy, reference and pairs: the IPO run loads the
    cached reference (`reference_reused: True`, same file, and its `reference.json` says so). Its step 1 uses those
    numbers: policy = reference, so h = 0 and the IPO loss is (0 - 1/(2 tau))^2 = (1/0.2)^2 = 25 at tau = 0.1."""
    import json

    run = _dpo_runner(tmp_path, tiny_model_dir)
    first = run("a", loss_type="sigmoid")
    assert first["reference_reused"] is False
    second = run("a", loss_type="ipo")
    assert second["reference_reused"] is True and second["reference_cache"] == first["reference_cache"]
    assert json.loads((tmp_path / "runs" / "a" / "dpo" / "reference.json").read_text())["reused"] is True
    assert second["loss"] == pytest.approx(25.0, abs=1e-4)


def _key(tiny_model_dir, tmp_path, **kw):
    """A reference cache key for the tiny model and 3 token-id pairs, with the given settings over fp32 defaults."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference import reference as refcache

    pairs = tmp_path / "p.jsonl"
    if not pairs.exists():
        pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    examples = [{"prompt_ids": [1, 5 + i], "chosen_ids": [7, 2], "rejected_ids": [8, 2]} for i in range(3)]
    settings = {"precision": "no", "layout": "shared_prompt", "batch_size": 8, "chunk_size": 512,
                "attention": "sdpa", **kw}
    ref = settings.pop("ref", str(tiny_model_dir))
    return refcache.cache_key(ref, str(pairs), load_tokenizer(str(tiny_model_dir)), "alpaca", 256, examples,
                              **settings)


def test_reference_cache_key_names_precision_layout_and_attention(tmp_path, tiny_model_dir):
    """Every setting that changes the reference's float rounding is in the key, so its file name differs; the same
    settings give the same key and name."""
    from prefopt.preference.reference import key_name

    base = _key(tiny_model_dir, tmp_path)
    assert _key(tiny_model_dir, tmp_path) == base and base["precision"] == "fp32" and base["revision"] is None
    for change, field in [({"precision": "bf16"}, "precision"), ({"layout": "padded"}, "layout"),
                          ({"batch_size": 4}, "batch_size"), ({"chunk_size": 0}, "logps_chunk_size"),
                          ({"attention": "eager"}, "attention")]:
        other = _key(tiny_model_dir, tmp_path, **change)
        assert [k for k in base if base[k] != other[k]] == [field], change
        assert key_name(other) != key_name(base), change


def test_reference_cache_key_pins_a_hub_ids_revision(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id: the commit the local HF cache resolves `main` to (a new commit is a new key), else `main`."""
    import huggingface_hub.constants

    from prefopt.preference.reference import hub_revision

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert hub_revision("org/model") == "main"  # not in the cache: the revision asked for
    refs = hub / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("a" * 40)
    assert hub_revision("org/model") == "a" * 40 and hub_revision("org/model", "b" * 40) == "b" * 40
    first = _key(tiny_model_dir, tmp_path, ref="org/model")
    (refs / "main").write_text("c" * 40)  # the hub id moved to a new commit
    second = _key(tiny_model_dir, tmp_path, ref="org/model")
    assert (first["revision"], second["revision"]) == ("a" * 40, "c" * 40)
    assert first["reference_weights"] == second["reference_weights"]  # the id alone cannot tell them apart
    assert hub_revision(str(tiny_model_dir)) is None  # a local folder: its weights are hashed instead


def test_attention_implementation_read_without_loading(tmp_path, tiny_model_dir):
    """A path's attention implementation is the one load_causal_lm gives it: the tiny Llama's default, and eager for
    a soft-capping Gemma-2 (only its config.json exists here: no weights are read)."""
    from transformers import Gemma2Config

    from prefopt.models.loading import load_causal_lm
    from prefopt.training.forward import attention_implementation as loaded_impl
    from prefopt.preference.reference import attention_implementation

    assert attention_implementation(str(tiny_model_dir)) == loaded_impl(load_causal_lm(str(tiny_model_dir), "float32"))
    gemma = tmp_path / "gemma"
    Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16).save_pretrained(gemma)
    assert attention_implementation(str(tiny_model_dir)) != "eager" and attention_implementation(str(gemma)) == "eager"
    assert attention_implementation(str(tmp_path / "nothing")) is None


def test_reference_cache_from_an_older_key_is_refused_naming_it(tmp_path, tiny_model_dir):
    """A hand-named cache file whose key lacks the newer fields (an older prefopt's) is not reused: one error that
    says so and names the fields."""
    from prefopt.preference import reference as refcache

    key = _key(tiny_model_dir, tmp_path)
    old = {k: v for k, v in key.items() if k not in ("precision", "revision", "layout", "batch_size",
                                                      "logps_chunk_size", "attention")}
    path = tmp_path / "hand.pt"
    refcache.save(path, old, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"older prefopt.*'attention'.*'precision'"):
        refcache.load(path, key, 3)
    refcache.save(path, key, torch.zeros(3, 2))
    torch.testing.assert_close(refcache.load(path, key, 3), torch.zeros(3, 2))


def test_bf16_fp32_and_layout_runs_keep_separate_reference_caches(tmp_path, tiny_model_dir):
    """A bf16 run and an fp32 run of the same reference and pairs do not share cached log-probs (each computes its
    own, and they differ), the same run again reuses its file, and a layout change is a new key (`layout`, and the
    attention that computes it)."""
    import json

    from pair_helpers import run_prefopt, write_config

    run = _dpo_runner(tmp_path, tiny_model_dir)
    fp32 = run("a", beta=0.1)
    # bf16 in a process of its own, as a user runs it: accelerate's precision is fixed once per process
    exp = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(tmp_path / "pairs.jsonl"),
                                         "max_steps": 1, "per_device_train_batch_size": 8, "logging_steps": 1,
                                         "max_length": 256, "beta": 0.1, "bf16": True}, name="a")
    run_prefopt("dpo", str(exp))
    bf16 = json.loads((tmp_path / "runs" / "a" / "dpo" / "summary.json").read_text())
    again = run("a", beta=0.2)
    padded = run("a", beta=0.1, layout="padded")
    assert (fp32["reference_reused"], bf16["reference_reused"], padded["reference_reused"]) == (False, False, False)
    assert again["reference_reused"] is True and again["reference_cache"] == fp32["reference_cache"]
    assert len({fp32["reference_cache"], bf16["reference_cache"], padded["reference_cache"]}) == 3
    a, b, p = (torch.load(s["reference_cache"], weights_only=True) for s in (fp32, bf16, padded))
    assert (a["key"]["precision"], b["key"]["precision"]) == ("fp32", "bf16")
    assert [k for k in a["key"] if a["key"][k] != b["key"][k]] == ["precision"]
    # the shared prompt runs on varlen attention (the rejected answer with its prompt), the padded layout on SDPA
    assert [k for k in a["key"] if a["key"][k] != p["key"][k]] == ["layout", "attention"]
    assert (a["key"]["attention"], p["key"]["attention"]) == ("prefopt_varlen", "sdpa")
    diff = (a["logps"] - b["logps"]).abs().max().item()
    print(f"\nmax |bf16 - fp32| reference log-prob: {diff:.3g} (log-probs about {a['logps'].mean():.1f})")
    assert diff > 1e-4  # measured 2.3e-3: what the shared file used to hand a bf16 run as its own reference
    torch.testing.assert_close(p["logps"], a["logps"], atol=1e-4, rtol=0)  # same numbers up to rounding
