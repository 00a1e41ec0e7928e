"""`prefopt`: one subcommand per stage, plus run / check / sweep / report.

    prefopt sft experiments/quickstart.yaml --sft.learning_rate=1e-3
    accelerate launch -m prefopt dpo experiments/quickstart.yaml
    prefopt run experiments/quickstart.yaml [--from STAGE | --only STAGE]
    prefopt check experiments/simpo/gemma2_9b_it.yaml

`prefopt STAGE --help` lists every key of that stage's section with its type, default and meaning.

Exit codes: 0 done; 1 a crash (a traceback, then the advice to rerun, which resumes); 2 a config error; 3 a data
error; 4 the experiment directory is locked by another prefopt command; 5 the reward model failed its gate;
6 a resource fault (no space left on device, out of host or GPU memory, a lost peer process); 130 interrupted
(rerun to resume); 143 preempted (SIGTERM, SIGINT or SIGUSR1 during a training stage: a checkpoint of the current
step was saved; rerun to resume). Errors 2-6 and 143 are one line naming the key, the file, row and field, or the
cause and what to do (a resource fault's traceback goes to `<experiment>/logs/<command>.log`); a stage launched
through `accelerate launch` by `prefopt run` passes its code on. An exception class with an `exit_code` attribute
is reported the same way.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import os
import sys
import textwrap
import typing
from contextlib import nullcontext
from functools import lru_cache

from prefopt.config import ConfigError
from prefopt.runtime.exits import log_file, run_reported

STAGE_HELP = {
    "task": "write the task's data files (gold-reward task: SFT demos, prompts, annotated preferences)",
    "self_instruct": "grow Alpaca-format instruction data from seed tasks with a model (self-instruct; ROUGE-L, "
                     "keyword and length filters; resumable batches); runs only when `stages` names it",
    "base": "train a byte-level BPE tokenizer and build (optionally pretrain) a tiny Llama, or name a real model",
    "sft": "supervised fine-tuning in prefopt's training loop, packed without padding (loss on completion tokens "
           "only; optional LoRA; `backend: trl` trains with TRL's SFTTrainer instead)",
    "generate": "sample candidates per prompt (vLLM on GPUs, transformers here), in resumable shards",
    "reward": "train a Bradley-Terry reward model (the SFT model's own likelihood, or a classifier head)",
    "score": "score every candidate with a reward model (batched, cached, resumable)",
    "pairs": "turn scored candidates into chosen/rejected pairs with provenance",
    "dpo": "align with DPO / IPO / cDPO (+ RPO's NLL term) in prefopt's own preference loop",
    "simpo": "align with SimPO (reference-free, length-normalised margin)",
    "ppo": "align with PPO against the reward model (written here)",
    "evaluate": "gold score, reward-model score, win rate and KL vs SFT, length; order-swapped judge",
}


@lru_cache(maxsize=None)
def field_docs(cls) -> dict[str, str]:
    """Attribute docstrings (the string literal under a dataclass field), from the class and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                    docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return "(required)"


def describe_section(cls, prefix: str, skip: tuple[str, ...] = (), defaults=None) -> list[str]:
    """Lines of `--prefix.key  TYPE  (default: X)  meaning` for every key, nested sections included (but those
    named in `skip`): a nested section's own meaning first, then its keys with the defaults the enclosing field
    gives them (`evaluate.prompts.path` defaults to the task's test prompts, not to the empty path of a bare
    DatasetSpec). `defaults`: the instance whose values are the defaults (None: the class's own)."""
    lines = []
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name == "trainer_args" or f.name in skip:
            continue
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        default = getattr(defaults, f.name) if defaults is not None else _default(f)
        if dataclasses.is_dataclass(tp):
            if f.name in docs:
                lines.append(f"  --{key}.<key>  (the keys below)")
                lines += ["      " + ln for ln in textwrap.wrap(docs[f.name], 100)]
            lines += describe_section(tp, key, defaults=default if dataclasses.is_dataclass(default) else None)
            continue
        tname = str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")
        lines.append(f"  --{key}={default!r}  [{tname}]")
        if f.name in docs:
            lines += ["      " + ln for ln in textwrap.wrap(docs[f.name], 100)]
    trl = getattr(cls, "TRL_CONFIG", None)
    if trl:
        lines.append(f"  --{prefix}.<any {trl} field>  passed through to TRL, type-checked against it")
    return lines


def _section_class(stage: str):
    from prefopt.experiment import ExperimentConfig

    return typing.get_type_hints(ExperimentConfig)[stage]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="experiment YAML (experiments/*.yaml)")


def build_parser() -> argparse.ArgumentParser:
    from prefopt.experiment import ORDER, ExperimentConfig

    # every key outside the stage sections (top level, wandb, launch): `prefopt --help` and `prefopt run --help`
    experiment_keys = ("Experiment keys (override with --KEY=VALUE; each stage's section: prefopt STAGE --help):\n"
                       + "\n".join(describe_section(ExperimentConfig, "", skip=tuple(ORDER))))

    p = argparse.ArgumentParser(
        prog="prefopt",
        description="Preference optimisation, one stage at a time or as a whole experiment. "
        "Every subcommand takes an experiment YAML followed by --section.key=value overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=experiment_keys,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in ORDER:
        sp = sub.add_parser(
            stage,
            help=STAGE_HELP[stage],
            description=f"Run the `{stage}` stage: {STAGE_HELP[stage]}. Training stages also run under "
            f"`accelerate launch -m prefopt {stage} CONFIG`.",
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"Options of the `{stage}` section (override with --{stage}.KEY=VALUE):\n"
            + "\n".join(describe_section(_section_class(stage), stage)),
        )
        _common(sp)
        sp.add_argument("--round", type=int, default=1, help="round of an iterative experiment (default 1)")
        sp.add_argument("--replicate-seed", type=int, help="the seed of the replicate to run, when the experiment "
                        "runs this stage once per seed (replicates / seeds)")
    sp = sub.add_parser("run", help="run an experiment's stages in order, skipping finished ones",
                        description="Run every stage of the experiment in order. A finished stage whose "
                        "fingerprint (config section + inputs) is unchanged is skipped; a killed run resumes.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog=experiment_keys)
    _common(sp)
    sp.add_argument("--from", dest="from_stage", choices=ORDER, help="rerun this stage and everything after it")
    sp.add_argument("--only", choices=ORDER, help="run only this stage (its inputs must exist)")
    sp.add_argument("--launcher", choices=["accelerate", "inline"], help="override launch.launcher")
    sp.add_argument("--verbose", action="store_true", help="print every stage's whole output (Trainer logs, "
                    "progress bars, library warnings) instead of a start and an end line per stage; those go to "
                    "<experiment>/logs/<stage>.log otherwise (also PREFOPT_VERBOSE=1)")
    sp = sub.add_parser("check", help="resolve and validate a config, print the plan, run nothing",
                        description="Validate keys, types, paths and the global batch against the recipe's; "
                        "print each stage with its fingerprint and whether it would run or be skipped.")
    _common(sp)
    sp = sub.add_parser("sweep", help="run a W&B sweep file locally (grid / random), no W&B server needed")
    sp.add_argument("sweep_file", help="experiments/sweeps/*.yaml")
    sp.add_argument("--max-trials", type=int, default=0, help="stop after this many trials (0: all / sweep's count)")
    sp.add_argument("--dry-run", action="store_true", help="print the trials' commands, run nothing")
    sp = sub.add_parser("report", help="write figures (PNG) and a markdown summary for a finished run directory")
    sp.add_argument("run_dir", help="runs/<experiment>")
    sp = sub.add_parser("push", help="publish a finished stage on the Hugging Face Hub with a card: pairs / "
                        "candidates as a dataset (parquet), a trained policy or reward model as a model",
                        description="Publish a finished stage's result with a card carrying the run's provenance "
                        "(generator and sampling, reward model and its hash, seeds, config, summary figures, the "
                        "evaluation table). Uploads with HF_TOKEN (or `hf auth login`); without a token, or with --to-dir, it writes the folder and prints the `hf upload` command.")
    sp.add_argument("stage_dir", help="a finished stage folder: runs/<experiment>/pairs, .../dpo, ...")
    sp.add_argument("repo_id", help="the Hub repo, owner/name")
    sp.add_argument("--to-dir", help="write exactly the folder that would be uploaded here; upload nothing")
    sp.add_argument("--private", action="store_true", help="create the repo private")
    sp.add_argument("--revision", help="upload to this branch (created if missing) instead of main")
    sp.add_argument("--license", default="other", help="the card's license (the Hub's ids: apache-2.0, mit, "
                    "gemma, llama3.1, ...; default other: say it in the card)")
    _annotate_parser(sub)
    return p


def _annotate_parser(sub) -> None:
    from prefopt.annotate.config import AnnotateConfig

    sp = sub.add_parser(
        "annotate", help="serve pairs in a web page (gradio) and append human A/B labels to a preference JSONL",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve pairs (a pairs file, or two generated candidates per prompt) in a web page: the prompt, "
        "answers A and B in a seeded random order, buttons and keys a / b / t / s, an annotator id and progress. "
        "A/B labels are appended atomically to a preference JSONL that the reward and dpo stages read; ties and "
        "skips go to <out>.ties_skips.jsonl. A restarted page resumes where each annotator stopped. A file that "
        "cannot be read is refused before serving (exit code 3). Needs the `annotate` extra (gradio).",
        epilog="Examples:\n  prefopt annotate experiments/quickstart.yaml --annotator alice\n"
        "  prefopt annotate --pairs runs/quickstart/pairs/pairs.jsonl --out labels.jsonl --port 0\n\n"
        "Options of the `annotate` section (with a config: --annotate.KEY=VALUE; flags above win):\n"
        + "\n".join(describe_section(AnnotateConfig, "annotate")))
    sp.add_argument("config", nargs="?", help="experiment YAML: its `annotate` section and run folder give the "
                    "defaults (pairs: runs/<name>/pairs/pairs.jsonl, out: runs/<name>/annotate/preferences.jsonl)")
    sp.add_argument("--pairs", help="pairs / preference file to serve (any format load_preferences reads)")
    sp.add_argument("--candidates", help="generate stage folder (shard-*.jsonl): serve two candidates per prompt")
    sp.add_argument("--out", help="preference JSONL to append labels to (needed without a config)")
    sp.add_argument("--annotator", help="annotator id filled in when the page opens")
    sp.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, help="port (default 7860; 0: a free one)")
    sp.add_argument("--seed", type=int, help="seeds each pair's A/B order (default 0)")
    sp.add_argument("--limit", type=int, help="serve only the first N pairs (default 0: all)")
    sp.add_argument("--round", type=int, default=1, help="round of an iterative experiment whose pairs to serve")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    holder: dict = {"cfg": None}
    return run_reported(args.command, lambda: _dispatch(args, rest, holder),
                        lambda: log_file(holder["cfg"], args.command))


def _dispatch(args, rest: list[str], holder: dict) -> int:
    """The command itself; errors are reported by `exits.run_reported` (one line and an exit code)."""
    if args.command == "sweep":
        from prefopt.sweep import run_sweep

        run_sweep(args.sweep_file, max_trials=args.max_trials, dry_run=args.dry_run, extra=rest)
        return 0
    if args.command == "report":
        from prefopt.report import write_report

        if not os.path.isdir(args.run_dir):
            raise ConfigError(f"no run directory {args.run_dir} (runs/<experiment>)")
        print(write_report(args.run_dir))
        return 0
    if args.command == "push":
        from prefopt.push import push

        push(args.stage_dir, args.repo_id, to_dir=args.to_dir, private=args.private, revision=args.revision,
             license=args.license)
        return 0
    if args.command == "annotate":
        from prefopt.annotate.command import main as annotate

        return annotate(args, rest)
    from prefopt.experiment import load_config
    from prefopt.runtime.tracking import offline_process

    cfg = holder["cfg"] = load_config(args.config, rest)
    offline_process(cfg.wandb.mode)  # before any W&B call, in this process and the stages it launches
    if args.command == "check":
        from prefopt.pipeline import check

        return check(cfg)
    if args.command == "run":
        from prefopt.pipeline import run_experiment

        if args.launcher:
            cfg.launch.launcher = args.launcher
        run_experiment(cfg, from_stage=args.from_stage, only=args.only, overrides=rest, verbose=args.verbose)
        return 0
    from prefopt.stage import run_stage

    from prefopt.experiment import env_rank, stage_dir
    from prefopt.pipeline import check_inputs, experiment_lock

    if not 1 <= args.round <= cfg.iterations:
        raise ConfigError(f"--round {args.round}: the experiment has rounds 1 to {cfg.iterations} (iterations)")
    cfg = replicate_of(cfg, args.command, args.round, args.replicate_seed)
    check_inputs(cfg, args.command, args.round)
    # one lock per experiment directory (rank 0 takes it for all ranks of a launch)
    with experiment_lock(cfg.root) if env_rank() == 0 else nullcontext():
        summary = run_stage(cfg, args.command, args.round)
    if env_rank() == 0:
        # launched by `prefopt run` (which has an exit file for it): that prints the stage's end line; this one is
        # untagged, so it goes to the stage's log
        tag = "" if os.environ.get("PREFOPT_EXIT_FILE") else "[prefopt] "
        print(f"{tag}{args.command} finished in {summary.get('wall_seconds')} s -> "
              f"{stage_dir(cfg, args.command, args.round)}", flush=True)
        table = stage_dir(cfg, args.command, args.round) / "table.md"
        if args.command == "evaluate" and table.exists():  # with the suite's figures under it, when it ran
            print(table.read_text(), flush=True)
    return 0


def replicate_of(cfg, stage: str, round_: int, seed: int | None):
    """The config of the replicate `--replicate-seed` names, for a stage the experiment runs once per seed; a
    config error when the seed is missing or not one of the experiment's, or given for a stage run once."""
    from prefopt.experiment import for_seed, replicated_stage

    if not replicated_stage(cfg, stage, round_):
        if seed is not None:
            raise ConfigError(f"--replicate-seed {seed}: {stage} runs once in this experiment, not once per seed")
        return cfg
    if seed is None or seed not in cfg.seed_list:
        got = "is missing" if seed is None else f"{seed} is not one of them"
        raise ConfigError(f"--replicate-seed: {stage} runs once per seed (seeds {cfg.seed_list}); {got}")
    return for_seed(cfg, seed)


if __name__ == "__main__":
    sys.exit(main())
