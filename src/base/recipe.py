"""The `base` stage: a tokenizer and a small Llama built here, optionally pretrained on the experiment's text.

    prefopt base experiments/quickstart.yaml

No model can be downloaded on the CPU machines, so prefopt makes one: a byte-level BPE tokenizer trained on the
experiment's own text (pad/bos/eos and a chat template included), a Llama from a config whose size the YAML sets,
and optionally a short next-token pretraining on that text packed into fixed-length blocks. With `base.model` set
to a real checkpoint (a folder or a hub id) this stage builds nothing and later stages load that model, unless
its vocabulary is to be extended (`base.extend_vocab`, `base.new_tokens`; `extend` below, `models/vocab.py`):
then the extended copy is saved here and later stages load it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from prefopt.data.errors import DataError
from prefopt.data.records import read_records
from prefopt.data.templates import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, alpaca_prompt
from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
from prefopt.dist.process import seed_everything


def row_text(row) -> str:
    """One training document from a data row: an Alpaca row is rendered with its template, anything else joins
    its strings."""
    if isinstance(row, dict) and "instruction" in row:
        answer = row.get("output") or row.get("chosen") or ""
        return alpaca_prompt(row["instruction"], row.get("input", "")) + answer
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        return "\n".join(row_text(v) for v in row.values() if isinstance(v, (str, dict, list)))
    if isinstance(row, list):
        return "\n".join(row_text(v) for v in row)
    return ""


def corpus(paths: list[str]) -> list[str]:
    docs = [ALPACA_WITH_INPUT, ALPACA_NO_INPUT]  # the template's words always get tokens of their own
    for p in paths:
        docs += [row_text(row) for _, row in read_records(p)]
    return [d for d in docs if d]


def pack_blocks(token_lists: list[list[int]], block_size: int, eos_id: int) -> list[list[int]]:
    """Concatenate documents, each followed by EOS, and cut the stream into full blocks of `block_size` tokens
    (the remainder is dropped), as in GPT-style pretraining."""
    stream: list[int] = []
    for ids in token_lists:
        stream += ids + [eos_id]
    n = len(stream) // block_size
    return [stream[i * block_size:(i + 1) * block_size] for i in range(n)]


def pretrain(model, blocks: list[list[int]], steps: int, batch_size: int, lr: float, tracker, seed: int) -> float:
    """A plain next-token loop over packed blocks (AdamW, cosine decay). Returns the last loss."""
    import torch
    from tqdm.auto import tqdm

    data = torch.tensor(blocks)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    model.train()
    loss_value = float("nan")
    for step in (bar := tqdm(range(steps), desc="pretrain", unit="step")):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}")
        if step % 10 == 0 or step == steps - 1:
            tracker.log({"loss": loss_value, "learning_rate": sched.get_last_lr()[0]}, step=step)
    model.eval()
    return loss_value


def run(ctx) -> dict:
    sec = ctx.section
    if sec.as_named:
        return {"model": sec.model, "built": False}
    if sec.model:
        return extend(ctx, sec)
    seed_everything(ctx.seed)
    paths = [ctx.resolve(p, model=False) for p in sec.tokenizer_data]
    docs = corpus(paths)
    tok = build_tokenizer(docs, sec.vocab_size)
    seed_everything(ctx.seed)  # model init does not depend on how much randomness tokenizer training used
    model = build_tiny_llama(
        tok,
        hidden_size=sec.hidden_size,
        num_hidden_layers=sec.num_hidden_layers,
        num_attention_heads=sec.num_attention_heads,
        num_key_value_heads=sec.num_key_value_heads,
        intermediate_size=sec.intermediate_size,
        max_position_embeddings=sec.max_position_embeddings,
    )
    summary = {"built": True, "vocab_size": len(tok), "parameters": sum(p.numel() for p in model.parameters()),
               "documents": len(docs)}
    if sec.pretrain_steps > 0:
        ids = tok(docs, add_special_tokens=True)["input_ids"]
        blocks = pack_blocks(ids, sec.pretrain_block_size, tok.eos_token_id)
        if not blocks:
            raise ValueError(f"base: the text gives fewer than {sec.pretrain_block_size} tokens; lower "
                             "base.pretrain_block_size or add base.tokenizer_data")
        summary["pretrain_blocks"] = len(blocks)
        summary["pretrain_loss"] = pretrain(model, blocks, sec.pretrain_steps, sec.pretrain_batch_size,
                                            sec.pretrain_learning_rate, ctx.tracker, ctx.seed)
    out = save_model(model, tok, Path(ctx.dir) / "model")
    (Path(ctx.dir) / "tokenizer_sample.json").write_text(
        json.dumps({"text": docs[-1][:200], "tokens": tok.convert_ids_to_tokens(tok(docs[-1][:200])["input_ids"])},
                   ensure_ascii=False, indent=1))
    summary["model"] = str(out)
    return summary


def extend(ctx, sec) -> dict:
    """base.model with its vocabulary extended (`models.vocab`): learned BPE merges (`extend_vocab`, from
    `tokenizer_data`, a tenth of whose documents is held out to measure what the new tokens save) and whole-word
    tokens (`new_tokens`), embeddings grown to match; saved to `<run>/base/model` for the later stages."""
    import random

    from prefopt.config import ConfigError
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.models.vocab import VocabError, add_words, grow_embeddings, learn_merges

    seed_everything(ctx.seed)
    out = Path(ctx.dir) / "model"
    tok = load_tokenizer(sec.model)
    summary: dict = {"built": True, "extended_from": sec.model, "vocab_size_before": len(tok)}
    if sec.extend_vocab:
        docs = [row_text(row) for p in sec.tokenizer_data for _, row in read_records(ctx.resolve(p, model=False))]
        docs = [d for d in docs if d]
        if not docs:
            raise DataError(", ".join(sec.tokenizer_data), None, None, "no text to learn base.extend_vocab's tokens "
                            "from (base.tokenizer_data)")
        random.Random(ctx.seed).shuffle(docs)
        held = docs[:max(1, len(docs) // 10)] if len(docs) > 1 else []
        before = sum(len(ids) for ids in tok(held, add_special_tokens=False)["input_ids"]) if held else 0
        try:
            tok, learned = learn_merges(tok, docs[len(held):], sec.extend_vocab, out)
        except VocabError as e:
            raise ConfigError(f"base.extend_vocab: {sec.model}'s tokenizer: {e}") from None
        summary["tokens_learned"] = len(learned)
        if len(learned) < sec.extend_vocab:
            print(f"[base] {len(learned)} of base.extend_vocab={sec.extend_vocab} tokens learned: the text asks for "
                  "no more merges than the tokenizer has (add text in base.tokenizer_data for more)", flush=True)
        if held:
            after = sum(len(ids) for ids in tok(held, add_special_tokens=False)["input_ids"])
            summary.update(held_out_documents=len(held), held_out_tokens_before=before, held_out_tokens_after=after,
                           held_out_token_ratio=round(after / max(before, 1), 4))
            print(f"[base] {len(learned)} tokens learned from {len(docs) - len(held)} documents: the {len(held)} "
                  f"held-out documents take {after:,} tokens instead of {before:,} (x{after / max(before, 1):.3f})",
                  flush=True)
        sample = tok.convert_ids_to_tokens(tok(held[0][:200] if held else docs[0][:200])["input_ids"])
        (Path(ctx.dir) / "tokenizer_sample.json").write_text(json.dumps({"learned": learned[:50], "tokens": sample},
                                                                        ensure_ascii=False, indent=1))
    if sec.new_tokens:
        summary["words_added"] = len(add_words(tok, sec.new_tokens))
    model = load_causal_lm(sec.model)
    summary["rows_added"] = grow_embeddings(model, len(tok))
    summary.update(vocab_size=len(tok), parameters=sum(p.numel() for p in model.parameters()),
                   model=str(save_model(model, tok, out)))
    return summary
