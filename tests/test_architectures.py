"""The architecture conformance suite: every family in `prefopt.models.architectures.CHECKED`, built tiny from its own
transformers config class (tests/families.py), against its own forward.

The reference is the plainest thing there is: each sequence alone, unpadded, through `model(input_ids).logits`,
`log_softmax`, the completion tokens' log-probs summed. Every batching layout, every projection path (hooked hidden
states, chunked, inside the sharded model's forward) and each attention implementation the family supports must
give those numbers. The pairs are longer than every sliding window (8), the models' weights large enough
(initializer_range 0.3) that attention really depends on context: with the boolean masks prefopt used to pass,
these tests saw differences of 3 to 23 nats per sequence (eager attention added the mask instead of applying it,
sliding windows were dropped, Gemma-2's final soft-cap skipped on the hooked path).
"""

from __future__ import annotations

import pytest
import torch

from families import FAMILIES, build_model, build_tokenizer
from prefopt.models.architectures import CHECKED, support_table, unchecked
from prefopt.models import varlen
from prefopt.preference.batching import LAYOUTS, collate
from prefopt.training.forward import LayoutError, _pair_logps_inside_forward, check_layout, pair_logps

CASES = [(c["family"], attn) for c in CHECKED.values() for attn in c["attn"]]
# fp32: sums of ~40 token log-probs of magnitude ~5 each; float32 summation in another order moves them ~1e-5
ATOL, RTOL = 1e-5, 1e-6
# bf16 autocast (stated tolerances): against the fp32 forward, bf16 rounding moves the sums by up to 0.53% (measured
# 0.17 to 0.76 nats on sums of 30 to 250 nats, six families); between layouts, which compute the same rows in other
# shapes, at most 0.1% (measured 0 on CPU, where a bf16 row's matmul does not depend on its neighbours; a GPU
# kernel's tiling may). A wrong mask moves a sum by several nats.
BF16_VS_FP32_RTOL, BF16_LAYOUT_RTOL = 1e-2, 1e-3


@pytest.fixture(scope="module")
def tokenizers():
    return {name: build_tokenizer(fam) for name, fam in FAMILIES.items()}


def _pairs(vocab: int, n: int = 4, seed: int = 0) -> list[dict]:
    """Pairs of very different lengths (prompts 8..29 tokens, completions 2..19), all ids outside the specials, that
    share what real batches share (what the prefix tree computes once): every prompt starts with the same 5 tokens
    (a template's or system prompt's head), the third pair asks the first one's question again, and the second
    pair's rejected answer starts as its chosen one does."""
    g = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(10, vocab, (k,), generator=g).tolist()

    head = ids(5)
    pairs = [{"prompt_ids": head + ids(3 + 7 * k), "chosen_ids": ids(2 + 5 * k), "rejected_ids": ids(12 - 3 * k)}
             for k in range(n)]
    if n >= 3:
        pairs[2]["prompt_ids"] = pairs[0]["prompt_ids"]
        pairs[1]["rejected_ids"] = pairs[1]["chosen_ids"][:2] + pairs[1]["rejected_ids"]
    return pairs


def _plain(model, examples) -> torch.Tensor:
    """(2B,) chosen then rejected: each sequence alone through the model's own forward."""
    out = {"c": [], "r": []}
    with torch.no_grad():
        for ex in examples:
            P = len(ex["prompt_ids"])
            for key, comp in (("c", ex["chosen_ids"]), ("r", ex["rejected_ids"])):
                logits = model(input_ids=torch.tensor([ex["prompt_ids"] + comp])).logits[0].float()
                lp = torch.log_softmax(logits, -1)
                out[key].append(sum(lp[P + k - 1, t] for k, t in enumerate(comp)))
    return torch.stack(out["c"] + out["r"])


def _pad(tok) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _runs(model):
    """Each layout with its masks (the prefix tree's built from its position ids); the shared prompt collated without
    masks (the mask built from its position ids); and `packed`, `shared_prompt` and `prefix_tree` once more with the
    model switched to varlen attention (each packed sequence, each branch with its prefix, computed alone: the
    loop's default on SDPA and eager). Yields the run's
    name and `collate`'s (layout, masks) after the model is set up for it, and restores it at the end."""
    for layout in LAYOUTS:
        yield layout, (layout, True)
    yield "shared_prompt+positions", ("shared_prompt", False)
    if model.config._attn_implementation in varlen.SUPPORTED:
        base = varlen.use_varlen(model)
        for layout in ("packed", "shared_prompt", "prefix_tree"):
            check_layout(model, layout)
            yield f"{layout}+varlen", (layout, False)
        varlen.restore(model, base)


VARLEN_RUNS = ("packed+varlen", "shared_prompt+varlen", "prefix_tree+varlen")


def test_every_checked_family_is_built_here():
    assert {c["family"] for c in CHECKED.values()} == set(FAMILIES)
    for model_type, c in CHECKED.items():
        fam = FAMILIES[c["family"]]
        assert fam.model_type == model_type and set(c["attn"]) == set(fam.attn)


@pytest.mark.parametrize("family,attn", CASES)
def test_every_layout_and_path_gives_the_models_own_log_probs(tokenizers, family, attn):
    tok = tokenizers[family]
    model = build_model(FAMILIES[family], tok, attn)
    assert model.config._attn_implementation == attn
    examples = _pairs(len(tok))
    ref = _plain(model, examples)
    lengths = torch.tensor([len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples])
    runs = []
    for name, (layout, masks) in _runs(model):
        runs.append(name)
        check_layout(model, layout)
        batch = collate(examples, _pad(tok), 0, layout, masks)
        with torch.no_grad():
            paths = {"hook": pair_logps(model, batch, 0), "chunked": pair_logps(model, batch, 7),
                     "in_forward": _pair_logps_inside_forward(model, batch)}
        for path, (sums, lens) in paths.items():
            torch.testing.assert_close(sums, ref, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}/{path}: {m}")
            torch.testing.assert_close(lens, lengths.to(lens.dtype))
    assert all((run in runs) == (attn in varlen.SUPPORTED) for run in VARLEN_RUNS)


@pytest.mark.parametrize("family", ["gemma2", "mistral", "qwen2.5"])
def test_gradients_of_every_layout_match_the_padded_layout(tokenizers, family):
    """The DPO loss's gradients, not only its value: a mask that leaks in backward would show here."""
    from prefopt.dpo.loss import dpo_loss

    tok = tokenizers[family]
    model = build_model(FAMILIES[family], tok, "eager")
    examples = _pairs(len(tok))
    grads = {}
    for name, (layout, masks) in _runs(model):
        model.zero_grad()
        sums, _ = pair_logps(model, collate(examples, _pad(tok), 0, layout, masks), 5)
        b = len(examples)
        loss, _ = dpo_loss(sums[:b], sums[b:], sums[:b].detach() - 1.0, sums[b:].detach() + 0.5, beta=0.1)
        loss.backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert set(VARLEN_RUNS) <= set(grads)
    for layout in set(grads) - {"padded"}:
        for name, g in grads["padded"].items():
            torch.testing.assert_close(grads[layout][name], g, atol=1e-5, rtol=1e-4, msg=lambda m: f"{layout} {name}")


@pytest.mark.parametrize("family", ["llama3", "gemma2", "mistral"])
def test_bf16_autocast_layouts_agree_within_bf16_rounding(tokenizers, family):
    tok = tokenizers[family]
    model = build_model(FAMILIES[family], tok, "eager")
    examples = _pairs(len(tok))
    ref = _plain(model, examples)
    got = {}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for name, (layout, masks) in _runs(model):
            got[name] = pair_logps(model, collate(examples, _pad(tok), 0, layout, masks), 0)[0]
    for layout in got:
        torch.testing.assert_close(got[layout], ref, atol=0.0, rtol=BF16_VS_FP32_RTOL, msg=lambda m: f"{layout}: {m}")
        torch.testing.assert_close(got[layout], got["padded"], atol=0.0, rtol=BF16_LAYOUT_RTOL,
                                   msg=lambda m: f"{layout} vs padded: {m}")


def test_a_layout_the_attention_cannot_take_is_refused_by_key():
    tok = build_tokenizer(FAMILIES["llama3"])
    model = build_model(FAMILIES["llama3"], tok, "eager")
    model.config._attn_implementation = "flash_attention_2"  # only the check reads it: nothing runs
    check_layout(model, "packed", "dpo.layout")  # flash reads the packing from the position ids
    with pytest.raises(LayoutError, match=r"dpo\.layout=shared_prompt cannot run with "
                                          r"attn_implementation='flash_attention_2'.*use dpo\.layout=packed"):
        check_layout(model, "shared_prompt", "dpo.layout")
    with pytest.raises(LayoutError, match=r"sft\.layout=prefix_tree cannot run .*use sft\.layout=packed"):
        check_layout(model, "prefix_tree", "sft.layout")
    # a shared prefix collated without masks still reaches no flash kernel: the branch is seen in the position ids
    from prefopt.training.forward import attention_inputs

    examples = _pairs(len(tok), n=2)
    assert attention_inputs(model, collate(examples, _pad(tok), 0, "packed"))["attention_mask"] is None
    for layout in ("shared_prompt", "prefix_tree"):
        with pytest.raises(LayoutError, match="cannot express a branch back into a prefix"):
            attention_inputs(model, collate(examples, _pad(tok), 0, layout, masks=False))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(LayoutError, match=r"simpo\.layout=packed .*'flex_attention'"):
        check_layout(model, "packed", "simpo.layout")
    check_layout(model, "padded", "simpo.layout")  # the model builds its own masks


def test_an_unchecked_family_or_attention_gets_a_warning_naming_it():
    from transformers import GPTNeoXConfig, LlamaConfig

    assert unchecked(LlamaConfig()) is None
    msg = unchecked(GPTNeoXConfig())
    assert "'gpt_neox' is not in prefopt's conformance suite" in msg and "layout: padded" in msg
    cfg = LlamaConfig()
    cfg._attn_implementation = "flex_attention"
    assert "'flex_attention' of 'llama'" in unchecked(cfg)


def test_readme_table_is_what_the_suite_checks():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert support_table(LAYOUTS) in readme, "README's supported-models table differs from prefopt.models.architectures"


@pytest.mark.parametrize("stage", ["dpo", "simpo"])
def test_the_gemma_recipes_defaults_give_the_models_own_log_probs(tokenizers, stage):
    """experiments/simpo/gemma2_9b_it.yaml as written (its layout and chunk size, whatever the defaults are), on
    Gemma-2's architecture under the attention it runs (eager), with bf16 autocast off: the padded numbers."""
    from pathlib import Path

    from prefopt.experiment import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments/simpo/gemma2_9b_it.yaml")
    sec = getattr(cfg, stage)
    tok = tokenizers["gemma2"]
    model = build_model(FAMILIES["gemma2"], tok, "eager")
    check_layout(model, sec.layout, f"{stage}.layout")
    examples = _pairs(len(tok), seed=1)
    with torch.no_grad():
        sums, _ = pair_logps(model, collate(examples, _pad(tok), sec.max_length, sec.layout), sec.logps_chunk_size)
    torch.testing.assert_close(sums, _plain(model, examples), atol=ATOL, rtol=RTOL)


def test_loading_an_unchecked_family_warns_and_a_checked_one_does_not(tmp_path, tokenizers):
    import warnings

    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from families import save_family
    from prefopt.models.loading import load_causal_lm, save_model

    tok = tokenizers["llama3"]
    neox = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=64))
    save_model(neox, tok, tmp_path / "neox")
    with pytest.warns(UserWarning, match=r"'gpt_neox' is not in prefopt's conformance suite"):
        load_causal_lm(str(tmp_path / "neox"))
    save_family(FAMILIES["mistral"], tmp_path / "mistral", attn="sdpa", hidden_size=32, layers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        load_causal_lm(str(tmp_path / "mistral"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reward_model_scores_batched_equal_scores_alone(tmp_path, tokenizers, family):
    """Each family as a one-label sequence classifier (what Skywork-Reward is), saved and loaded as the score
    stage loads it, scoring answers of very different lengths that end in the family's EOS: scores of a batch equal
    each text scored alone (no padding at all), whatever the family's pad token (none for Llama-3 and Mistral)."""
    import transformers

    from prefopt.models.loading import save_model
    from prefopt.scoring.scorer import load_scorer

    tok = tokenizers[family]
    lm = build_model(FAMILIES[family], tok, FAMILIES[family].attn[-1], hidden_size=32)
    config = lm.config
    config.num_labels = 1
    transformers.set_seed(1)
    rm = transformers.AutoModelForSequenceClassification.from_config(config, attn_implementation=FAMILIES[family].attn[-1])
    save_model(rm.float().eval(), tok, tmp_path / "rm")
    scorer = load_scorer(str(tmp_path / "rm"))
    prompts = ["Sort 3 1 2", "Say hi", "Reverse the words: the quick brown fox"]
    responses = ["1 2 3", "hello there, how can I help you today? " * 3, "fox brown quick the"]
    alone = [scorer.score([p], [r], batch_size=1, max_length=256)[0] for p, r in zip(prompts, responses)]
    batched = scorer.score(prompts, responses, batch_size=3, max_length=256)
    assert len(set(round(a, 4) for a in alone)) == 3  # the scores depend on the text
    assert batched == pytest.approx(alone, abs=1e-5)


def test_a_soft_capped_model_loads_with_the_attention_that_applies_its_soft_cap(tmp_path, tokenizers):
    """Gemma-2 soft-caps its attention scores, which SDPA cannot do. transformers 5.17 (the vLLM set) would load it
    with SDPA by default and drop the cap; every prefopt loader asks for eager attention, on both versions."""
    import transformers

    from families import save_family
    from prefopt.models.loading import load_causal_lm, load_reward_model

    path = save_family(FAMILIES["gemma2"], tmp_path / "gemma2", hidden_size=32, layers=1)
    assert load_causal_lm(str(path)).config._attn_implementation == "eager"
    assert load_reward_model(str(path)).config._attn_implementation == "eager"
    default = transformers.AutoModelForCausalLM.from_pretrained(str(path)).config._attn_implementation
    print(f"transformers {transformers.__version__} alone picks {default!r} for Gemma-2")
