"""The experiment: its config (one section per stage), the stage order, and where each stage's outputs live.

A config value ``stage:NAME`` or ``stage:NAME/FILE`` refers to an earlier stage's output folder (or a file in it);
the reference both locates the input and makes NAME an input of the stage for fingerprints and ordering.
"""

from __future__ import annotations

import re

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from prefopt.annotate.config import AnnotateConfig
from prefopt.base.config import BaseConfig
from prefopt.config import FieldError, apply_overrides, check_choice, check_range, from_dict, load_yaml, parse_overrides
from prefopt.dpo.config import DPOStageConfig
from prefopt.evaluate.config import EvaluateConfig
from prefopt.generate.config import GenerateConfig
from prefopt.pairs.config import PairsConfig
from prefopt.ppo.config import PPOConfig
from prefopt.reward.config import RewardStageConfig
from prefopt.score.config import ScoreConfig
from prefopt.self_instruct.config import SelfInstructConfig
from prefopt.sft.config import SFTStageConfig
from prefopt.simpo.config import SimPOConfig
from prefopt.task.config import TaskConfig

# Stage name -> (module with `run(ctx)`, launched through `accelerate launch` when the launcher says so)
STAGES: dict[str, tuple[str, bool]] = {
    "task": ("prefopt.task.recipe", False),
    "self_instruct": ("prefopt.self_instruct.recipe", False),
    "base": ("prefopt.base.recipe", False),
    "sft": ("prefopt.sft.recipe", True),
    # the reward model before generation: it reads no candidates, and a reward model that fails its gate
    # (reward.min_eval_accuracy) then stops the run before the sampling (vLLM hours on a GPU cluster) is spent
    "reward": ("prefopt.reward.recipe", True),
    "generate": ("prefopt.generate.recipe", False),
    "score": ("prefopt.score.recipe", False),
    "pairs": ("prefopt.pairs.recipe", False),
    "dpo": ("prefopt.dpo.recipe", True),
    "simpo": ("prefopt.simpo.recipe", True),
    "ppo": ("prefopt.ppo.recipe", True),
    "evaluate": ("prefopt.evaluate.recipe", False),
}
ORDER = list(STAGES)
# Stages whose result `prefopt push` / `push_to_hub` publishes: a dataset or a model (push.py).
PUSHABLE_STAGES = ["generate", "score", "pairs", "sft", "reward", "dpo", "simpo", "ppo"]
# A Hub repo id: owner/name.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# Stages an experiment runs only when its `stages` names them (the default list leaves them out).
OPT_IN_STAGES = ["self_instruct"]
# Stages that run again in every round of an iterative experiment (round i+1 samples from round i's policy).
ROUND_STAGES = ["generate", "score", "pairs", "dpo", "simpo", "ppo", "evaluate"]
# Stages that run once per seed in a replicated experiment (`replicates: N` or `seeds: [...]`) unless
# `replicate_stages` says otherwise: the aligners' own randomness (data order, LoRA init, PPO's rollouts) and the
# evaluation's samples, which is the noise a method comparison on a fixed SFT policy and reward model must beat.
# Every stage that reads one of them is replicated with it; the rest (task, base, sft, reward, generate, score,
# pairs) run once, under `seed`, and every replicate reads them.
REPLICATE_STAGES = ["dpo", "simpo", "ppo", "evaluate"]
# Where a stage's model lands inside its folder.
MODEL_SUBDIR = {"base": "model", "sft": "model", "reward": "model", "dpo": "model", "simpo": "model", "ppo": "model"}


@dataclass
class WandbConfig:
    project: str = "prefopt"
    entity: Optional[str] = None
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    """auto: online when WANDB_API_KEY is set (or `wandb login` was run), offline otherwise."""
    tags: list[str] = field(default_factory=list)
    group: str = ""
    """W&B group of the stage runs; empty: the experiment name. `prefopt sweep` sets it to the sweep's name."""


@dataclass
class LaunchConfig:
    launcher: Literal["accelerate", "inline"] = "accelerate"
    """How `prefopt run` starts training stages: `accelerate launch` subprocesses, or in this process."""
    preload: bool = True
    """One-process launched stages start from a forkserver that has imported torch, transformers, accelerate, peft
    and wandb once (Python's multiprocessing forkserver; runtime/forkserver.py): ~4 s less per stage on 2 CPU cores
    (CPU machines; with a GPU each stage starts fresh).
    false: a fresh Python per stage. Several processes go through `accelerate launch` either way."""
    accelerate_config: str = ""
    """An accelerate config file (experiments/accelerate/*.yaml); empty: accelerate's defaults."""
    num_processes: int = 1
    """Processes per training stage, all machines together (GPUs; on CPU, processes)."""
    num_machines: int = 1
    """Machines (nodes) per training stage. Above 1 needs `srun: true` (README, "Many nodes")."""
    srun: bool = False
    """Start each training stage on every node of the Slurm allocation: `srun --nodes=num_machines
    --ntasks-per-node=1` runs one `accelerate launch` per node, machine rank from SLURM_NODEID. `prefopt run` itself
    runs on the first node (the sbatch script) and does the other stages there."""
    main_process_ip: str = ""
    """Address of the machine-rank-0 node for multi-node launches; empty: the first host of SLURM_JOB_NODELIST
    (`scontrol show hostnames`)."""
    main_process_port: int = 29500
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GB: `prefopt check` prints each stage's per-GPU estimate against it and warns about
    what does not fit (prefopt.memory_plan)."""

    def __post_init__(self):
        check_range(self, "num_processes", ge=1)
        check_range(self, "gpu_memory_gb", gt=0)
        check_range(self, "num_machines", ge=1)
        check_range(self, "main_process_port", ge=1, le=65535)
        if self.num_machines > 1 and not self.srun:
            raise FieldError("num_machines", f"{self.num_machines} machines need srun: true (one accelerate launch "
                             "per node under Slurm; README, \"Many nodes\")")
        if self.srun and self.launcher != "accelerate":
            raise FieldError("srun", "needs launcher: accelerate (srun starts one accelerate launch per node)")
        if self.num_processes % self.num_machines:
            raise FieldError("num_processes", f"{self.num_processes} processes do not split evenly over "
                             f"{self.num_machines} machines")


@dataclass
class ExperimentConfig:
    name: str
    """The experiment's name: its run directory (`<output_dir>/<name>`) and W&B group."""
    seed: int = 42
    """Seeds model construction and every stage (in a replicated experiment, the stages run once)."""
    replicates: int = 1
    """Run the stages in `replicate_stages` (and every stage that reads one of them) under this many seeds:
    seed, seed + 1, ... Each replicate lands in `<output_dir>/<name>/seed-<s>/<stage>`; the final table gives the
    mean over seeds, the across-seed standard error and the paired differences between policies (docs/methods.md,
    "Replicates")."""
    seeds: list[int] = field(default_factory=list)
    """The replicates' seeds, named (instead of `replicates`); empty: seed, seed + 1, ... (`replicates` of them)."""
    replicate_stages: list[str] = field(default_factory=lambda: list(REPLICATE_STAGES))
    """Stages that run once per seed when the experiment is replicated; the stages reading them follow. The default
    replicates the aligners and the evaluation on a shared SFT policy and reward model; add sft and reward to
    replicate the pipeline from SFT on (generate, score and pairs then follow)."""
    output_dir: str = "runs"
    stages: list[str] = field(default_factory=lambda: [s for s in ORDER if s not in OPT_IN_STAGES])
    """Stages to run, in pipeline order (default: all but `self_instruct`, which runs only when named)."""
    iterations: int = 1
    """Rounds of generate -> score -> pairs -> align; round i+1 samples from round i's policy."""
    iterate_policy: str = "dpo"
    """Which aligned policy feeds the next round's generation."""
    push_to_hub: dict[str, str] = field(default_factory=dict)
    """Publish stages' results when `prefopt run` ends: `{pairs: alice/sort-pairs, dpo: alice/sort-dpo}` (a dataset
    for generate/score/pairs, a model for sft/reward/dpo/simpo/ppo, each with its card; `prefopt push` does one by
    hand). Without a Hugging Face token each is written under `<output_dir>/<name>/push/` with the upload command."""
    push_private: bool = False
    """Create the `push_to_hub` repos private."""
    wandb: WandbConfig = field(default_factory=WandbConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    self_instruct: SelfInstructConfig = field(default_factory=SelfInstructConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reward: RewardStageConfig = field(default_factory=RewardStageConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    dpo: DPOStageConfig = field(default_factory=DPOStageConfig)
    simpo: SimPOConfig = field(default_factory=SimPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    """`prefopt annotate` (the feedback page), not a pipeline stage: what it serves and where labels go."""
    config_path: str = field(default="", init=False)
    replicate_seed: Optional[int] = field(default=None, init=False)
    """The seed of the replicate this copy of the config runs (`for_seed`); None: the experiment as a whole."""

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown} in 'stages'; valid stages: {', '.join(ORDER)}")
        self.stages = [s for s in ORDER if s in self.stages]
        check_range(self, "iterations", ge=1)
        if not self.name.strip() or self.name.strip() in (".", ".."):
            raise FieldError("name", f"must name the experiment's folder under output_dir, got {self.name!r}")
        check_choice(self, "iterate_policy", ("dpo", "simpo", "ppo"))
        if self.iterations > 1 and self.iterate_policy not in self.stages:
            raise FieldError("iterate_policy", f"'{self.iterate_policy}' feeds round 2's generation but is not in "
                                               f"stages {self.stages}")
        check_range(self, "replicates", ge=1)
        repeated = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
        if repeated:
            raise FieldError("seeds", f"repeats seed {repeated[0]}: replicates under one seed are one run twice "
                                      f"(got {self.seeds})")
        if self.seeds and self.replicates not in (1, len(self.seeds)):
            raise FieldError("replicates", f"is {self.replicates} but seeds names {len(self.seeds)}: give one of them")
        unknown = [s for s in self.replicate_stages if s not in STAGES]
        if unknown:
            raise FieldError("replicate_stages", f"names unknown stage(s) {unknown}; valid stages: {', '.join(ORDER)}")
        for stage, repo_id in self.push_to_hub.items():
            if stage not in PUSHABLE_STAGES:
                raise FieldError(f"push_to_hub.{stage}", f"publishes nothing; stages with a result to publish: "
                                                        f"{', '.join(PUSHABLE_STAGES)}")
            if not isinstance(repo_id, str) or not REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id:
                raise FieldError(f"push_to_hub.{stage}", f"{repo_id!r} is not a Hub repo id owner/name")
            if self.replicated and stage in self.replicate_stages:
                raise FieldError(f"push_to_hub.{stage}", f"{stage} runs once per seed: push one seed's result with "
                                 f"`prefopt push {self.output_dir}/{self.name}/seed-<s>/{stage} {repo_id}`")
        if self.replicated and not any(replicated_stage(self, s, 1) for s in self.stages):
            raise FieldError("replicate_stages", f"{self.replicate_stages} replicates none of the stages run "
                                                 f"({self.stages}): the seeds would all give one result")
        check_templates(self)

    @property
    def replicated(self) -> bool:
        """Whether seeded stages run once per seed (`replicates` above 1, or `seeds` named)."""
        return self.replicates > 1 or bool(self.seeds)

    @property
    def seed_list(self) -> list[int]:
        """The replicates' seeds: `seeds`, else seed, seed + 1, ... (`replicates` of them)."""
        return list(self.seeds) if self.seeds else [self.seed + i for i in range(self.replicates)]

    @property
    def root(self) -> Path:
        return Path(self.output_dir) / self.name


# Stages whose model learns from prompts rendered with their section's `template`.
TRAINED_ON_PROMPTS = ("sft", "reward", "dpo", "simpo", "ppo")


def check_templates(cfg: ExperimentConfig) -> None:
    """A model is prompted as it was trained: a stage that reads another stage's model (generate samples
    `stage:sft`, evaluate samples every policy, the reward model and the aligners start from `stage:sft`, score and
    PPO read `stage:reward` with the policy's text) must render prompts with that stage's `template`. Otherwise an
    SFT policy trained on Alpaca prompts samples chat-template prompts (or the reverse) and nothing fails: the
    figures are just worse. Only stages both run here are compared; a model from outside the experiment carries no
    template to compare with."""
    for stage in cfg.stages:
        mine = getattr(section(cfg, stage), "template", None)
        if mine is None:
            continue
        for ref in references(section(cfg, stage)):
            src = ref_stage(ref)
            if src == stage or src not in TRAINED_ON_PROMPTS or src not in cfg.stages or "/" in ref:
                continue
            theirs = section(cfg, src).template
            if theirs != mine:
                raise FieldError(f"{stage}.template", f"is {mine!r}, but {stage} reads {ref}, which {src} trained "
                                 f"with {src}.template {theirs!r}: a model must be prompted as it was trained (set "
                                 f"both to the same)")


def section(cfg: ExperimentConfig, stage: str):
    return getattr(cfg, stage)


def for_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    """The config one replicate runs under: the same sections, its replicated stages seeded with `seed` and kept in
    `seed-<seed>/`. A shallow copy: the sections are shared, not duplicated, but for a replicated evaluate stage's,
    which gets its own sampling seed (and, after the first seed, no curves or best-of-n)."""
    out = copy.copy(cfg)
    out.replicate_seed = seed
    if replicated_stage(cfg, "evaluate", cfg.iterations):
        # The evaluate stage samples under its own `evaluate.seed`, not the stage seed: without this every
        # replicate would score the shared SFT policy on the same samples, and the across-seed spread would
        # leave out the evaluation's own sampling noise.
        from prefopt.generation.base import derive_seed

        sec = dataclasses.replace(cfg.evaluate, seed=derive_seed(cfg.evaluate.seed, seed))
        if seed != cfg.seed_list[0]:
            # Later seeds score the final policies only: best-of-n samples the shared SFT policy, and the
            # checkpoint curves are a figure, not a comparison; the first seed draws both (about half the
            # quickstart's evaluate time, which would otherwise be paid once per seed).
            sec = dataclasses.replace(sec, checkpoints=False, best_of_n=[])
        out.evaluate = sec
    return out


def replicated_stage(cfg: ExperimentConfig, stage: str, round_: int = 1) -> bool:
    """Whether this stage runs once per seed: a replicated experiment, and the stage is in `replicate_stages` or
    reads (directly or through its inputs) one that is."""
    if not cfg.replicated:
        return False
    if stage in cfg.replicate_stages:
        return True
    return any(replicated_stage(cfg, n, r) for n, r in input_stages(cfg, stage, round_))


def stage_seed(cfg: ExperimentConfig, stage: str, round_: int = 1) -> int:
    """The seed a stage runs under: the replicate's for a replicated stage (the first seed when `cfg` names no
    replicate), else the experiment's `seed`."""
    if not replicated_stage(cfg, stage, round_):
        return cfg.seed
    return cfg.replicate_seed if cfg.replicate_seed is not None else cfg.seed_list[0]


def stage_dir(cfg: ExperimentConfig, stage: str, round_: int = 1) -> Path:
    """`runs/<name>/<stage>`; in rounds after the first, `runs/<name>/round<k>/<stage>` for per-round stages; a
    replicated stage under `runs/<name>/seed-<s>/`."""
    root = cfg.root
    if replicated_stage(cfg, stage, round_):
        root = root / f"seed-{stage_seed(cfg, stage, round_)}"
    if round_ > 1 and stage in ROUND_STAGES:
        return root / f"round{round_}" / stage
    return root / stage


def references(obj: Any) -> list[str]:
    """Every `stage:NAME[/FILE]` string in a config section (recursively)."""
    out: list[str] = []
    if dataclasses.is_dataclass(obj):
        for f in dataclasses.fields(obj):
            out += references(getattr(obj, f.name))
    elif isinstance(obj, dict):
        for v in obj.values():
            out += references(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += references(v)
    elif isinstance(obj, str) and obj.startswith("stage:"):
        out.append(obj)
    return out


def ref_stage(ref: str) -> str:
    return ref[len("stage:"):].split("/", 1)[0]


def stage_inputs(cfg: ExperimentConfig, stage: str) -> list[str]:
    """The stages this stage reads, from the `stage:` references in its section (only those that will exist)."""
    names = []
    if stage == "base" and cfg.base.as_named:
        return names  # a named checkpoint: nothing is built, so no data is read
    for ref in references(section(cfg, stage)):
        name = ref_stage(ref)
        if name not in STAGES:
            raise ValueError(f"{stage}: '{ref}' names no stage; stages are {', '.join(ORDER)}")
        if name not in names:
            names.append(name)
    if stage == "evaluate":  # policies whose stage is not run are dropped by the evaluate stage itself
        names = [n for n in names if n in cfg.stages or n in ("task", "base")]
    return names


def input_stages(cfg: ExperimentConfig, stage: str, round_: int) -> list[tuple[str, int]]:
    """(stage, round) pairs this stage reads; round k > 1 generation reads round k-1's aligned policy."""
    out = []
    for name in stage_inputs(cfg, stage):
        r = round_ if name in ROUND_STAGES else 1
        if round_ > 1 and stage in ROUND_STAGES and stage != "evaluate" and name == "sft":
            name, r = cfg.iterate_policy, round_ - 1
        out.append((name, r))
    return out


def resolve(cfg: ExperimentConfig, value: str, round_: int = 1, *, model: bool = True) -> str:
    """Turn `stage:NAME[/FILE]` into a path; anything else (a folder, a hub id) is returned as it is.

    `stage:sft` names the stage's model folder when the stage saves one (``model=True``), else its folder.
    In round k > 1 a reference to a per-round stage resolves inside that round; a reference to the policy that
    started the loop (`stage:sft` from `generate`) is redirected by the pipeline, not here."""
    if not isinstance(value, str) or not value.startswith("stage:"):
        return value
    name, _, rest = value[len("stage:"):].partition("/")
    folder = stage_dir(cfg, name, round_)
    if rest:
        return str(folder / rest)
    if model and name == "base" and cfg.base.as_named:
        return cfg.base.model  # a real checkpoint named in the config; nothing was built
    if model and name in MODEL_SUBDIR:
        return str(folder / MODEL_SUBDIR[name])
    return str(folder)


def env_rank() -> int:
    from prefopt.dist.process import rank

    return rank()


def load_config(path: str | Path, overrides: list[str] | dict | None = None):
    """Load an experiment YAML with overrides into an ``ExperimentConfig``."""
    data = load_yaml(path)
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides)
        data = apply_overrides(data, overrides)
    cfg = from_dict(ExperimentConfig, data)
    cfg.config_path = str(Path(path).resolve())
    return cfg
