"""The transformers backend: batched `model.generate` with left padding, the KV cache, and the prompts' shared
tokens computed once.

    gen = TransformersGenerator("runs/quickstart/sft/model", batch_size=64)
    outs = gen.generate(prompts, Sampling(n=4, temperature=1.0, top_p=1.0, max_new_tokens=64, seed=0))

It also wraps a model already in memory (PPO's policy being trained): `TransformersGenerator(model, tokenizer)`.
The model is switched to eval mode while it generates and put back in the mode it was in.

Why each piece:
- left padding: a decoder continues from the last position, so every prompt must end at the same column;
  the attention mask (and the position ids transformers derives from it) make the padding invisible.
- the prompts' shared tokens computed once (`generation.prefill`): a batch's prompts are laid down as one prefix
  tree (SDPA and eager attention; else a batch of B prompts) and each sample row continues from its prompt's keys
  and values (transformers' `num_return_sequences` would compute a prompt n times, and each prompt its template);
  with the KV cache each new token costs one position, not the whole sequence.
- prompts are sorted by length before batching, so a batch holds prompts of similar length (less padding).
- each batch runs under its own seed, derived from (sampling.seed, batch index), inside `torch.random.fork_rng`:
  the same call gives the same candidates whatever ran before it, and the caller's RNG stream is left as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefopt.data.templates import encode_many
from prefopt.generation.base import Completion, Progress, Sampling, derive_seed
from prefopt.generation.kvcache import preallocated_cache


class TransformersGenerator:
    name = "transformers"

    def __init__(self, model_or_path: Any, tokenizer=None, batch_size: int = 64, dtype: str = "auto",
                 device: str | None = None, synced: bool = False, share_prompts: bool = True):
        import torch

        from prefopt.models.loading import load_causal_lm, load_tokenizer

        if isinstance(model_or_path, (str, Path)):
            self.path = str(model_or_path)
            self.model = load_causal_lm(self.path, dtype=dtype)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            self.model.to(device)
        else:
            self.model = model_or_path
            self.path = getattr(getattr(self.model, "config", None), "_name_or_path", "") or ""
            if device is not None:
                self.model.to(device)
        if tokenizer is None:
            if not self.path:
                raise ValueError("TransformersGenerator: pass the tokenizer with a model that has no path")
            tokenizer = load_tokenizer(self.path)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        # synced: the model is sharded (FSDP / ZeRO-3) and every forward pass is collective, so a process whose
        # batch has ended keeps stepping until all have (transformers' synced_gpus). Each process must make the
        # same number of generate calls.
        self.synced = synced
        # share_prompts: what the batch's prompts share is computed once (generation.prefill); False: transformers'
        # own prefill, each prompt n times (the same samples: tests/test_generation.py)
        self.share_prompts = share_prompts
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token")
        self.pad_id = int(pad)
        self.eos_ids = eos_token_ids(self.model, tokenizer)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def generate(self, prompts: list[str], sampling: Sampling, progress: Progress = None) -> list[list[Completion]]:
        import torch

        # One BOS whether the prompt text carries it (Llama-3 / Gemma-2 chat templates) or the tokenizer adds it:
        # the sequence the model was trained on.
        encoded = encode_many(prompts, self.tokenizer)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # stable: ties keep prompt order
        results: list[list[Completion] | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                for b, start in enumerate(range(0, len(order), self.batch_size)):
                    idx = order[start:start + self.batch_size]
                    outs = self._generate_batch([encoded[i] for i in idx], sampling, derive_seed(sampling.seed, b))
                    for i, comps in zip(idx, outs):
                        results[i] = comps
                    if progress is not None:
                        progress(len(idx), sum(len(c.token_ids) for comps in outs for c in comps))
        finally:
            self.model.train(was_training)
        return results  # type: ignore[return-value]

    def _generate_batch(self, batch: list[list[int]], sampling: Sampling, seed: int) -> list[list[Completion]]:
        import torch

        input_ids, attention_mask = left_pad(batch, self.pad_id)
        input_ids, attention_mask = input_ids.to(self.device), attention_mask.to(self.device)
        greedy = sampling.temperature == 0
        # Greedy search cannot return n different sequences: generate one and repeat it n times.
        n_gen = 1 if greedy else sampling.n
        config = self._generation_config(sampling, n_gen)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # the cache filled in place, not regrown every step: the same samples, ~10% less sampling time on CPU
        cache = preallocated_cache(self.model, input_ids.shape[1] + sampling.max_new_tokens)
        # (not when sharded: every process must make the same forward calls, and a batch of one-token prompts skips it)
        if self.share_prompts and cache is not None and input_ids.shape[1] > 1 and not self.synced:
            from prefopt.generation import prefill

            if prefill.can_tree(self.model):
                input_ids, attention_mask = prefill.tree_prefill(self.model, cache, input_ids, attention_mask, n_gen)
            elif n_gen > 1:
                input_ids, attention_mask = prefill.shared_prefill(self.model, cache, input_ids, attention_mask, n_gen)
            config.num_return_sequences = 1
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                      synced_gpus=self.synced, past_key_values=cache)
        new = out[:, input_ids.shape[1]:].tolist()  # (B * n_gen, new_tokens), right-padded after EOS
        completions = [self._completion(ids) for ids in new]
        per_prompt = [completions[i * n_gen:(i + 1) * n_gen] for i in range(len(batch))]
        if greedy:
            per_prompt = [[Completion(c[0].text, list(c[0].token_ids), c[0].finished) for _ in range(sampling.n)]
                          for c in per_prompt]
        return per_prompt

    def _generation_config(self, sampling: Sampling, n_gen: int):
        from transformers import GenerationConfig

        # A fresh config, not the checkpoint's generation_config: a checkpoint may carry its own temperature,
        # top_k or repetition penalty, and the candidates must follow exactly the sampling the run records.
        # top_k=0 turns off transformers' default top-k of 50 (vLLM has none either).
        kw: dict[str, Any] = dict(
            max_new_tokens=sampling.max_new_tokens,
            num_return_sequences=n_gen,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            use_cache=True,
        )
        if sampling.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        bos = getattr(self.model.generation_config, "bos_token_id", None)
        if bos is not None:
            kw["bos_token_id"] = bos
        return GenerationConfig(**kw)

    def _completion(self, ids: list[int]) -> Completion:
        """Cut a generated row at its first EOS (kept: it is part of the response), dropping the padding after."""
        finished = False
        for k, t in enumerate(ids):
            if t in self.eos_ids:
                ids, finished = ids[:k + 1], True
                break
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return Completion(text=text, token_ids=ids, finished=finished)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a response: the model's generation config may list several (Llama 3 does)."""
    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for v in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]) + [tokenizer.eos_token_id]:
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    if not ids:
        raise ValueError("neither the model nor the tokenizer names an EOS token")
    return ids


def left_pad(batch: list[list[int]], pad_id: int):
    """Token lists -> (input_ids, attention_mask), padded on the left to the longest. Shapes (B, T)."""
    import torch

    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, ids in enumerate(batch):
        if ids:
            input_ids[r, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[r, width - len(ids):] = 1
    return input_ids, mask
