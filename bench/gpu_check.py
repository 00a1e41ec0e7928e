"""The GPU check (issue 22, item 7): prefopt's own functions on a ~1B Llama-3 and a ~1B Gemma-2, one GPU, < 8 min.

    bash bench/gpu_check.sh            # one H100/H200, bf16 (the shell script's header says how to bring TRL)
    bash bench/gpu_check.sh --tiny     # the same code on CPU at tiny sizes, fp32, in seconds (tests/test_gpu_check.py)

Nothing is downloaded. A byte-level BPE is trained here on docs/*.md (prefopt.models.loading.build_tokenizer: about 4,600
tokens at full size) and padded with reserved added tokens (`<|reserved_N|>`, as Llama-3 reserves special tokens)
to each family's real vocabulary, so the lm_head and the log-softmax are as large as in the real models: Llama-3
128,256, Gemma-2 256,000. A reserved token decodes to its own text and encodes back to itself, so sampled
responses keep their length through text. Models are random-init from their transformers config classes after
`transformers.set_seed`, built on the device:

  llama    Llama-3.2-1B's shape: hidden 2048, 16 layers, GQA 32 query / 8 key-value heads, MLP 8192, tied
           embeddings, rope theta 500000: 1.24B parameters; SDPA attention (what transformers picks)
  gemma2   Gemma-2 at ~1B: hidden 2048, 10 layers, 8 query / 4 key-value heads of 256, MLP 8192, vocab 256000,
           tied: 1.15B; eager attention, attention soft-cap 50 and final-logit soft-cap 30, sliding window on
           alternate layers, the window 128 (Gemma-2's is 4096; here it must be shorter than the sequences to bite)
  reward   a Llama-3-shape LlamaForSequenceClassification (one label) on the Llama tokenizer; it reads the text

Sections, each timed, guarded (an error is printed and recorded, the rest still run) and cut off by a per-section
alarm and the total wall-time budget:

  setup, reward_model
  <family>/build        the model in bf16 (fp32 with --tiny)
  <family>/generate     candidates from the transformers backend (prefopt.generation.hf; vLLM is absent there),
                        the prompts prefilled once, against transformers' own prefill (speed, same samples)
  <family>/score        the reward model's scores (prefopt.scoring.scorer.ClassifierScorer)
  <family>/pairs        best vs worst per prompt (prefopt.pairs.strategies), tokenized as the stages do
  <family>/parity       summed completion log-probs of every layout (prefopt.preference.batching.collate /
                        pair_logps), with the model's own attention and masks and, `<layout>+loop`, the packed
                        layouts as the loop runs them (varlen attention, no masks), against the padded layout and
                        against log_softmax(model(ids).logits) of each sequence alone, in the run's dtype (and in
                        fp32 on the GPU)
  <family>/dpo_<layout>, <family>/simpo_<layout>
                        optimizer steps through collate, pair_logps and dpo_loss / simpo_loss (reference log-probs
                        precomputed by prefopt.preference.reference.compute), each layout from the same weights
  <family>/trl_dpo      TRL's DPOTrainer (live reference) on the same model, pairs, batch and steps; skipped with a
                        printed line when trl does not import
  ppo                   PPO iterations through prefopt.ppo.rollout.collect and prefopt.ppo.recipe.ppo_update (the
                        two calls of each iteration of the recipe's `train`, which also writes a resumable
                        checkpoint each run, ~28 GB of fp32 state at 1B: not what a timing check should spend its
                        minutes on); policy, reference and value model in fp32 as the recipe loads them

Per section: wall seconds, tokens/s, peak memory (torch.cuda.max_memory_allocated; on CPU the process's peak RSS).
The JSON summary goes to $OUT/gpu_check.json when $OUT is set, else runs/gpu_check.json (--out overrides), and is
rewritten after every section, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import resource
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "gemma2")
LAYOUTS = ("padded", "packed", "shared_prompt", "prefix_tree")
FAMILY_SECTIONS = ("build", "generate", "score", "pairs", "parity",
                   *(f"{m}_{lay}" for m in ("dpo", "simpo") for lay in LAYOUTS), "trl_dpo")
SECTIONS = ("setup", "reward_model", *(f"{f}/{s}" for f in FAMILIES for s in FAMILY_SECTIONS), "ppo")
FP32_ATOL, FP32_RTOL = 1e-5, 1e-6
INSTRUCTIONS = [
    "Summarise the following text in two sentences.",
    "List the main points of the text below.",
    "Explain the following passage to a new engineer.",
    "Write one question a reader could ask about this text, and answer it.",
    "Rewrite the text below more briefly.",
    "What is the most important number in this text, and why?",
]


@dataclass
class Size:
    """Everything the two modes differ in."""

    device: str
    dtype: torch.dtype
    bpe_vocab: int
    vocab: dict
    llama: dict
    gemma2: dict
    prompts: int
    input_chars: int
    candidates: int
    max_new_tokens: int
    gen_batch: int
    batch: int
    """Pairs per DPO / SimPO / TRL step."""
    steps: int
    max_length: int
    chunk_size: int
    lr: float
    ppo: dict
    budget_s: float
    section_s: float


TINY = Size(
    device="cpu", dtype=torch.float32, bpe_vocab=400, vocab={"llama": 512, "gemma2": 768},
    llama=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=128),
    gemma2=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                intermediate_size=128, sliding_window=16),
    prompts=6, input_chars=60, candidates=3, max_new_tokens=12, gen_batch=8, batch=3, steps=2, max_length=256,
    chunk_size=16, lr=1e-3, ppo=dict(iterations=2, rollout=4, mini=2, epochs=1, max_new_tokens=8),
    budget_s=120, section_s=60,
)
GPU = Size(
    device="cuda", dtype=torch.bfloat16, bpe_vocab=8000, vocab={"llama": 128256, "gemma2": 256000},
    llama=dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
    gemma2=dict(hidden_size=2048, num_hidden_layers=10, num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                intermediate_size=8192, sliding_window=128),
    prompts=64, input_chars=600, candidates=4, max_new_tokens=128, gen_batch=64, batch=16, steps=8,
    max_length=1024, chunk_size=512, lr=1e-6, ppo=dict(iterations=3, rollout=16, mini=8, epochs=1, max_new_tokens=64),
    budget_s=420, section_s=150,
)


# ------------------------------------------------------------------------------------------------ the harness


class Skip(Exception):
    """A section that cannot run here (a missing package, a failed prerequisite): recorded, not an error."""


class SectionTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise SectionTimeout("the section ran past its time limit")


@dataclass
class Run:
    size: Size
    mode: str
    out_path: Path
    start: float = field(default_factory=time.perf_counter)
    sections: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def remaining(self) -> float:
        return self.size.budget_s - (time.perf_counter() - self.start)

    def section(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        """Run fn() -> figures under a timer and an alarm; record ok / error / skipped / refused, never raise."""
        missing = [n for n in needs if self.sections.get(n, {}).get("status") != "ok"]
        limit = min(self.size.section_s, self.remaining())
        rec: dict = {}
        t0 = time.perf_counter()
        if missing:
            rec = {"status": "skipped", "reason": f"needs {', '.join(missing)}"}
        elif self.remaining() < 1:
            rec = {"status": "skipped", "reason": f"total budget of {self.size.budget_s:.0f} s spent"}
        else:
            reset_peak(self.size.device)
            signal.setitimer(signal.ITIMER_REAL, limit)
            try:
                try:
                    figures = fn()
                finally:  # disarmed before any clean-up below, which may itself take a while (gc in a big process)
                    signal.setitimer(signal.ITIMER_REAL, 0)
                rec = {"status": "ok", **figures}
            except Skip as e:
                rec = {"status": "skipped", "reason": str(e)}
            except Exception as e:  # noqa: BLE001 - one section's failure must not stop the others
                # a layout the attention implementation cannot take is refused by design (LayoutError: config error)
                status = "refused" if getattr(e, "kind", "") == "config error" else "error"
                rec = {"status": status, "error": f"{type(e).__name__}: {e}"[:600]}
                if status == "error":
                    print(f"[gpu_check] {name} FAILED:\n" + "".join(traceback.format_exc().splitlines(True)[-12:]),
                          flush=True)
                del e
                free(self.size.device)  # what the failed section held (after an out-of-memory error, say)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            rec["peak_mem_mib"] = peak_mib(self.size.device)
        rec["wall_s"] = round(time.perf_counter() - t0, 3)
        self.sections[name] = rec
        print(f"[gpu_check] {name:28s} {rec['status']:8s} {rec['wall_s']:7.1f} s  {brief(rec)}", flush=True)
        self.write()

    def write(self) -> None:
        data = {"mode": self.mode, **self.meta, "budget_s": self.size.budget_s,
                "wall_s": round(time.perf_counter() - self.start, 3), "sections": self.sections,
                "summary": summary(self.sections)}
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.out_path.with_suffix(".json.partial")
        tmp.write_text(json.dumps(data, indent=1, default=lambda o: float(o) if hasattr(o, "__float__") else str(o))
                       + "\n")
        os.replace(tmp, self.out_path)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device: str) -> float:
    """Peak GPU memory allocated since the section began; on CPU the process's peak RSS (which never goes down)."""
    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def brief(rec: dict) -> str:
    if rec["status"] != "ok":
        return rec.get("reason") or rec.get("error", "")
    keys = ("tokens_per_s", "mfu", "mfu_with_attention", "params_m", "pairs", "max_abs_vs_padded",
            "max_abs_vs_reference", "ratio_tokens_per_s", "rollout_tokens_per_s")
    return "  ".join(f"{k}={fmt(rec[k])}" for k in keys if k in rec)


def fmt(v) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {fmt(x)}" for k, x in v.items()) + "}"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.2f}"
    return str(v)


# ------------------------------------------------------------------------------------------------ models and data


def corpus() -> list[str]:
    """Paragraphs of the repository's docs: the tokenizer's training text and the prompts' inputs."""
    paras = []
    for path in sorted((REPO / "docs").glob("*.md")):
        paras += [p.strip() for p in path.read_text().split("\n\n") if len(p.strip()) > 80]
    return paras


def family_tokenizer(texts: list[str], size: Size, family: str):
    """prefopt's byte-level BPE, padded with reserved added tokens to the family's vocabulary size."""
    from prefopt.models.loading import build_tokenizer

    tok = build_tokenizer(texts, vocab_size=size.bpe_vocab)
    base = len(tok)
    tok.add_tokens([f"<|reserved_{i}|>" for i in range(size.vocab[family] - base)])
    assert len(tok) == size.vocab[family], (len(tok), size.vocab[family])
    return tok, base


def build_model(kind: str, tok, size: Size, seed: int, dtype: torch.dtype | None = None):
    """A random-init model from its config class, built on the device in `dtype` (default: the run's)."""
    import transformers
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM, \
        LlamaForSequenceClassification

    ids = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    if kind == "gemma2":
        config = Gemma2Config(**ids, **size.gemma2, query_pre_attn_scalar=size.gemma2["head_dim"],
                              final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                              max_position_embeddings=8192, attn_implementation="eager")
        cls = Gemma2ForCausalLM
    else:
        config = LlamaConfig(**ids, **size.llama, max_position_embeddings=8192, rope_theta=500000.0,
                             num_labels=1)
        cls = LlamaForSequenceClassification if kind == "reward" else LlamaForCausalLM
    transformers.set_seed(seed)
    with torch.device(size.device):
        model = cls(config)
    return model.to(dtype or size.dtype)


def make_prompts(size: Size, paras: list[str]) -> list[str]:
    from prefopt.data.templates import alpaca_prompt

    return [alpaca_prompt(INSTRUCTIONS[i % len(INSTRUCTIONS)], paras[(7 * i) % len(paras)][:size.input_chars])
            for i in range(size.prompts)]


def pair_tokens(ex: dict, max_length: int) -> int:
    """Tokens of a pair as two sequences (prompt + chosen, prompt + rejected), after collate's truncation: the
    work a step is asked to do whatever the layout (shared_prompt and prefix_tree compute a shared prompt once, so
    they get more tokens per second for the same work)."""
    p = len(ex["prompt_ids"])
    room = max_length - p
    return 2 * p + len(ex["chosen_ids"][:room]) + len(ex["rejected_ids"][:room])


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------ sections


def setup(run: Run) -> dict:
    paras = corpus()
    run.state["prompts"] = make_prompts(run.size, paras)
    figures = {"corpus_paragraphs": len(paras), "prompts": len(run.state["prompts"])}
    for family in FAMILIES:
        tok, base = family_tokenizer(paras, run.size, family)
        run.state[f"{family}/tok"] = tok
        figures[f"{family}_vocab"] = len(tok)
        figures["bpe_vocab"] = base
    return figures


def reward_model(run: Run) -> dict:
    from prefopt.scoring.scorer import ClassifierScorer

    tok = run.state["llama/tok"]
    rm = build_model("reward", tok, run.size, seed=2).eval()
    run.state["rm"] = ClassifierScorer(rm, tok)
    return {"params_m": sum(p.numel() for p in rm.parameters()) / 1e6}


def build(run: Run, family: str) -> dict:
    tok = run.state[f"{family}/tok"]
    model = build_model(family, tok, run.size, seed=FAMILIES.index(family))
    run.state[f"{family}/model"] = model
    return {"params_m": sum(p.numel() for p in model.parameters()) / 1e6, "dtype": str(run.size.dtype),
            "attn_implementation": model.config._attn_implementation, "vocab": model.config.vocab_size}


def generate(run: Run, family: str) -> dict:
    from prefopt.generation.base import Sampling
    from prefopt.generation.factory import resolve_backend
    from prefopt.generation.hf import TransformersGenerator

    size = run.size
    gen = TransformersGenerator(run.state[f"{family}/model"], tokenizer=run.state[f"{family}/tok"],
                                batch_size=size.gen_batch)
    prompts = run.state["prompts"]
    sampling = Sampling(n=size.candidates, temperature=1.0, top_p=1.0, max_new_tokens=size.max_new_tokens, seed=0)
    own = TransformersGenerator(gen.model, tokenizer=gen.tokenizer, batch_size=size.gen_batch, share_prompts=False)

    def timed_generate(g):
        sync(size.device)
        t0 = time.perf_counter()
        result = g.generate(prompts, sampling)
        sync(size.device)
        return result, time.perf_counter() - t0

    outs, wall = timed_generate(gen)  # the prompts prefilled once (generation.prefill)
    own_outs, own_wall = timed_generate(own)  # transformers' own prefill: each prompt n times
    run.state[f"{family}/candidates"] = outs
    tokens = sum(len(c.token_ids) for comps in outs for c in comps)
    own_tokens = sum(len(c.token_ids) for comps in own_outs for c in comps)
    same = sum(a.token_ids == b.token_ids for x, y in zip(outs, own_outs) for a, b in zip(x, y))
    return {"backend": "transformers", "auto_backend_here": resolve_backend("auto"), "prompts": len(prompts),
            "candidates": sum(len(c) for c in outs), "generated_tokens": tokens,
            "tokens_per_s": tokens / wall, "finished": sum(c.finished for comps in outs for c in comps),
            # the same call with transformers' prefill: its speed, and how many samples came out the same (all
            # in fp32 on CPU; in bf16 a rounding difference in the prompt's last logits can change a draw)
            "tokens_per_s_own_prefill": own_tokens / own_wall, "seconds_ratio_to_own_prefill": wall / own_wall,
            "same_samples_as_own_prefill": same}


def score(run: Run, family: str) -> dict:
    from prefopt.data.templates import encode
    from prefopt.scoring.scorer import reward_text

    scorer = run.state["rm"]
    outs = run.state[f"{family}/candidates"]
    prompts = [p for p, comps in zip(run.state["prompts"], outs) for _ in comps]
    responses = [c.text for comps in outs for c in comps]
    sync(run.size.device)
    t0 = time.perf_counter()
    scores = scorer.score(prompts, responses, batch_size=run.size.gen_batch, max_length=run.size.max_length)
    sync(run.size.device)
    wall = time.perf_counter() - t0
    tokens = sum(len(encode(reward_text(p, r, scorer.tokenizer.eos_token), scorer.tokenizer, truncation=True,
                            max_length=run.size.max_length)) for p, r in zip(prompts, responses))
    run.state[f"{family}/scores"] = scores
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("a reward score is not finite")
    return {"texts": len(scores), "tokens": tokens, "tokens_per_s": tokens / wall,
            "score_mean": sum(scores) / len(scores), "score_min": min(scores), "score_max": max(scores)}


def pairs(run: Run, family: str) -> dict:
    from prefopt.pairs.strategies import select_pairs
    from prefopt.preference.data import tokenize_pairs

    outs, scores = run.state[f"{family}/candidates"], run.state[f"{family}/scores"]
    rows, k = [], 0
    for prompt, comps in zip(run.state["prompts"], outs):
        s, texts = scores[k:k + len(comps)], [c.text for c in comps]
        k += len(comps)
        for i, j in select_pairs("best_vs_worst", s, margin=0.0, texts=texts):
            rows.append({"prompt": prompt, "chosen": texts[i], "rejected": texts[j]})
    examples = tokenize_pairs(rows, run.state[f"{family}/tok"], run.size.max_length)
    if len(examples) < run.size.batch:
        raise ValueError(f"{len(examples)} pairs, fewer than one batch of {run.size.batch}")
    run.state[f"{family}/rows"], run.state[f"{family}/examples"] = rows, list(examples)
    n = len(examples)
    return {"pairs": n, "prompt_tokens_mean": sum(len(e["prompt_ids"]) for e in examples) / n,
            "chosen_tokens_mean": sum(len(e["chosen_ids"]) for e in examples) / n,
            "rejected_tokens_mean": sum(len(e["rejected_ids"]) for e in examples) / n,
            "pair_tokens_mean": sum(pair_tokens(e, run.size.max_length) for e in examples) / n}


@contextmanager
def as_the_loop_runs(model, layout: str):
    """The model's attention as the preference loop sets it for `layout` (prefopt.preference.loop.packed_varlen:
    varlen attention for the packed layouts on SDPA and eager), restored after; yields collate's `masks`."""
    from prefopt.models import varlen
    from prefopt.preference.loop import packed_varlen
    from prefopt.training.forward import attention_implementation, reads_position_ids

    base = attention_implementation(model)
    packed_varlen(model, layout)
    try:
        yield not reads_position_ids(model)
    finally:
        if attention_implementation(model) == varlen.VARLEN:
            varlen.restore(model, base)


@torch.no_grad()
def layout_sums(model, examples: list[dict], pad_id: int, size: Size, layout: str, loop: bool = False) -> torch.Tensor:
    """pair_logps' summed completion log-probs (2B,): chosen of every pair, then rejected. loop: with the attention
    the preference loop runs the layout with (varlen for the packed layouts), else the model's own with masks."""
    from prefopt.preference.batching import collate
    from prefopt.training.forward import pair_logps

    with as_the_loop_runs(model, layout) if loop else nullcontext(True) as masks:
        batch = to_device(collate(examples, pad_id, size.max_length, layout, masks), size.device)
        sums, _ = pair_logps(model, batch, size.chunk_size)
    return sums.float().cpu()


@torch.no_grad()
def reference_sums(model, examples: list[dict], size: Size) -> torch.Tensor:
    """The same sums from the model's own forward on each sequence alone: log_softmax(model(ids).logits)."""
    out = []
    for key in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            p = ex["prompt_ids"]
            ids = torch.tensor([p + ex[key][:size.max_length - len(p)]], device=size.device)
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), dim=-1)
            out.append(logp.gather(-1, ids[0, 1:, None])[len(p) - 1:, 0].sum().cpu())
    return torch.stack(out)


def parity_figures(model, examples: list[dict], pad_id: int, size: Size) -> dict:
    ref = reference_sums(model, examples, size)
    sums, errors = {}, {}
    # each layout with the model's own attention and masks, and the packed ones as the loop runs them (varlen)
    for name, layout, loop in [(lay, lay, False) for lay in LAYOUTS] + [
            (f"{lay}+loop", lay, True) for lay in LAYOUTS if lay != "padded"]:
        try:
            sums[name] = layout_sums(model, examples, pad_id, size, layout, loop)
        except Exception as e:  # noqa: BLE001 - a refused or broken layout is a figure of its own
            errors[name] = f"{type(e).__name__}: {e}"[:300]
    out = {"max_abs_vs_reference": {lay: float((s - ref).abs().max()) for lay, s in sums.items()},
           "max_rel_vs_reference": {lay: float(((s - ref).abs() / ref.abs()).max()) for lay, s in sums.items()},
           "max_abs_sum": float(ref.abs().max())}
    if "padded" in sums:
        out["max_abs_vs_padded"] = {lay: float((s - sums["padded"]).abs().max()) for lay, s in sums.items()
                                    if lay != "padded"}
    # fp32: the conformance suite's tolerance (tests/test_architectures.py), |a - b| <= 1e-5 + 1e-6 |b|: a sum of
    # ~100 nats is ~1e-5 from another summation order by float32 rounding alone (its spacing there is 7.6e-6)
    out["within_fp32_tolerance"] = all(
        bool(torch.allclose(s, other, atol=FP32_ATOL, rtol=FP32_RTOL))
        for lay, s in sums.items() for other in (ref, sums.get("padded", ref))) and not errors
    if errors:
        out["layout_errors"] = errors
    return out


def parity(run: Run, family: str) -> dict:
    model, tok = run.state[f"{family}/model"], run.state[f"{family}/tok"]
    examples = run.state[f"{family}/examples"][:run.size.batch]
    model.eval()
    out = {"pairs": len(examples), "dtype": str(run.size.dtype),
           **parity_figures(model, examples, tok.pad_token_id, run.size)}
    if run.size.dtype != torch.float32:
        out.pop("within_fp32_tolerance")
    if run.size.dtype != torch.float32:  # the conformance tolerance (1e-5) is stated in fp32: measure it too
        model.float()
        try:
            out["fp32"] = parity_figures(model, examples, tok.pad_token_id, run.size)
        finally:
            model.to(run.size.dtype)  # fp32 -> bf16 of weights that were bf16 is exact
    return out


def snapshot(run: Run, family: str) -> dict:
    """The family's initial weights (on the device), restored before every training section."""
    key = f"{family}/snapshot"
    if key not in run.state:
        run.state[key] = {k: v.detach().clone() for k, v in run.state[f"{family}/model"].state_dict().items()}
    return run.state[key]


def train_section(run: Run, family: str, method: str, layout: str) -> dict:
    """`steps` optimizer steps of DPO or SimPO in `layout` from the initial weights, as the preference loop does
    each one: the loop's attention for the layout (varlen for the packed ones on SDPA and eager), collate,
    pair_logps (chunked lm_head), the pure loss, backward, clip to 1.0, AdamW."""
    with as_the_loop_runs(run.state[f"{family}/model"], layout) as masks:
        return _train_section(run, family, method, layout, masks)


def _train_section(run: Run, family: str, method: str, layout: str, masks: bool) -> dict:
    from prefopt.dpo.loss import dpo_loss
    from prefopt.preference.batching import collate
    from prefopt.training.forward import pair_logps
    from prefopt.preference.loop import PairLogps, disable_dropout
    from prefopt.preference.reference import compute
    from prefopt.simpo.loss import simpo_loss
    from prefopt.training import throughput

    size, model, tok = run.size, run.state[f"{family}/model"], run.state[f"{family}/tok"]
    model.load_state_dict(snapshot(run, family))
    disable_dropout(model)
    examples = [dict(e) for e in run.state[f"{family}/examples"]]
    batches = [examples[i:i + size.batch] for i in range(0, len(examples), size.batch)]
    used = [batches[s % len(batches)] for s in range(size.steps)]
    ref_s = 0.0
    if method == "dpo":  # the reference: one no-grad pass over the pairs (the initial policy), as `dpo` precomputes
        seen = [e for b in batches[:min(size.steps, len(batches))] for e in b]
        sync(size.device)
        t0 = time.perf_counter()
        logps = compute(model, seen, tok.pad_token_id, size.max_length, size.batch, layout, size.chunk_size,
                        device=size.device)
        sync(size.device)
        ref_s = time.perf_counter() - t0
        for e, (c, r) in zip(seen, logps.tolist()):
            e["ref_logps"] = [c, r]
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=size.lr)
    # MFU as the stages report it (perf/*), over a matrix-product probe in the run's dtype on this device
    meter = throughput.Meter(throughput.probe_peak_tflops(size.device, size.dtype))
    counts, shape = throughput.param_counts(model), throughput.attention_shape(model)
    losses, step_s, positions = [], [], 0
    for part in used:
        sync(size.device)
        t0 = time.perf_counter()
        batch = to_device(collate(part, tok.pad_token_id, size.max_length, layout, masks), size.device)
        pi = PairLogps.split(*pair_logps(model, batch, size.chunk_size))
        if method == "dpo":
            ref = batch["ref_logps"]
            loss, _ = dpo_loss(pi.chosen, pi.rejected, ref[:, 0], ref[:, 1], beta=0.1)
        else:
            loss, _ = simpo_loss(pi.chosen, pi.rejected, pi.chosen_lengths, pi.rejected_lengths, beta=2.0,
                                 gamma_beta_ratio=0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        sync(size.device)
        step_s.append(time.perf_counter() - t0)
        positions += batch["input_ids"].numel()
        meter.count("train", batch, *counts, shape)
    meter.phases["train"].seconds = sum(step_s)
    perf = meter.summary()
    del opt
    model.eval()
    tokens = sum(pair_tokens(e, size.max_length) for b in used for e in b)
    later = sum(pair_tokens(e, size.max_length) for b in used[1:] for e in b)
    pairs_done = sum(len(b) for b in used)
    out = {"steps": len(used), "pairs_per_step": size.batch, "tokens": tokens,
           "tokens_per_s": tokens / sum(step_s), "samples_per_s": pairs_done / sum(step_s),
           "computed_positions": positions, "loss_first": losses[0], "loss_last": losses[-1],
           "step_s_first": step_s[0], "train_s": sum(step_s), "peak_tflops": perf["perf/peak_tflops"],
           "mfu": perf["perf/mfu"], "mfu_with_attention": perf["perf/mfu_with_attention"]}
    if len(used) > 1:  # without the first step (allocator growth, kernel choice)
        out["tokens_per_s_after_first"] = later / sum(step_s[1:])
    if method == "dpo":
        out["reference_s"] = ref_s
        # what TRL's figure is compared with: the reference pass and every step, per pair trained on
        out["samples_per_s_with_reference"] = pairs_done / (sum(step_s) + ref_s)
        out["tokens_per_s_with_reference"] = tokens / (sum(step_s) + ref_s)
    return out


def reset_accelerate() -> None:
    """TRL's Trainer and PPO's Accelerator each set accelerate's process-wide state (mixed precision differs)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def trl_dpo(run: Run, family: str) -> dict:
    """TRL's DPOTrainer (live reference model) on the same initial weights, pairs, batch, steps, beta and lr."""
    try:
        import trl
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except Exception as e:  # noqa: BLE001 - absent on the GPU machine unless its wheels were carried
        raise Skip(f"trl does not import ({type(e).__name__}: {e}); bring it as wheels (bench/gpu_check.sh header)")
    size, model, tok = run.size, run.state[f"{family}/model"], run.state[f"{family}/tok"]
    model.load_state_dict(snapshot(run, family))
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    reset_accelerate()
    cuda = size.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, report_to="none", beta=0.1, learning_rate=size.lr, max_steps=size.steps,
                         lr_scheduler_type="constant", max_grad_norm=1.0, per_device_train_batch_size=size.batch,
                         max_length=size.max_length, bf16=cuda, use_cpu=not cuda, gradient_checkpointing=False,
                         save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0, disable_tqdm=True,
                         warmup_steps=0, weight_decay=0.01)
        trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(
            run.state[f"{family}/rows"]), processing_class=tok)
        sync(size.device)
        t0 = time.perf_counter()
        trainer.train()
        sync(size.device)
        wall = time.perf_counter() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer, ref
    reset_accelerate()
    examples = run.state[f"{family}/examples"]
    pairs_done = size.steps * size.batch
    tokens = pairs_done * sum(pair_tokens(e, size.max_length) for e in examples) / len(examples)  # epochs: mean
    ours = run.sections.get(f"{family}/dpo_prefix_tree", {})
    out = {"trl": trl.__version__, "steps": size.steps, "train_s": wall, "samples_per_s": pairs_done / wall,
           "tokens_per_s": tokens / wall, "loss_first": losses[0] if losses else float("nan")}
    if ours.get("status") == "ok":  # prefopt's default: prefix_tree, reference precomputed (its time counted)
        ours_rate = ours["samples_per_s_with_reference"]
        out["prefopt_samples_per_s_with_reference"] = ours_rate
        out["ratio_tokens_per_s"] = ours_rate / out["samples_per_s"]
    return out


def ppo(run: Run) -> dict:
    """PPO iterations through the recipe's own two calls: collect (sample, score, log-probs, values, GAE) and
    ppo_update (clipped policy and value losses, AdamW), with the recipe's models: policy, reference and value
    model in fp32 (load_models), the reward model as load_scorer gives it (bf16 on a GPU)."""
    from prefopt.generation.base import Sampling
    from prefopt.generation.hf import TransformersGenerator
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.loss import FixedKLController
    from prefopt.ppo.recipe import make_accelerator, ppo_update, rollout_metrics
    from prefopt.ppo.rollout import ValueModel, collect, reward_model_scorer

    size, p = run.size, run.size.ppo
    tok, scorer = run.state["llama/tok"], run.state["rm"]
    cfg = PPOConfig(policy="built here", reward_model="built here", rollout_batch_size=p["rollout"],
                    mini_batch_size=p["mini"], ppo_epochs=p["epochs"], max_new_tokens=p["max_new_tokens"],
                    total_episodes=p["iterations"] * p["rollout"], learning_rate=size.lr * 3,
                    value_learning_rate=size.lr * 10)
    policy = build_model("llama", tok, size, seed=0, dtype=torch.float32)
    ref = copy.deepcopy(policy).requires_grad_(False)
    value = ValueModel(copy.deepcopy(scorer.model).float().requires_grad_(True))
    for m in (policy, ref, value):
        m.eval()  # as train(): dropout off, the update's log-probs are the rollout's
    reset_accelerate()
    accelerator = make_accelerator()
    generator = TransformersGenerator(policy, tokenizer=tok, batch_size=cfg.rollout_batch_size)
    score_fn = reward_model_scorer(scorer, batch_size=cfg.mini_batch_size, max_length=size.max_length)
    opt_p = torch.optim.AdamW(policy.parameters(), lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    opt_v = torch.optim.AdamW(value.parameters(), lr=cfg.value_learning_rate, eps=1e-5, weight_decay=0.0)
    kl_ctl = FixedKLController(cfg.kl_coef)
    prompts = run.state["prompts"]
    iters = []
    for it in range(1, p["iterations"] + 1):
        batch_prompts = [prompts[(it * cfg.rollout_batch_size + i) % len(prompts)]
                         for i in range(cfg.rollout_batch_size)]
        sampling = Sampling(n=1, temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens,
                            seed=it)
        sync(size.device)
        t0 = time.perf_counter()
        ro = collect(policy, ref, value, tok, generator, score_fn, batch_prompts, sampling, kl_ctl.value, cfg)
        sync(size.device)
        t1 = time.perf_counter()
        m = rollout_metrics(ro, kl_ctl.value)
        m.update(ppo_update(policy, value, opt_p, opt_v, ro, cfg, torch.Generator().manual_seed(it), accelerator))
        sync(size.device)
        t2 = time.perf_counter()
        generated, seq_tokens = float(ro.mask.sum()), float(ro.attention_mask.sum())
        iters.append({"rollout_s": t1 - t0, "update_s": t2 - t1, "generated_tokens": generated,
                      "rollout_tokens_per_s": generated / (t1 - t0),
                      "update_tokens_per_s": cfg.ppo_epochs * seq_tokens / (t2 - t1),
                      "kl": m["kl"], "reward": m["reward"], "loss_policy": m["loss/policy"],
                      "loss_value": m["loss/value"], "approx_kl": m["approx_kl"]})
    del policy, ref, value, opt_p, opt_v, generator
    reset_accelerate()
    later = iters[1:] or iters
    return {"iterations": len(iters), "rollout": cfg.rollout_batch_size, "mini_batch": cfg.mini_batch_size,
            "kl_first": iters[0]["kl"],  # policy == reference in fp32 before any update: 0
            "rollout_tokens_per_s": sum(i["generated_tokens"] for i in later) / sum(i["rollout_s"] for i in later),
            "update_tokens_per_s": sum(i["update_tokens_per_s"] for i in later) / len(later),
            "iteration_s": sum(i["rollout_s"] + i["update_s"] for i in iters) / len(iters), "per_iteration": iters}


# ------------------------------------------------------------------------------------------------ report


def summary(sections: dict) -> dict:
    """The figures the issue asks for, gathered: parity per family, loss at step 1 per layout, TRL ratio."""
    out: dict = {}
    for family in FAMILIES:
        par = sections.get(f"{family}/parity", {})
        fam = {"parity": {k: par[k] for k in ("dtype", "max_abs_vs_padded", "max_abs_vs_reference", "max_abs_sum",
                                              "within_fp32_tolerance", "fp32") if k in par}}
        for method in ("dpo", "simpo"):
            first = {lay: sections.get(f"{family}/{method}_{lay}", {}).get("loss_first") for lay in LAYOUTS}
            if first["padded"] is not None:
                fam[f"{method}_loss_first_max_abs_vs_padded"] = max(
                    (abs(v - first["padded"]) for lay, v in first.items() if v is not None and lay != "padded"),
                    default=0.0)
        trl_sec = sections.get(f"{family}/trl_dpo", {})
        if "ratio_tokens_per_s" in trl_sec:
            fam["prefopt_dpo_over_trl_tokens_per_s"] = trl_sec["ratio_tokens_per_s"]
        out[family] = fam
    return out


def print_table(run: Run) -> None:
    print("\n| section | status | wall s | tokens/s | peak MiB | notes |\n|---|---|---|---|---|---|")
    for name in SECTIONS:
        rec = run.sections.get(name, {"status": "missing", "wall_s": 0.0})
        tps = rec.get("tokens_per_s", rec.get("rollout_tokens_per_s"))
        note = "" if rec["status"] == "ok" else (rec.get("reason") or rec.get("error", ""))[:90]
        if name.endswith("parity") and rec["status"] == "ok":
            note = f"vs padded {fmt(rec.get('max_abs_vs_padded'))}; vs reference {fmt(rec['max_abs_vs_reference'])}"
        print(f"| {name} | {rec['status']} | {rec['wall_s']:.1f} | {'' if tps is None else f'{tps:,.0f}'} | "
              f"{rec.get('peak_mem_mib', 0):,.0f} | {note} |")
    for family in FAMILIES:
        par = run.sections.get(f"{family}/parity", {})
        if "fp32" in par:
            print(f"{family} fp32 parity: vs padded {fmt(par['fp32'].get('max_abs_vs_padded'))}; "
                  f"vs reference {fmt(par['fp32']['max_abs_vs_reference'])}")
        t = run.sections.get(f"{family}/trl_dpo", {})
        if t.get("status") == "ok" and "ratio_tokens_per_s" in t:
            print(f"{family}: prefopt DPO (prefix_tree, reference pass counted) "
                  f"{t['prefopt_samples_per_s_with_reference']:.2f} pairs/s vs TRL DPOTrainer "
                  f"{t['samples_per_s']:.2f} pairs/s: x{t['ratio_tokens_per_s']:.2f}")
        elif t.get("status") == "skipped":
            print(f"{family}: TRL comparison skipped: {t['reason']}")
    print(f"\ntotal {time.perf_counter() - run.start:.1f} s (budget {run.size.budget_s:.0f} s); JSON: {run.out_path}")


def versions() -> dict:
    import accelerate
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "accelerate": accelerate.__version__}
    for name in ("trl", "datasets", "peft", "pyarrow"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent is a fact to record
            out[name] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, hidden 64, 2 layers, a few pairs, fp32")
    ap.add_argument("--budget", type=float, default=0, help="total seconds (default: 420 GPU, 120 --tiny)")
    ap.add_argument("--out", default="", help="JSON path (default: $OUT/gpu_check.json, else runs/gpu_check.json)")
    args = ap.parse_args(argv)
    size = copy.deepcopy(TINY if args.tiny else GPU)
    if not args.tiny and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; `bash bench/gpu_check.sh --tiny` runs the CPU version",
              file=sys.stderr)
        return 2
    if args.budget:
        size.budget_s = args.budget
    out = Path(args.out) if args.out else Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") \
        else REPO / "runs" / "gpu_check.json"
    run = Run(size=size, mode="tiny" if args.tiny else "gpu", out_path=out)
    run.meta = {"device": torch.cuda.get_device_name(0) if size.device == "cuda" else platform.processor() or "cpu",
                "dtype": str(size.dtype), "versions": versions()}
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        run_all(run)
    finally:  # also when the shell's hard stop interrupts: the table of what ran
        run.write()
        print_table(run)
    return 0


def run_all(run: Run) -> None:
    """Every section in SECTIONS' order (each lambda runs at once, inside run.section)."""
    run.section("setup", lambda: setup(run))
    run.section("reward_model", lambda: reward_model(run), needs=("setup",))
    for f in FAMILIES:
        run.section(f"{f}/build", lambda: build(run, f), needs=("setup",))
        run.section(f"{f}/generate", lambda: generate(run, f), needs=(f"{f}/build",))
        run.section(f"{f}/score", lambda: score(run, f), needs=(f"{f}/generate", "reward_model"))
        run.section(f"{f}/pairs", lambda: pairs(run, f), needs=(f"{f}/score",))
        run.section(f"{f}/parity", lambda: parity(run, f), needs=(f"{f}/pairs",))
        for method in ("dpo", "simpo"):
            for layout in LAYOUTS:
                run.section(f"{f}/{method}_{layout}", lambda: train_section(run, f, method, layout),
                            needs=(f"{f}/pairs",))
        run.section(f"{f}/trl_dpo", lambda: trl_dpo(run, f), needs=(f"{f}/pairs",))
        for key in [k for k in run.state if k.startswith(f + "/") and not k.endswith("/tok")]:
            del run.state[key]  # the family's model, snapshot and data: the next family gets the memory
        free(run.size.device)
    run.section("ppo", lambda: ppo(run), needs=("setup", "reward_model"))


if __name__ == "__main__":
    sys.exit(main())
