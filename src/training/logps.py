"""Sequence log-probabilities and masked statistics.

`response_logps` is the one summed log-prob of (prompt, response) lists: evaluation (KL, best-of-n, suites), the
likelihood reward model and the reference checks call it, and it goes through the preference loop's own
`prefopt.training.forward.pair_logps` (chunked vocabulary projection, any attention), the function DPO, SimPO
and the likelihood reward model train through. PPO's per-token log-probs (`token_logps`), masked means and
whitening are here too, and the plain full-logits references (`completion_logps`, `sequence_logps`) the tests hold
every faster path to."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from prefopt.models import varlen
from prefopt.training.forward import pair_logps
from prefopt.training.padding import right_pad
from prefopt.training.prefix_tree import lay_down


def token_logps(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t] | ...) for each position, from logits already aligned with labels.

    logits: (B, T, V), labels: (B, T) -> (B, T). Dividing by the sampling temperature makes these the log-probs
    of the distribution the responses were actually sampled from (PPO needs that)."""
    if temperature != 1.0:
        logits = logits / temperature
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def completion_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs of the completion tokens of full sequences (prompt + completion).

    input_ids, attention_mask, completion_mask: (B, T); completion_mask is 1 on completion tokens.
    Returns (B, T-1): position t holds log p(input_ids[t+1]), zeroed where input_ids[t+1] is not completion."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]  # (B, T-1, V)
    labels = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    return token_logps(logits, labels, temperature) * mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n > 1:
            var = var * n / (n - 1)
    return var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; with shift_mean=False the mean is added back (reward whitening)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened


def sequence_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-prob and completion length of each sequence: (B,), (B,), from the model's full
    logits: the plain reference `pair_logps` is tested against."""
    per_token = completion_logps(model, input_ids, attention_mask, completion_mask)  # (B, T-1), 0 off-completion
    lengths = completion_mask[:, 1:].sum(-1).to(per_token.dtype)
    return per_token.sum(-1), lengths


def _device(model) -> torch.device:
    return next(model.parameters()).device


def response_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int = 0) -> dict[str, torch.Tensor]:
    """(prompt, response) pairs as `prefopt.training.forward.pair_logps` takes them (`collate`'s padded layout): each
    prompt + response right-padded to one row, and for each response token the flat index r*T + t of the position
    t whose logits predict it (`source_index`), the token (`target_ids`) and its row (`seq_index`).

    input_ids, attention_mask: (B, T); source_index, target_ids, seq_index: (N,), N response tokens in all. A
    response token at position 0 (an empty prompt) has no position predicting it and is left out."""
    B = len(prompt_ids)
    input_ids, attention_mask = right_pad([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], pad_id)
    T = input_ids.shape[1]
    source, target, seq = [], [], []
    for i, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        for k, tok in enumerate(r):
            if len(p) + k > 0:
                source.append(i * T + len(p) + k - 1)
                target.append(int(tok))
                seq.append(i)
    long = dict(dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "source_index": torch.tensor(source, **long),
            "target_ids": torch.tensor(target, **long), "seq_index": torch.tensor(seq, **long),
            "num_sequences": torch.tensor(B)}


def response_tree_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> dict:
    """`response_batch` as a prefix tree (prefopt.training.prefix_tree): the (prompt, response) sequences in one row
    (1, T) with their position ids and no padding, every prefix they share computed once (a prompt sampled n
    times, a template every prompt starts with), for a model that reads the tree from the position ids (varlen
    attention). Same keys, plus position_ids and num_tokens."""
    row = lay_down([(list(p) + list(r), [(len(p) + k - 1, int(tok), i) for k, tok in enumerate(r)])
                    for i, (p, r) in enumerate(zip(prompt_ids, response_ids))])
    source, target, seq = zip(*row["targets"]) if row["targets"] else ((), (), ())
    long = dict(dtype=torch.long)
    return {"input_ids": torch.tensor([row["ids"]], **long), "position_ids": torch.tensor([row["pos"]], **long),
            "source_index": torch.tensor(source, **long), "target_ids": torch.tensor(target, **long),
            "seq_index": torch.tensor(seq, **long), "num_sequences": torch.tensor(len(prompt_ids)),
            "num_tokens": torch.tensor(len(row["ids"]))}


@torch.no_grad()
def response_logps(model, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_id: int = 0, temperature: float = 1.0, batch_size: int = 16,
                   desc: str | None = None, chunk_size: int = 512, meter=None) -> list[float]:
    """log pi(y|x) = sum_t log pi(y_t | x, y_<t) for each (prompt ids, response ids) pair, as floats.

    Sequences are taken in the given order in fixed batches, so two models scored on the same lists see exactly
    the same batches; a model with SDPA or eager attention reads each batch as a prefix tree (switched to varlen
    attention for the call), so a prompt shared by a batch's responses is computed once; others right-padded.
    `temperature` divides the logits: pass the sampling temperature to get the log-probs of the distribution the
    responses came from (divided after any soft-capping, as the model's forward ends). Through the preference
    loop's vocabulary projection (`pair_logps`): the decoder runs once and only the positions that predict a
    response token are projected, `chunk_size` at a time, so the (B, T, V) float32 logits never exist (at a 256K
    vocabulary they do not fit beside a 9B model).
    `meter` (prefopt.training.throughput.Meter): each batch is timed and counted as its `forward` phase."""
    from tqdm.auto import tqdm

    if len(prompt_ids) != len(response_ids):
        raise ValueError("prompt_ids and response_ids differ in length")
    was_training = model.training
    model.eval()  # dropout off: log-probs must be deterministic
    device = _device(model)
    # A model that is not a transformers LM (no decoder / lm_head to reach, e.g. a test's stand-in) is run
    # padded, through its own forward, whole logits and all.
    projectable = hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")
    out: list[float] = []
    starts = range(0, len(prompt_ids), batch_size)
    with varlen.switched(model) if projectable else nullcontext(False) as tree:
        for s in tqdm(starts, desc=desc or "log-probs", disable=desc is None, leave=False):
            part = prompt_ids[s:s + batch_size], response_ids[s:s + batch_size]
            batch = response_tree_batch(*part) if tree else response_batch(*part, pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            with meter.timed("forward") if meter is not None else nullcontext():
                sums = (_batch_sums(model, batch, projectable, chunk_size, temperature) if batch["input_ids"].numel()
                        else torch.zeros(len(part[0])))  # nothing to read: empty prompts and responses
            if meter is not None:
                meter.count("forward", batch, meter.params(model)[0], attention=meter.attention(model))
            out += sums.float().cpu().tolist()
    model.train(was_training)
    return out


def _batch_sums(model, batch: dict, projectable: bool, chunk_size: int, temperature: float) -> torch.Tensor:
    if projectable:  # only the positions predicting a response token reach the vocabulary, in chunks
        return pair_logps(model, batch, chunk_size, temperature)[0]
    comp = torch.zeros_like(batch["input_ids"]).flatten()
    comp[batch["source_index"] + 1] = 1
    return completion_logps(model, batch["input_ids"], batch["attention_mask"], comp.view_as(batch["input_ids"]),
                            temperature).sum(-1)
