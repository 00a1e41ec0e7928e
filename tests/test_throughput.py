"""Throughput and MFU (prefopt.training.throughput): the FLOP and MFU arithmetic by hand, and a real DPO stage
whose summary.json carries the perf/* figures with the token counts its batches hold."""

from __future__ import annotations

import json
import time

import pytest
import torch

from pair_helpers import run_prefopt, write_config, write_pairs
from test_ppo import prompts_file, rm_dir  # noqa: F401 - fixtures for the PPO stage test
from prefopt.runtime.tracking import read_metrics
from prefopt.training import throughput
from prefopt.training.throughput import Meter, forward_flops, mfu, param_counts, train_flops


def test_param_counts_leave_out_the_embeddings(tiny_model_dir):
    """The conftest Llama (hidden 32, 2 layers, 2 heads of 16, 2 KV heads, MLP 64, tied): per layer q, k, v, o
    4 x 32 x 32 = 4,096, gate/up/down 3 x 32 x 64 = 6,144, two RMSNorms 2 x 32 = 64: 10,304; two layers 20,608 plus
    the final norm 32 = 20,640. The (tied) embedding table / lm_head is not counted."""
    from prefopt.models.loading import load_causal_lm

    model = load_causal_lm(str(tiny_model_dir), dtype="float32")
    assert param_counts(model) == (20_640, 20_640)
    everything = sum(p.numel() for p in model.parameters())
    assert everything - 20_640 == model.get_input_embeddings().weight.numel()
    for name, p in model.named_parameters():  # frozen parameters leave the trainable count only
        if "mlp" in name:
            p.requires_grad_(False)
    assert param_counts(model) == (20_640, 20_640 - 2 * 6_144)


def test_flops_and_mfu_by_hand():
    """Training: (4 N + 2 N_trainable) per token; N = N_trainable = 1,000 and 7 tokens: 6 x 1,000 x 7 = 42,000.
    LoRA-like N = 1,000, N_trainable = 10: (4,000 + 20) x 7 = 28,140. Forward: 2 x 1,000 x 7 = 14,000.
    MFU: 3e12 FLOPs in 2 s on 2 devices of 1 TFLOP/s = 1.5e12 / 2e12 = 0.75."""
    assert train_flops(1000, 1000, 7) == 42_000
    assert train_flops(1000, 10, 7) == 28_140
    assert forward_flops(1000, 7) == 14_000
    assert mfu(3e12, 2.0, 1.0, devices=2) == pytest.approx(0.75)
    assert mfu(3e12, 0.0, 1.0) == 0.0


def test_meter_summary_by_hand():
    """train: 1,000 positions of which 800 real, N = 100 all trained: 6 x 100 x 800 = 480,000 FLOPs in 2 s;
    forward: 500 positions, all real, 2 x 100 x 500 = 100,000 FLOPs in 0.5 s. Peak 0.0001 TFLOP/s = 1e8 FLOP/s.
    train: 500 tokens/s, 400 useful/s, padding 0.2, 240,000 FLOP/s = MFU 0.0024; forward: 1,000 tokens/s,
    MFU 0.002; the stage: 1,500 tokens in 2.5 s = 600/s, 1,300 useful = 520/s, padding 200 / 1,500 = 0.1333,
    580,000 FLOPs / 2.5 s = 232,000 FLOP/s = MFU 0.00232."""
    m = Meter(peak_tflops=1e-4)
    m.add("train", 1000, 800, train_flops(100, 100, 800))
    m.add("forward", 500, 500, forward_flops(100, 500))
    m.phases["train"].seconds, m.phases["forward"].seconds = 2.0, 0.5
    s = m.summary()
    assert s["perf/train/tokens_per_s"] == 500 and s["perf/train/useful_tokens_per_s"] == 400
    assert s["perf/train/padding_fraction"] == 0.2 and s["perf/train/mfu"] == pytest.approx(0.0024)
    assert s["perf/forward/tokens_per_s"] == 1000 and s["perf/forward/mfu"] == pytest.approx(0.002)
    assert s["perf/tokens"] == 1500 and s["perf/seconds"] == 2.5
    assert s["perf/tokens_per_s"] == 600 and s["perf/useful_tokens_per_s"] == 520
    assert s["perf/padding_fraction"] == pytest.approx(0.1333, abs=1e-4)
    assert s["perf/mfu"] == pytest.approx(0.00232) and s["perf/peak_tflops"] == 1e-4
    assert "perf/generate/tokens" not in s
    # several processes: counts summed, the slowest process's seconds, MFU over processes x peak
    two = Meter(peak_tflops=1e-4, processes=2)
    summed = [2 * x for x in m.totals()]
    s2 = two.summary(summed, [2.0, 0.5, 0.0])
    assert s2["perf/train/tokens_per_s"] == 1000 and s2["perf/train/mfu"] == pytest.approx(0.0024)
    with pytest.raises(ValueError, match="unknown phase 'backward'"):
        m.add("backward", 1, 1, 1)


def test_meter_times_and_counts_a_batch():
    """`timed` adds the span; `count` reads a padded batch's 2D mask and a packed batch's num_tokens."""
    m = Meter(peak_tflops=1.0)
    with m.timed("forward"):
        time.sleep(0.02)
    assert 0.02 <= m.phases["forward"].seconds < 0.5
    padded = {"input_ids": torch.zeros(2, 5, dtype=torch.long),
              "attention_mask": torch.tensor([[1] * 5, [1] * 3 + [0] * 2])}
    m.count("forward", padded, n=10)
    packed = {"input_ids": torch.zeros(1, 6, dtype=torch.long),
              "attention_mask": torch.ones(1, 1, 6, 6, dtype=torch.bool), "num_tokens": torch.tensor(4)}
    m.count("train", packed, n=10, n_trainable=10)
    assert (m.phases["forward"].tokens, m.phases["forward"].useful, m.phases["forward"].flops) == (10, 8, 160.0)
    assert (m.phases["train"].tokens, m.phases["train"].useful, m.phases["train"].flops) == (6, 4, 240.0)


def test_probe_is_short_and_plausible():
    """The probe finishes in well under a second and gives a CPU fp32 rate between 1 GFLOP/s and 10 TFLOP/s; a
    second call is the cached figure."""
    throughput._PEAKS.clear()
    t0 = time.perf_counter()
    peak = throughput.probe_peak_tflops("cpu", torch.float32)
    assert time.perf_counter() - t0 < 1.5
    assert 1e-3 < peak < 10
    t0 = time.perf_counter()
    assert throughput.probe_peak_tflops("cpu", torch.float32) == peak and time.perf_counter() - t0 < 0.01
    assert throughput.start(peak_tflops=312.0).peak_tflops == 312.0  # a configured peak is not probed


def test_collate_counts_the_real_tokens(tiny_model_dir, tmp_path):
    """num_tokens = every pair's prompt + chosen + rejected tokens (shared_prompt: the prompt once; padded and
    packed: twice), whatever padding each layout adds."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.batching import collate
    from prefopt.preference.data import load_pairs, tokenize_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    ex = tokenize_pairs(load_pairs(str(write_pairs(tmp_path / "p.jsonl", n=6)), "alpaca", tok), tok, 256)
    p, c, r = (sum(len(e[k]) for e in ex) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    keys = {}
    for layout, want in (("padded", 2 * p + c + r), ("packed", 2 * p + c + r), ("shared_prompt", p + c + r)):
        batch = collate(ex, tok.pad_token_id, 256, layout)
        computed, useful = throughput.batch_tokens(batch)
        assert useful == want and computed == batch["input_ids"].numel() >= want, layout
        keys[layout] = throughput.attention_keys(batch, (None,))
    # attention's keys: the same sequences the same keys in any layout; the shared prompt's keys once, not twice
    # (a prompt of P tokens attends to 1 + 2 + ... + P keys); the prefix tree shares more (the template's start)
    assert keys["padded"] == keys["packed"]
    assert keys["padded"] - keys["shared_prompt"] == sum(len(e["prompt_ids"]) * (len(e["prompt_ids"]) + 1) // 2
                                                         for e in ex)
    tree = throughput.attention_keys(collate(ex, tok.pad_token_id, 256, "prefix_tree"), (None,))
    assert 0 < tree < keys["shared_prompt"]


def test_dpo_stage_reports_perf(tmp_path, tiny_model_dir):
    """A real `dpo` stage (16 pairs in one batch of 16, 2 epochs, its default layout, reference precomputed): the
    summary's token counts are those of the batch collate builds from the same pairs as the loop does (one
    reference pass, two training passes), the padding fraction is theirs, and MFU is in (0, 1.5)."""
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.batching import collate
    from prefopt.preference.config import PreferenceFields
    from prefopt.preference.data import load_pairs, tokenize_pairs

    pairs = write_pairs(tmp_path / "pairs.jsonl", n=16)
    cfg = write_config(tmp_path, "dpo", {"model": str(tiny_model_dir), "pairs": str(pairs), "max_steps": 2,
                                         "per_device_train_batch_size": 16, "logging_steps": 1, "save_steps": 100,
                                         "max_length": 256})
    proc = run_prefopt("dpo", str(cfg))
    summary = json.loads((tmp_path / "runs" / "t" / "dpo" / "summary.json").read_text())
    tok = load_tokenizer(str(tiny_model_dir))
    batch = collate(tokenize_pairs(load_pairs(str(pairs), "alpaca", tok), tok, 256), tok.pad_token_id, 256,
                    PreferenceFields().layout, masks=False)  # the model is switched to varlen attention
    computed, useful = batch["input_ids"].numel(), int(batch["num_tokens"])  # one batch holds every pair
    assert summary["perf/forward/tokens"] == computed and summary["perf/train/tokens"] == 2 * computed
    assert summary["perf/tokens"] == 3 * computed
    assert summary["perf/padding_fraction"] == pytest.approx(1 - useful / computed, abs=1e-4)
    # the summary's seconds are rounded to 1 ms: on a train phase of a few tens of ms that alone moves MFU by ~1%
    seconds = summary["perf/train/seconds"]
    assert summary["perf/train/mfu"] == pytest.approx(
        6 * 20_640 * 2 * useful / seconds / (summary["perf/peak_tflops"] * 1e12), rel=0.01 + 0.0005 / seconds)
    for key in ("perf/mfu", "perf/train/mfu", "perf/forward/mfu"):
        assert 0 < summary[key] < 1.5, (key, summary[key])
    # with attention: the two steps' 3 x 4 x width (32) x keys (2 layers, no window) on top
    keys = throughput.attention_keys(batch, (None, None))
    assert summary["perf/train/mfu_with_attention"] == pytest.approx(
        (6 * 20_640 * useful + 12 * 32 * keys) * 2 / seconds / (summary["perf/peak_tflops"] * 1e12),
        rel=0.01 + 0.0005 / seconds)
    assert summary["perf/tokens_per_s"] > 0 and summary["perf/peak_tflops"] > 0
    assert "[prefopt] dpo: " in proc.stdout and "MFU" in proc.stdout and "with attention's products" in proc.stdout
    # each logged row: its own step's throughput (the reference pass before training is in none), so the row's
    # padding and its FLOPs per useful token are the batch's
    rows = [r for r in read_metrics(tmp_path / "runs" / "t" / "dpo") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["perf/useful_tokens_per_s"] / r["perf/tokens_per_s"] == pytest.approx(useful / computed, rel=1e-3)
        assert r["perf/mfu"] / r["perf/useful_tokens_per_s"] == pytest.approx(
            6 * 20_640 / (summary["perf/peak_tflops"] * 1e12), rel=2e-3)
        assert r["perf/mfu_with_attention"] > r["perf/mfu"]


def test_classifier_reward_stage_reports_perf(tmp_path, tiny_model_dir):
    """The Trainer stages' callback (training.trainer.throughput_callback), on the classifier reward model: one
    step over the 24 training pairs in one batch. TRL's collator pads the 48 chosen and rejected sequences to the
    longest, so the step computes 48 x that length positions, of which the pairs' own tokens are useful; the
    validation pass (12 pairs, eval mode) is the forward phase. Counted as the recipe tokenizes the split."""
    from prefopt.config import from_dict
    from prefopt.data.loaders import load_preferences
    from prefopt.data.templates import render_prompt
    from prefopt.experiment import ExperimentConfig
    from prefopt.models.loading import load_tokenizer
    from prefopt.reward.recipe import classifier_rows, split
    from prefopt.stage import StageContext, run_stage
    from prefopt.runtime.tracking import NullTracker

    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "seed": 3,
        "task": {"num_sft": 10, "num_prompts": 4, "num_test_prompts": 4, "num_val_prompts": 4, "num_preferences": 48},
        "reward": {"model": str(tiny_model_dir), "kind": "classifier", "max_steps": 1, "save_steps": 1,
                   "per_device_train_batch_size": 24, "eval_fraction": 0.25, "test_fraction": 0.25,
                   "logging_steps": 1}})
    run_stage(cfg, "task")
    summary = run_stage(cfg, "reward")
    ctx = StageContext(cfg=cfg, stage="reward", round=1, dir=tmp_path / "x", tracker=NullTracker())
    tok = load_tokenizer(str(tiny_model_dir), padding_side="right")
    data = load_preferences(cfg.reward.dataset, cfg.reward.template, resolve=ctx.resolve)
    rows = [{**r, "prompt": render_prompt(r["prompt"], tok)} for r in data.rows]
    train, val, _ = split(rows, 0.25, ctx.seed, 0.25)
    lengths = [len(ids) for r in classifier_rows(train, tok, cfg.reward.max_length) for ids in r.values()]
    assert len(lengths) == 48
    assert summary["perf/train/tokens"] == 48 * max(lengths)
    assert summary["perf/train/padding_fraction"] == pytest.approx(1 - sum(lengths) / (48 * max(lengths)), abs=1e-4)
    assert summary["perf/forward/tokens"] >= 2 * len(val) > 0
    for key in ("perf/mfu", "perf/train/mfu", "perf/forward/mfu"):
        assert 0 < summary[key] < 1.5, (key, summary[key])
        assert summary[key.replace("mfu", "mfu_with_attention")] > summary[key]  # the Trainer's batches too
    row = next(r for r in read_metrics(tmp_path / "t" / "reward") if "loss" in r)  # the step's own window
    assert 1 - row["perf/useful_tokens_per_s"] / row["perf/tokens_per_s"] == pytest.approx(
        summary["perf/train/padding_fraction"], abs=2e-3)


def test_response_logps_meters_its_batches(tiny_model_dir):
    """Evaluation's log-prob passes (training.logps.response_logps): 3 (prompt, response) pairs of 2+3, 4+1 and 1+2
    tokens in batches of 2: rows of 5 and 5 (batch 1: 10 positions, 10 real), then 3 (3 positions, 3 real): 13
    positions, 13 useful; 2 x 20,640 x 13 = 536,640 FLOPs, and attention's 4 x width x keys. The values are those
    of the unmetered call; a meter made with peak 0 probes it on the first model it counts."""
    from prefopt.models.loading import load_causal_lm
    from prefopt.training.logps import response_logps

    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    prompts, responses = [[5, 6], [7, 8, 9, 10], [11]], [[12, 13, 14], [15], [16, 17]]
    meter = Meter(0.0)
    metered = response_logps(model, prompts, responses, batch_size=2, meter=meter)
    assert metered == response_logps(model, prompts, responses, batch_size=2)
    f = meter.phases["forward"]
    assert (f.tokens, f.useful, f.flops) == (13, 13, 536_640.0) and f.seconds > 0
    # attention: sequences of 5, 5 and 3 tokens attend to 15 + 15 + 6 keys a layer, 2 layers: 4 x 32 x 72
    assert f.attention == 9_216.0
    assert meter.peak_tflops > 0 and 0 < meter.summary()["perf/mfu"] < 1.5


@pytest.mark.parametrize("backend", ["prefopt", "trl"])
def test_sft_stage_reports_perf(tmp_path, tiny_model_dir, backend):
    """The `sft` stage on its two backends, one step over 24 examples in one batch: the loop's batch in its
    default layout (the prefix tree: positions = the distinct prefixes' tokens, every one useful) and TRL's
    SFTTrainer (positions = 24 x the longest example, through the Trainer callback, the examples' own tokens
    useful)."""
    from prefopt.config import from_dict
    from prefopt.data.loaders import load_sft
    from prefopt.experiment import ExperimentConfig
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.batching import collate
    from prefopt.sft.recipe import sft_examples
    from prefopt.stage import run_stage

    rows = [{"instruction": "Sort the numbers in ascending order.", "input": " ".join(map(str, range(i % 5 + 2))),
             "output": " ".join(map(str, range(i % 5 + 2)))} for i in range(24)]
    (tmp_path / "sft.json").write_text(json.dumps(rows))
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "stages": ["sft"],
        "sft": {"model": str(tiny_model_dir), "dataset": {"path": str(tmp_path / "sft.json")}, "max_steps": 1,
                "per_device_train_batch_size": 24, "logging_steps": 1, "save_steps": 10, "max_length": 256,
                "backend": backend}})
    summary = run_stage(cfg, "sft")
    tok = load_tokenizer(str(tiny_model_dir))
    examples, _ = sft_examples(load_sft(cfg.sft.dataset, "alpaca").rows, tok, 256)
    lengths = [len(e["prompt_ids"]) + len(e["completion_ids"]) for e in examples]
    assert len(lengths) == 24
    if backend == "prefopt":
        computed = useful = collate(examples, tok.pad_token_id, 256, cfg.sft.layout, masks=False)["input_ids"].numel()
        assert cfg.sft.layout == "prefix_tree" and computed < sum(lengths) / 2  # the instruction is shared
    else:
        computed, useful = 24 * max(lengths), sum(lengths)
    assert summary["perf/train/tokens"] == computed
    assert summary["perf/train/padding_fraction"] == pytest.approx(1 - useful / computed, abs=1e-4)
    assert 0 < summary["perf/mfu"] < 1.5 and summary["perf/peak_tflops"] > 0
    # the step's logged row carries the step's own throughput (the loop's window, or the Trainer callback's)
    row = next(r for r in read_metrics(tmp_path / "t" / "sft") if "loss" in r)
    assert row["perf/useful_tokens_per_s"] / row["perf/tokens_per_s"] == pytest.approx(useful / computed, rel=1e-3)
    assert 0 < row["perf/mfu"] < row["perf/mfu_with_attention"]


def test_evaluate_stage_reports_its_logprob_passes(tmp_path, tiny_model_dir):
    """The `evaluate` stage (one policy, its own baseline, gold as the reward function): its summary carries the
    log-prob passes' perf/* figures as the forward phase, and nothing for training."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": "Sort the numbers in ascending order.", "input": x}) + "\n"
                               for x in ("3 1 2", "4 2 5", "2 0")))
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "sort"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(tiny_model_dir)}, "reward_fn": "task:gold", "task": "sort",
                     "prompts": {"path": str(prompts)}, "samples_per_prompt": 2, "max_new_tokens": 6,
                     "backend": "transformers"}})
    summary = run_stage(cfg, "evaluate")
    assert summary["perf/forward/tokens"] == summary["perf/tokens"] > 0 and "perf/train/tokens" not in summary
    assert 0 <= summary["perf/padding_fraction"] < 1 and 0 < summary["perf/mfu"] < 1.5
    assert json.loads((tmp_path / "t" / "evaluate" / "summary.json").read_text())["perf/mfu"] == summary["perf/mfu"]


def test_ppo_stage_reports_perf(tmp_path, tiny_model_dir, rm_dir, prompts_file):
    """The `ppo` stage, 2 iterations of 8 rollouts: the rollouts are the forward phase, the minibatch updates the
    train phase (2 epochs x 2 minibatches of 4 rows), both read as prefix trees (every position computed is a real
    token: no padding; what they count is checked in tests/test_ppo_tree.py), every logged row is an iteration's
    (the figures go to the summary, not to metrics.jsonl), MFU in (0, 1.5)."""
    from test_ppo import write_config as ppo_config

    cfg = ppo_config(tmp_path, "p", tiny_model_dir, rm_dir, prompts_file)
    proc = run_prefopt("ppo", str(cfg))
    d = tmp_path / "p" / "ppo"
    summary = json.loads((d / "summary.json").read_text())
    assert [json.loads(line)["step"] for line in (d / "metrics.jsonl").open()] == [1, 2]
    assert summary["perf/forward/tokens"] > 0 and summary["perf/train/tokens"] > 0
    for key in ("perf/mfu", "perf/train/mfu", "perf/forward/mfu"):
        assert 0 < summary[key] < 1.5, (key, summary[key])
        assert summary[key.replace("mfu", "mfu_with_attention")] > summary[key]  # policy, reference and value
    assert summary["perf/padding_fraction"] == 0 and "[prefopt] ppo: " in proc.stdout


def test_scoring_passes_do_not_depend_on_the_batch_size(tiny_model_dir, rm_dir):
    """Why evaluate may score in larger batches than it samples (evaluate.samples.scoring_batch_size): summed
    log-probs (the likelihood reward model and the KL) and a classifier reward model's scores in batches of 2, 3 and
    7 agree to float rounding (right padding: a row's positions do not see the others'; a batch's width changes only
    the order the attention sums in), and to the bit when every batch has the same width (every sequence made as long
    as the longest)."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.scoring.scorer import load_scorer
    from prefopt.training.logps import response_logps

    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (7,), generator=g)]
    responses = [torch.randint(3, 250, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (7,), generator=g)]
    logps = [response_logps(model, prompts, responses, batch_size=b) for b in (2, 3, 7)]
    for other in logps[1:]:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(logps[0]), rtol=1e-6, atol=1e-5)
    same = [p + r for p, r in zip(prompts, responses)]
    width = max(map(len, same))
    padded = [s + [s[-1]] * (width - len(s)) for s in same]  # every sequence as long as the longest
    even = [response_logps(model, [s[:1] for s in padded], [s[1:] for s in padded], batch_size=b) for b in (2, 3, 7)]
    assert even[0] == even[1] == even[2]
    tok, rm = load_tokenizer(str(tiny_model_dir)), load_scorer(str(rm_dir))
    texts = ([tok.decode(p) for p in prompts], [tok.decode(r) for r in responses])
    scores = [rm.score(*texts, batch_size=b) for b in (2, 3, 7)]
    for other in scores[1:]:
        torch.testing.assert_close(torch.tensor(other), torch.tensor(scores[0]), rtol=1e-6, atol=1e-5)


def test_the_end_line_says_when_mfu_is_above_one():
    """An MFU over 100% is not hidden or capped: the line says what it means (the probe ran on a busier machine)."""
    from prefopt.training.throughput import describe

    f = {"perf/tokens": 10, "perf/tokens_per_s": 5.0, "perf/useful_tokens_per_s": 4.0, "perf/padding_fraction": 0.2,
         "perf/tflops": 0.04, "perf/mfu": 0.5, "perf/peak_tflops": 0.08}
    assert describe(f) == "5 tokens/s (4 useful, padding 20.0%); 40.00 GFLOP/s = MFU 50.0% of 80.0 GFLOP/s peak"
    f.update({"perf/train/mfu": 1.3, "perf/train/seconds": 2.0})
    assert describe(f).endswith("(MFU by phase: train 130.0% over 2.0 s); MFU above 100% means the peak probe at "
                                "the stage's start ran slower than the stage (a busy machine): set peak_tflops to "
                                "the machine's figure")


def test_attention_keys_by_hand():
    """Keys the real tokens attend to, summed over layers (throughput.attention_keys). Rows of 3 and 2 real tokens
    (positions 0-2 and 0-1): 1+2+3 + 1+2 = 9 keys a full layer; a layer with a window of 2: 1+2+2 + 1+2 = 8. The same
    rows right- or left-padded, or packed into one row with a padding position (position 0, one key, taken off with
    num_tokens), give the same count; a prefix tree of two branches at position 2 over a shared 0-1: 1+2+3+3 = 9."""
    from prefopt.training.throughput import attention_keys

    ids = torch.zeros(2, 4, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])}
    left = {"input_ids": ids, "attention_mask": torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])}
    packed = {"input_ids": torch.zeros(1, 6, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 0]]),
              "num_tokens": torch.tensor(5)}
    for batch in (right, left, packed):
        assert attention_keys(batch, (None,)) == 9 and attention_keys(batch, (None, 2)) == 9 + 8
        assert attention_keys(batch, (None, None, None)) == 27
    tree = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "position_ids": torch.tensor([[0, 1, 2, 2]]),
            "num_tokens": torch.tensor(4)}
    assert attention_keys(tree, (None,)) == 9
    plain = {"input_ids": torch.zeros(1, 4, dtype=torch.long)}  # no mask, no positions: one sequence of 4
    assert attention_keys(plain, (None,)) == 10 and attention_keys(plain, (3,)) == 1 + 2 + 3 + 3


def test_attention_flops_and_the_with_attention_mfu_by_hand():
    """Forward: 4 x width a key (q.k and the weighted values, 2 x width each); training 3 x that. Width 64, 9 keys:
    2,304 forward, 6,912 training. A meter's train phase of 480,000 model FLOPs and 120,000 attention FLOPs in 2 s
    at 1e8 FLOP/s: MFU 0.0024, with attention (600,000 / 2) / 1e8 = 0.003; totals() carries five fields a phase and
    seconds_of reads them back."""
    from prefopt.training.throughput import FIELDS, AttentionShape, attention_flops

    shape = AttentionShape(64, (None,))
    assert attention_flops(shape, 9) == 2_304 and attention_flops(shape, 9, train=True) == 6_912
    assert attention_flops(None, 9) == 0.0
    m = Meter(peak_tflops=1e-4)
    m.add("train", 1000, 800, train_flops(100, 100, 800), 120_000)
    m.phases["train"].seconds = 2.0
    s = m.summary()
    assert s["perf/train/mfu"] == pytest.approx(0.0024) and s["perf/mfu"] == pytest.approx(0.0024)
    assert s["perf/train/mfu_with_attention"] == pytest.approx(0.003)
    assert s["perf/mfu_with_attention"] == pytest.approx(0.003)
    assert FIELDS == 5 and Meter.seconds_of(m.totals()) == [2.0, 0.0, 0.0]
    two = Meter(peak_tflops=1e-4, processes=2)  # two processes' counts, the slowest one's seconds
    assert two.summary([2 * x for x in m.totals()], [2.0, 0.0, 0.0])["perf/mfu_with_attention"] == pytest.approx(0.003)


@pytest.mark.parametrize("name", ["llama3", "gemma2", "qwen2.5", "mistral", "phi3", "gemma3"])
def test_attention_flops_match_the_models_own_products(name):
    """Each family's eager attention, run on one sequence of T = 7 tokens (shorter than every window) under torch's
    FLOP counter: its attention modules' batched products (q.k and the weighted values) cost 4 x width x T^2 a
    layer, every query against every key, the masked half included. Causal attention needs the keys up to each
    query: T (T + 1) / 2 of the T^2, so the meter's count x 2T / (T + 1) must equal the model's. Hidden 96 makes
    Gemma's width (4 heads x head_dim 16 = 64) differ from its hidden size, as at full size (8 x 256 vs 2,304)."""
    from torch.utils.flop_counter import FlopCounterMode

    from families import FAMILIES, build_model, build_tokenizer
    from prefopt.training.throughput import attention_flops, attention_keys, attention_shape

    fam = FAMILIES[name]
    model = build_model(fam, build_tokenizer(fam), "eager", hidden_size=96, layers=2)
    T = 7
    ids = torch.randint(3, 300, (1, T))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids)
    products = sum(ops.get(torch.ops.aten.bmm, 0) for module, ops in counter.get_flop_counts().items()
                   if module.endswith("self_attn"))
    shape = attention_shape(model)
    assert shape.width == (64 if name.startswith("gemma") else 96) and len(shape.windows) == 2
    ours = attention_flops(shape, attention_keys({"input_ids": ids}, shape.windows))
    assert products > 0 and ours * 2 * T == products * (T + 1)


def test_attention_shape_reads_each_layers_window():
    """Which layers slide, from the config as the model's masks are built: Gemma-2 alternates (sliding first),
    Mistral and Phi-3 slide in every layer, Qwen2.5 from `max_window_layers` on (here 1), Llama never; PPO's value
    model (a wrapper with no config of its own) is read through its `model`."""
    from families import FAMILIES, WINDOW, build_model, build_tokenizer
    from prefopt.ppo.rollout import ValueModel
    from prefopt.training.throughput import attention_shape

    want = {"llama3": (None, None), "gemma2": (WINDOW, None), "mistral": (WINDOW, WINDOW),
            "phi3": (WINDOW, WINDOW), "qwen2.5": (None, WINDOW), "gemma3": (WINDOW, None)}
    for name, windows in want.items():
        fam = FAMILIES[name]
        model = build_model(fam, build_tokenizer(fam), "eager", layers=2)
        assert attention_shape(model).windows == windows, name
    assert attention_shape(ValueModel(model)) == attention_shape(model)


def test_a_window_is_what_was_counted_since_the_last_one():
    """Meter.window (a metrics row's live figures): window 1 = 1,000 train positions (800 real, 480,000 FLOPs, 20,000
    of attention) in 2 s: 500 tokens/s, 400 useful/s, MFU 240,000 / 1e8 = 0.0024, with attention 0.0025; window 2
    adds 500 forward positions (100,000 FLOPs) in 0.5 s: only those, 1,000 tokens/s, MFU 0.002. With two processes'
    counts gathered: the sums over the slowest process's seconds, MFU over two peaks."""
    m = Meter(peak_tflops=1e-4)
    m.add("train", 1000, 800, 480_000, 20_000)
    m.phases["train"].seconds = 2.0
    assert m.window() == {"perf/tokens_per_s": 500.0, "perf/useful_tokens_per_s": 400.0, "perf/mfu": 0.0024,
                          "perf/mfu_with_attention": 0.0025}
    m.add("forward", 500, 500, 100_000)
    m.phases["forward"].seconds = 0.5
    assert m.window() == {"perf/tokens_per_s": 1000.0, "perf/useful_tokens_per_s": 1000.0, "perf/mfu": 0.002,
                          "perf/mfu_with_attention": 0.002}
    assert m.summary()["perf/tokens"] == 1500  # the stage's figures are untouched by windows
    two = Meter(peak_tflops=1e-4, processes=2)
    two.add("train", 1000, 800, 480_000)
    two.phases["train"].seconds = 2.0
    other = torch.tensor([[1000, 800, 480_000, 0, 4.0]], dtype=torch.float64)  # the other process: slower
    w = two.window(lambda mine: torch.cat([mine, other]))
    assert w["perf/tokens_per_s"] == 500.0 and w["perf/mfu"] == pytest.approx(960_000 / 4.0 / 2e8)
