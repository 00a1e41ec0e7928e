"""SFT in the shared training loop: the loss by hand, and TRL's SFTTrainer as the oracle of the whole loop (the same
data order, lr, seed and no dropout give the same loss curve and the same weights, fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from pair_helpers import state_dict, write_config
from prefopt.sft.loss import sft_loss
from test_sft import sft_rows


def test_sft_loss_by_hand():
    """One process, one micro-batch: three completions with summed log-probs -1.0, -2.0, -3.5 over 2 + 1 + 2 = 5
    tokens. tokens_per_share = 5 / (1 x 1) = 5, so L = (1.0 + 2.0 + 3.5) / 5 = 1.3: the token mean, not the mean of
    the per-sequence means (1.0/2 + 2.0/1 + 3.5/2) / 3 = 1.4167."""
    loss, metrics = sft_loss(torch.tensor([-1.0, -2.0, -3.5]), torch.tensor(5.0))
    torch.testing.assert_close(loss, torch.tensor(1.3))
    assert metrics == {}


def test_sft_loss_shares_average_to_the_step_token_mean():
    """Two processes x two accumulation micro-batches, 4 + 1 + 3 + 2 = 10 completion tokens in the step with summed
    log-probs -4, -1, -3, -2: tokens_per_share = 10 / (2 x 2) = 2.5, shares 1.6, 0.4, 1.2, 0.8. DDP averages over
    the 2 processes and accumulation divides each by 2: (1.6 + 0.4 + 1.2 + 0.8) / 4 = 1.0 = 10 / 10."""
    share = torch.tensor(2.5)
    parts = [sft_loss(torch.tensor([s]), share)[0] for s in (-4.0, -1.0, -3.0, -2.0)]
    torch.testing.assert_close(torch.stack(parts), torch.tensor([1.6, 0.4, 1.2, 0.8]))
    torch.testing.assert_close(torch.stack(parts).mean(), torch.tensor(1.0))


def _rows(tmp_path, n):
    """prompt/completion rows whose completions differ in length (3 to 9 numbers), so a per-sequence mean and the
    token mean differ; written as an Alpaca file."""
    rows = sft_rows(n)
    for i, r in enumerate(rows):
        r["output"] = " ".join([r["output"]] * (1 + i % 3))
    path = tmp_path / "sft.json"
    path.write_text(json.dumps(rows))
    return path


def _trl_losses(sec, model_dir, data, out_dir, seed):
    """TRL's SFTTrainer on the rows the stage loads, in the loop's batch order (its EpochShuffle as the sampler);
    returns the per-step losses (the micro-batch losses of a step summed: each is already over the step's token
    count) and the trained model."""
    from prefopt.data.loaders import load_sft
    from prefopt.data.spec import DatasetSpec
    from prefopt.preference.loop import EpochShuffle
    from prefopt.sft.recipe import build_trainer

    rows = load_sft(DatasetSpec(path=str(data))).rows
    trainer = build_trainer(sec, str(model_dir), rows, out_dir, seed)
    seen: list[float] = []

    class Recorded(type(trainer)):
        def _get_train_sampler(self, train_dataset=None):
            return EpochShuffle(len(train_dataset if train_dataset is not None else self.train_dataset), seed)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            seen.append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    trainer.__class__ = Recorded
    trainer.train()
    g = sec.gradient_accumulation_steps
    return [sum(seen[i:i + g]) for i in range(0, len(seen), g)], trainer.model


@pytest.mark.parametrize("layout,accumulation", [("packed", 1), ("padded", 2)])
def test_loss_curve_and_weights_equal_trl_sft_trainer(tmp_path, tiny_model_dir, layout, accumulation):
    """6 steps at lr 1e-3 (constant, clipped at 1.0), 24 rows, batch 4 (packed) or 2 x 2 accumulated (padded):
    prefopt's loop and TRL's SFTTrainer, same order and seed, log the same loss at every step and end with the
    same weights. The accumulated case checks the normaliser: the step's completion tokens over both micro-batches
    (TRL's num_items_in_batch), not each micro-batch's own. Measured: losses within 5e-7, weights within 4e-8."""
    from prefopt.experiment import load_config
    from prefopt.runtime.tracking import read_metrics
    from prefopt.stage import run_stage

    data = _rows(tmp_path, 24)
    sec = {"model": str(tiny_model_dir), "dataset": {"path": str(data)}, "max_steps": 6, "learning_rate": 1e-3,
           "lr_scheduler_type": "constant", "per_device_train_batch_size": 4 // accumulation,
           "gradient_accumulation_steps": accumulation, "logging_steps": 1, "save_steps": 100, "max_length": 256,
           "layout": layout}
    cfg = load_config(str(write_config(tmp_path, "sft", sec)))
    summary = run_stage(cfg, "sft")
    ours = [r["loss"] for r in read_metrics(tmp_path / "runs" / "t" / "sft") if "loss" in r]

    theirs, model = _trl_losses(cfg.sft, tiny_model_dir, data, tmp_path / "trl", cfg.seed)
    assert len(ours) == len(theirs) == 6 and summary["steps"] == 6
    assert ours[-1] < ours[0] - 0.3  # it trained
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=5e-6)
    trl_weights = model.state_dict()
    mine = state_dict(tmp_path / "runs" / "t" / "sft" / "model")
    for k, v in mine.items():
        torch.testing.assert_close(v, trl_weights[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_sft_batch_logps_equal_the_models_own_forward(tiny_model_dir, layout):
    """Three SFT examples of different lengths, laid out padded or packed (position ids restarting per sequence):
    each sequence's summed completion log-prob equals log_softmax(model(prompt + completion).logits) summed over its
    completion tokens, each example run alone; a completion cut by max_length counts only the tokens kept."""
    from prefopt.models.loading import load_causal_lm
    from prefopt.preference.batching import collate, num_targets
    from prefopt.training.forward import pair_logps

    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    from prefopt.models import varlen

    base = varlen.use_varlen(model) if layout == "packed" else None  # as the loop runs it: each sequence alone
    examples = [{"prompt_ids": [1, 5, 6, 7], "completion_ids": [8, 9, 2]},
                {"prompt_ids": [1, 10], "completion_ids": [11, 12, 13, 14, 2]},
                {"prompt_ids": [1, 20, 21, 22, 23, 24], "completion_ids": [25, 26, 27, 2]}]  # cut to 8 tokens: 2 kept
    batch = collate(examples, pad_token_id=0, max_length=8, layout=layout)
    assert int(batch["num_sequences"]) == 3 and [num_targets(e, 8) for e in examples] == [3, 5, 2]
    if layout == "packed":
        assert batch["input_ids"].shape == (1, 7 + 7 + 8)  # one row, no padding
        assert batch["position_ids"][0].tolist() == [*range(7), *range(7), *range(8)]
    with torch.no_grad():
        sums, lengths = pair_logps(model, batch, chunk_size=4)
        if base:
            varlen.restore(model, base)  # the expected values: the model's own forward
        expected = []
        for ex in examples:
            ids = (ex["prompt_ids"] + ex["completion_ids"])[:8]
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            P = len(ex["prompt_ids"])
            expected.append(sum(logps[t - 1, ids[t]] for t in range(P, len(ids))))
    torch.testing.assert_close(lengths, torch.tensor([3.0, 5.0, 2.0]))
    torch.testing.assert_close(sums, torch.stack(expected), rtol=0, atol=1e-5)


def test_text_windows_train_every_token_but_the_first_once():
    """A 10-token document at max_length 4: windows of at most 4 tokens, each reading the token before its own as
    context, which together train tokens 1..9 once each (token 0, the BOS, has nothing to be predicted from)."""
    from prefopt.sft.recipe import text_windows

    ids = list(range(100, 110))
    windows = text_windows(ids, 4)
    assert windows == [{"prompt_ids": [100], "completion_ids": [101, 102, 103]},
                       {"prompt_ids": [103], "completion_ids": [104, 105, 106]},
                       {"prompt_ids": [106], "completion_ids": [107, 108, 109]}]
    assert text_windows(ids[:3], 4) == [{"prompt_ids": [100], "completion_ids": [101, 102]}]


def _text_rows(tmp_path, n):
    """Language-model text of different lengths, the longer ones past max_length 32 (so they are windowed)."""
    words = "the quick brown fox jumps over the lazy dog while numbers 3 1 2 7 sort into order".split()
    rows = [{"text": " ".join(words[(i + k) % len(words)] for k in range(4 + 9 * (i % 4)))} for i in range(n)]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_text_rows_train_every_token_as_the_models_own_next_token_loss(tmp_path, tiny_model_dir):
    """Continued pretraining through the `sft` stage: `text` rows (no prompt), long ones split into windows of
    max_length. The first step's logged loss, over every window in one batch, is the token mean of the model's own
    next-token NLL on each window by itself (its first token context only), and TRL's SFTTrainer given the same
    rows logs the same losses and ends with the same weights."""
    from prefopt.data.loaders import load_sft
    from prefopt.data.spec import DatasetSpec
    from prefopt.experiment import load_config
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.runtime.tracking import read_metrics
    from prefopt.sft.recipe import sft_examples
    from prefopt.stage import run_stage

    data = _text_rows(tmp_path, 8)
    tok = load_tokenizer(str(tiny_model_dir))
    examples, dropped = sft_examples(load_sft(DatasetSpec(path=str(data))).rows, tok, 32)
    assert dropped == 0 and len(examples) > 8  # the long rows became several windows
    assert all(len(e["prompt_ids"]) == 1 and len(e["prompt_ids"] + e["completion_ids"]) <= 32 for e in examples)
    model = load_causal_lm(str(tiny_model_dir), dtype="float32").eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            ids = e["prompt_ids"] + e["completion_ids"]
            logps = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            nll -= float(sum(logps[t - 1, ids[t]] for t in range(1, len(ids))))
            count += len(ids) - 1

    sec = {"model": str(tiny_model_dir), "dataset": {"path": str(data)}, "max_steps": 3, "learning_rate": 1e-3,
           "lr_scheduler_type": "constant", "per_device_train_batch_size": len(examples), "logging_steps": 1,
           "save_steps": 100, "max_length": 32}
    cfg = load_config(str(write_config(tmp_path, "sft", sec)))
    run_stage(cfg, "sft")
    ours = [r["loss"] for r in read_metrics(tmp_path / "runs" / "t" / "sft") if "loss" in r]
    assert ours[0] == pytest.approx(nll / count, abs=1e-5)
    theirs, trl_model = _trl_losses(cfg.sft, tiny_model_dir, data, tmp_path / "trl", cfg.seed)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(theirs), rtol=0, atol=5e-6)
    mine = state_dict(tmp_path / "runs" / "t" / "sft" / "model")
    for k, v in mine.items():
        torch.testing.assert_close(v, trl_model.state_dict()[k], rtol=0, atol=1e-6)
