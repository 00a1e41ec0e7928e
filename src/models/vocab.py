"""Vocabulary extension: new tokens for a trained tokenizer, and embeddings grown to match.

Two ways, both used by the `base` stage (`base.extend_vocab`, `base.new_tokens`) on a named model:

- `learn_merges(tokenizer, texts, n, folder)`: n tokens learned from text the tokenizer splits badly (another
  language's script, a domain's words), as Chinese-LLaMA extends LLaMA for Chinese. A BPE tokenizer of the same
  pipeline (normalizer, pre-tokenizer, byte-level or SentencePiece symbols) is trained on the text
  (`train_new_from_iterator`); its merges are walked in the order it learned them (most frequent first) and each
  one whose result the tokenizer lacks becomes a new vocabulary entry, with its merge appended **after** the
  tokenizer's own (and, for a SentencePiece-style BPE, the new script's characters the merge is made of); a
  candidate the extended tokenizer never emits on the text is dropped. BPE applies merges by rank, so every
  existing merge still wins: text the tokenizer already handled tokenizes to the same ids as before, and only
  pieces it left split are merged further.
- `add_words(tokenizer, words)`: whole strings as added tokens (matched before the tokenizer runs): domain words
  whose ids should be fixed, at the cost of splitting any word that contains one.

`grow_embeddings` gives the new ids embedding (and, untied, output) rows at the mean of the existing ones (Hewitt
2021, "Initializing new word embeddings for pretrained language models"): a random row would dominate the softmax
until trained, the mean starts the new token as the average prediction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable


class VocabError(ValueError):
    pass


def learn_merges(tokenizer, texts: Iterable[str], n: int, folder: str | Path):
    """`tokenizer` with up to `n` new BPE tokens learned from `texts`, written to `folder` (tokenizer files only)
    and loaded back from there, so its class, special tokens and chat template stay as they were. Returns the new
    tokenizer and the tokens added (their vocabulary strings, in the order learned).

    Twice n candidates are learned, then every one the extended tokenizer never emits on `texts` and no kept token
    is merged from is dropped: a merge whose pieces the old merges consume first never fires, and its token would
    be an embedding row no text reaches. The first n survivors are kept (in learned order, so each one's pieces
    come with it)."""
    from transformers import AutoTokenizer

    if not getattr(tokenizer, "is_fast", False):
        raise VocabError("needs a fast (tokenizers) tokenizer")
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") != "BPE":
        raise VocabError(f"learns BPE merges, but this tokenizer's model is {model.get('type')} (BPE tokenizers: "
                         "Llama, Mistral, Qwen, Gemma, Phi, GPT-2); use base.new_tokens to add whole words")
    vocab, merges = model["vocab"], model["merges"]
    as_lists = not merges or isinstance(merges[0], list)
    first_id = max(list(vocab.values()) + [t["id"] for t in data.get("added_tokens", [])]) + 1
    # A generous target: many of the new tokenizer's merges rebuild tokens the old one has already, and a
    # character-level BPE spends one entry per distinct character of the text before its first merge.
    texts = list(texts)
    alphabet = len(set().union(*map(set, texts))) if texts else 0
    fresh = tokenizer.train_new_from_iterator(texts, vocab_size=len(tokenizer) + 8 * n + alphabet)
    candidates = _candidates(set(vocab), json.loads(fresh.backend_tokenizer.to_str())["model"]["merges"], 2 * n)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)

    def write(entries: list[tuple[str, tuple[str, str] | None]]):
        path = folder / "tokenizer.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["model"]["vocab"] = {**vocab, **{t: first_id + i for i, (t, _) in enumerate(entries)}}
        saved["model"]["merges"] = merges + [list(m) if as_lists else " ".join(m) for _, m in entries if m]
        path.write_text(json.dumps(saved, ensure_ascii=False), encoding="utf-8")
        return AutoTokenizer.from_pretrained(folder)

    trial = write(candidates)
    emitted = {i for ids in trial(texts, add_special_tokens=False)["input_ids"] for i in ids if i >= first_id}
    keep: set[str] = set()
    for i in reversed(range(len(candidates))):  # a kept token keeps the pieces it is merged from
        token, merge = candidates[i]
        if first_id + i in emitted or token in keep:
            keep.add(token)
            keep.update(merge or ())
    final = [e for e in candidates if e[0] in keep][:n]
    return write(final), [t for t, _ in final]


def _candidates(known: set[str], merges: list, limit: int) -> list[tuple[str, tuple[str, str] | None]]:
    """New vocabulary entries from another BPE's merges, in the order it learned them: (token, its merge), or
    (character, None) for a symbol a merge needs that a SentencePiece-style BPE (Llama-2, Gemma: characters, byte
    fallback) lacks; a byte-level BPE has all 256 byte symbols already."""
    known, out = set(known), []
    for merge in merges:
        if len(out) >= limit:
            break
        a, b = merge if isinstance(merge, list) else merge.split(" ", 1)
        if a + b in known or any(c not in known and len(c) > 1 for c in (a, b)):
            continue  # already a token, or a piece of it is a token only the other BPE has (not taken)
        for c in dict.fromkeys((a, b)):
            if c not in known:
                out.append((c, None))
                known.add(c)
        out.append((a + b, (a, b)))
        known.add(a + b)
    return out


def add_words(tokenizer, words: list[str]) -> list[str]:
    """Add whole strings as tokens (those not already one token); returns the ones added."""
    new = [w for w in dict.fromkeys(words) if w not in tokenizer.get_vocab()]
    tokenizer.add_tokens(new)
    return new


def grow_embeddings(model, size: int) -> int:
    """Resize the model's embeddings (and an untied output layer) to `size` rows, new rows at the mean of the old
    ones. Returns how many rows were added."""
    import torch

    old = model.get_input_embeddings().weight.shape[0]
    if size <= old:
        return 0
    model.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old:] = emb[:old].mean(0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight.data_ptr() != emb.data_ptr():
            out.weight[old:] = out.weight[:old].mean(0, keepdim=True)
    return size - old


def extend_vocabulary(tokenizer, model, new_tokens: list[str]) -> int:
    """Add whole-string tokens to a tokenizer and grow the model's embeddings to match (mean-initialised rows).
    Returns the number of tokens added."""
    added = add_words(tokenizer, new_tokens)
    if added:
        grow_embeddings(model, len(tokenizer))
    return len(added)
