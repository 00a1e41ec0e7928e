"""Preference training speed: prefopt's own loop against TRL on the same locally built model and the same pairs.

    OMP_NUM_THREADS=2 python bench/bench_preference.py                     # both jobs, every system, once
    python bench/bench_preference.py --job alpaca --systems prefopt-dpo,trl-dpo --repeats 2

Jobs (the model and the data are built here, nothing is downloaded):
  alpaca  a ~20M-parameter Llama (hidden 512, 5 layers, BPE vocab 8000 trained on the data), 512 pairs of about
          180 tokens per sequence from LLaMA-Factory's alpaca_en_demo (chosen: an instruction's answer; rejected:
          another instruction's answer), batch 8, one epoch
  hh      the same model, 256 multi-turn Anthropic HH (harmless-base) transcripts: long prompts shared by a short
          chosen and a short rejected reply, batch 8, one epoch, max_length 512
  separate  issue 24's job, of a shape the other two do not have: a 19M-parameter Llama (hidden 512, 8 layers,
          MLP 832) with a BPE vocabulary of 512 (its own folder, `model-separate`), 512 pairs each with its own
          prompt of 20-60 words and answers of 20-80 words (consecutive words of alpaca_en_demo; no prompt shared
          across pairs), batch 8, one epoch
Systems, each in its own process (one run = one whole process, as a user runs it; started back to back so the
pairs compared ran under the same machine load; with --repeats the order alternates):
  prefopt-dpo         the `dpo` stage, defaults: reference precomputed (cached), layout prefix_tree
  prefopt-dpo-padded  the same with layout padded (what the fewer-tokens layouts are worth)
  prefopt-dpo-shared  the same with layout shared_prompt (each pair's prompt once; not run unless named)
  trl-dpo             TRL DPOTrainer, live reference model (TRL's default)
  prefopt-simpo       the `simpo` stage (SimPO), its default layout (prefix_tree)
  trl-cpo-simpo       TRL CPOTrainer(loss_type="simpo", cpo_alpha=0), activation checkpointing off as for DPOTrainer
All: lr 1e-5 constant, clipping at 1.0, beta 0.1 (DPO) / 2.0 with gamma/beta 0.5 (SimPO), fp32, dropout off,
seed 0. Printed per system: wall seconds of the whole process, samples/s, peak RSS, mean loss over the first and
the last quarter of the epoch (the two loop orders differ, so curves are compared by quarter, not by step), and the
ratios the issue's targets are stated in. Run by hand, not by the tests.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

from common import SHARED, build_issue24_model, run_child, word_stretches

SYSTEMS = ["prefopt-dpo", "prefopt-dpo-padded", "trl-dpo", "prefopt-simpo", "trl-cpo-simpo"]
LR, BATCH, SEED = 1e-5, 8, 0


# ------------------------------------------------------------------------------------------------ data and model


def alpaca_pairs(n: int, target_chars: int = 1100) -> list[dict]:
    """n pairs: an alpaca prompt, its answer as chosen and another row's answer as rejected, each cut so that
    prompt + answer is about target_chars characters (about 180 tokens with the 8k BPE built below)."""
    from prefopt.data.templates import alpaca_prompt

    rows = json.loads((SHARED / "llama-factory" / "alpaca_en_demo.json").read_text())
    rng = random.Random(0)
    out = []
    for i in range(n):
        r, other = rows[i % len(rows)], rows[(i + 1 + rng.randrange(len(rows) - 1)) % len(rows)]  # never itself
        prompt = alpaca_prompt(r["instruction"], r.get("input", ""))
        room = max(40, target_chars - len(prompt))
        out.append({"prompt": prompt, "chosen": r["output"][:room], "rejected": other["output"][:room]})
    return out


def hh_pairs(n: int, max_chars: int = 1500) -> list[dict]:
    """n HH transcripts with at least two turns: prompt = everything up to the last "Assistant:", chosen and rejected
    = the two last replies (kept when the two transcripts share that prompt), longest prompts first."""
    out = []
    with gzip.open(SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz", "rt") as f:
        for line in f:
            r = json.loads(line)
            cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
            prompt = r["chosen"][:cut]
            if not r["rejected"].startswith(prompt) or prompt.count("\n\nHuman:") < 2 or len(prompt) > max_chars:
                continue
            chosen, rejected = r["chosen"][cut:][:300], r["rejected"][cut:][:300]
            if chosen.strip() and rejected.strip() and chosen != rejected:
                out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    out.sort(key=lambda r: -len(r["prompt"]))
    return out[:n]


def separate_pairs(n: int) -> list[dict]:
    """n pairs, each its own stretch of alpaca_en_demo's word stream: a prompt of 20-60 words, a chosen answer of
    20-80 words (the words that follow) and a rejected one of 20-80 (the next stretch's)."""
    return [{"prompt": p + "\n", "chosen": c, "rejected": r}
            for p, c, r in word_stretches(n, [(20, 60), (20, 80), (20, 80)])]


def model_dir(workdir: Path, job: str) -> Path:
    return workdir / ("model-separate" if job == "separate" else "model")


def build_separate(workdir: Path, n: int) -> None:
    """Issue 24's model (19M, vocabulary 512) and its pairs, in their own folder."""
    from prefopt.io import write_jsonl

    if (model_dir(workdir, "separate") / "model.safetensors").exists():
        return
    rows = separate_pairs(n)
    write_jsonl(workdir / "separate.jsonl", rows)
    build_issue24_model([r[k] for r in rows for k in ("prompt", "chosen", "rejected")], model_dir(workdir, "separate"))


def build(workdir: Path, n_alpaca: int, n_hh: int) -> None:
    """The model, its tokenizer and both pairs files in workdir (once; reused by every run)."""
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    if (workdir / "model" / "model.safetensors").exists():
        return
    workdir.mkdir(parents=True, exist_ok=True)
    jobs = {"alpaca": alpaca_pairs(n_alpaca), "hh": hh_pairs(n_hh)}
    for name, rows in jobs.items():
        with open(workdir / f"{name}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    texts = [r[k] for rows in jobs.values() for r in rows for k in ("prompt", "chosen", "rejected")]
    seed_everything(0)
    tok = build_tokenizer(texts, vocab_size=8000)
    model = build_tiny_llama(tok, hidden_size=512, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=8,
                             intermediate_size=1376, max_position_embeddings=1024)
    save_model(model, tok, workdir / "model")


# ------------------------------------------------------------------------------------------------ one run (child)


def run_prefopt(system: str, job: str, workdir: Path) -> dict:
    import yaml

    from prefopt.experiment import load_config
    from prefopt.stage import run_stage
    from prefopt.runtime.tracking import read_metrics

    stage = "simpo" if "simpo" in system else "dpo"
    sec = {"model": str(model_dir(workdir, job)), "pairs": str(workdir / f"{job}.jsonl"), "learning_rate": LR,
           "lr_scheduler_type": "constant", "max_grad_norm": 1.0, "num_train_epochs": 1,
           "per_device_train_batch_size": BATCH, "max_length": 512, "logging_steps": 1, "save_steps": 100000,
           **({"layout": "padded"} if system.endswith("padded") else
              {"layout": "shared_prompt"} if system.endswith("shared") else {})}  # else the stage's default
    sec.update({"beta": 0.1} if stage == "dpo" else {"beta": 2.0, "gamma_beta_ratio": 0.5})
    name = f"{system}-{job}-{os.getpid()}"
    cfg_path = workdir / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump({"name": name, "seed": SEED, "output_dir": str(workdir / "runs"),
                                        "wandb": {"mode": "disabled"}, "launch": {"launcher": "inline"},
                                        "stages": [stage], stage: sec}))
    cfg = load_config(str(cfg_path))
    summary = run_stage(cfg, stage)
    losses = [r["loss"] for r in read_metrics(cfg.root / stage) if "loss" in r]
    return {"train_seconds": summary["wall_seconds"], "losses": losses, "pairs": summary["pairs"],
            "mfu": {k: summary[f"perf/train/{k}"] for k in ("mfu", "mfu_with_attention")
                    if f"perf/train/{k}" in summary}}


def run_trl(system: str, job: str, workdir: Path) -> dict:
    from datasets import Dataset

    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference.data import load_pairs

    tok = load_tokenizer(str(model_dir(workdir, job)))
    rows = load_pairs(str(workdir / f"{job}.jsonl"), "alpaca", tok)
    common = dict(output_dir=str(workdir / "trl" / f"{system}-{job}-{os.getpid()}"), report_to="none",
                  learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0, num_train_epochs=1,
                  per_device_train_batch_size=BATCH, max_length=512, logging_steps=1, save_strategy="no",
                  bf16=False, use_cpu=True, seed=SEED, dataloader_num_workers=0)
    model = load_causal_lm(str(model_dir(workdir, job)), "float32")
    t0 = time.perf_counter()
    if system == "trl-dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, ref_model=load_causal_lm(str(model_dir(workdir, job)), "float32"),
                             args=DPOConfig(beta=0.1, gradient_checkpointing=False, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    else:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        # activation checkpointing off, as for DPOTrainer above: TRL 1.16 turns it on by default (CPOConfig too),
        # which recomputes every layer in backward; before 2026-12-05 this run left it on (docs/performance.md)
        trainer = CPOTrainer(model=model, args=CPOConfig(loss_type="simpo", beta=2.0, simpo_gamma=1.0, cpo_alpha=0.0,
                                                         gradient_checkpointing=False, **common),
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    trainer.train()
    trainer.save_model(common["output_dir"] + "/model")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"train_seconds": time.perf_counter() - t0, "losses": losses, "pairs": len(rows)}


def child(system: str, job: str, workdir: Path) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    out = (run_prefopt if system.startswith("prefopt") else run_trl)(system, job, workdir)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("BENCH_RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------ driver


def one(system: str, job: str, workdir: Path, threads: int) -> dict:
    return run_child(__file__, [system, "--job", job, "--workdir", str(workdir)], threads, f"{system} on {job}")


def print_lengths(workdir: Path, jobs: list[str]) -> None:
    """Mean tokens per job: prompt, prompt + chosen, prompt + rejected (what a padded batch row holds)."""
    from prefopt.models.loading import load_tokenizer

    for job in jobs:
        tok = load_tokenizer(str(model_dir(workdir, job)))
        rows = [json.loads(line) for line in open(workdir / f"{job}.jsonl")]
        n = [sum(len(tok(r["prompt"] + (r[k] if k else ""))["input_ids"]) for r in rows) / len(rows)
             for k in ("", "chosen", "rejected")]
        print(f"{job}: {len(rows)} pairs, mean tokens: prompt {n[0]:.0f}, +chosen {n[1]:.0f}, +rejected {n[2]:.0f}")


def quarter_means(losses: list[float]) -> tuple[float, float]:
    q = max(1, len(losses) // 4)
    return sum(losses[:q]) / q, sum(losses[-q:]) / q


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", default="all", choices=["alpaca", "hh", "separate", "all"],
                   help="all: alpaca and hh (separate builds its own model: name it)")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--pairs", type=int, default=512, help="pairs in the alpaca and separate jobs")
    p.add_argument("--hh-pairs", type=int, default=256)
    p.add_argument("--workdir", default="runs/bench_preference")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    workdir = Path(args.workdir).resolve()
    if args.child:
        child(args.child, args.job, workdir)
        return 0

    jobs = ["alpaca", "hh"] if args.job == "all" else [args.job]
    if "separate" in jobs:
        build_separate(workdir, args.pairs)
    else:
        build(workdir, args.pairs, args.hh_pairs)
    print_lengths(workdir, jobs)
    systems = [s for s in args.systems.split(",") if s]
    results: dict[tuple[str, str], list[dict]] = {}
    for job in jobs:
        for rep in range(args.repeats):
            for system in (systems if rep % 2 == 0 else systems[::-1]):
                r = one(system, job, workdir, args.threads)
                results.setdefault((job, system), []).append(r)
                mfu = "".join(f"  train {k} {v:.1%}" for k, v in r.get("mfu", {}).items())  # prefopt's stages
                print(f"  {job:6s} {system:18s} wall {r['wall_seconds']:7.1f} s  peak {r['peak_rss_mib']:6.0f} MiB"
                      f"{mfu}", flush=True)

    print(f"\n| job | system | pairs | wall s | samples/s | peak RSS MiB | loss 1st quarter | loss last quarter |")
    print("|---|---|---|---|---|---|---|---|")
    best = {}
    for (job, system), runs in results.items():
        wall = min(r["wall_seconds"] for r in runs)
        peak = max(r["peak_rss_mib"] for r in runs)
        first, last = quarter_means(runs[0]["losses"])
        best[(job, system)] = (wall, peak, runs[0]["pairs"])
        print(f"| {job} | {system} | {runs[0]['pairs']} | {wall:.1f} | {runs[0]['pairs'] / wall:.2f} | {peak:.0f} | "
              f"{first:.4f} | {last:.4f} |")
    print()
    for job in jobs:
        def ratio(a, b):
            if (job, a) in best and (job, b) in best:
                print(f"{job}: {a} / {b}: samples/s x{best[(job, b)][0] / best[(job, a)][0]:.2f}, "
                      f"wall time x{best[(job, a)][0] / best[(job, b)][0]:.2f}, "
                      f"peak memory x{best[(job, a)][1] / best[(job, b)][1]:.2f}")
        ratio("prefopt-dpo", "trl-dpo")
        ratio("prefopt-dpo-padded", "trl-dpo")
        ratio("prefopt-simpo", "trl-dpo")
        ratio("prefopt-simpo", "trl-cpo-simpo")
    return 0


if __name__ == "__main__":
    sys.exit(main())
