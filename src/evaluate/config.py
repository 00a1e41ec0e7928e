from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefopt.config import FieldError, check_ranges
from prefopt.data.spec import DatasetSpec
from prefopt.generation.limits import temperature_problem  # the limits only: vllm is not imported


@dataclass
class JudgeConfig:
    model: str = ""
    """A local causal LM used as a pairwise judge (empty: no judging)."""
    max_prompts: int = 50
    """Judge at most this many prompts per policy pair (the first sample of each policy per prompt)."""
    chat: bool = False
    """Put the judging prompt in the judge tokenizer's chat template (instruct judges); off: plain text."""
    batch_size: int = 8

    def __post_init__(self):
        check_ranges(self, max_prompts=dict(ge=0), batch_size=dict(ge=1))


@dataclass
class SuiteConfig:
    """`evaluate.suite`: figures beyond the sampled responses; everything empty (the default) runs nothing."""

    perplexity_file: str = ""
    """Held-out text for perplexity: a .txt file (one text per non-empty line) or a .json / .jsonl(.gz) file of
    rows with a `perplexity_field`. Each text must fit the model's context. Empty: no perplexity."""
    perplexity_field: str = "text"
    """The field holding the text in a JSON / JSONL perplexity file."""
    multiple_choice: list[str] = field(default_factory=list)
    """Local multiple-choice files, each reported as `mc/<file stem>/accuracy`: C-Eval's CSV
    (`id,question,A,B,C,D,answer`, any header with those columns), MMLU's headerless CSV
    (`question,A,B,C,D,answer`), or JSON / JSONL rows with question, A, B, C, D, answer (a letter A-D)."""
    mc_method: Literal["letter", "full"] = "letter"
    """`letter`: log-probs of " A".." D" after a prompt listing the options (C-Eval / MMLU); `full`: each option's
    own log-likelihood after the question (lm-eval-harness)."""
    mc_normalize: Literal["sum", "mean"] = "sum"
    """`full` only: sum the option's token log-probs (lm-eval's `acc`) or average them per token (long options
    are then not penalised for their length)."""
    lm_eval_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness tasks (`pip install 'prefopt[eval]'`): task or group names (hellaswag, mmlu, ...), or
    a local folder of task YAMLs, whose tasks all run (relative `data_files` there are read from that folder).
    Run with `--model hf`, `pretrained=<policy folder>`."""
    lm_eval_num_fewshot: dict[str, int] = field(default_factory=dict)
    """Few-shot examples per task name (others: the task's default, usually 0). The Open LLM Leaderboard (v1)
    used hellaswag 10, winogrande 5, truthfulqa_mc2 0, mmlu 5."""
    lm_eval_limit: float = 0
    """Examples per task (a fraction when below 1; 0: all). For a quick look only: limited figures are not
    comparable with published ones."""
    lm_eval_batch_size: int = 0
    """lm-eval batch size; 0: lm-eval finds the largest that fits on a GPU (`auto`), 8 on CPU (where `auto`'s
    probing with long dummy batches takes longer than the evaluation)."""
    lm_eval_model_args: dict[str, Any] = field(default_factory=dict)
    """Extra `--model_args` for lm-eval's `hf` model, e.g. {parallelize: true} to spread a large model over GPUs."""
    batch_size: int = 16
    """Sequences per forward pass for perplexity and multiple choice."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype the policies are loaded in (float32 on CPU whatever is asked)."""
    trust_remote_code: bool = False

    def __post_init__(self):
        check_ranges(self, lm_eval_limit=dict(ge=0), lm_eval_batch_size=dict(ge=0), batch_size=dict(ge=1))
        negative = {t: k for t, k in self.lm_eval_num_fewshot.items() if k < 0}
        if negative:
            raise FieldError("lm_eval_num_fewshot", f"shots must be >= 0, got {negative}")
        stems = [Path(p).name.split(".")[0] for p in self.multiple_choice]
        twice = sorted({s for s in stems if stems.count(s) > 1})
        if twice:
            raise FieldError("multiple_choice", f"file stems {twice} appear twice; the figures `mc/<stem>/accuracy` "
                             "would collide (rename or copy one file)")

    @property
    def active(self) -> bool:
        return bool(self.perplexity_file or self.multiple_choice or self.lm_eval_tasks)


@dataclass
class EvaluateConfig:
    """The `evaluate` stage: gold score, RM score, win rate and KL vs SFT, length, optional order-swapped judge."""

    policies: dict[str, str] = field(
        default_factory=lambda: {"sft": "stage:sft", "dpo": "stage:dpo", "simpo": "stage:simpo", "ppo": "stage:ppo"}
    )
    """Name -> model. Names whose stage is not in the experiment's stages are left out."""
    baseline: str = "sft"
    """The policy win rates and KL are measured against."""
    split: Literal["test", "validation"] = "test"
    """Which prompts the figures are on: `test` (`prompts`, the reported table) or `validation`
    (`validation_prompts`: choose hyperparameters and run sweeps on these, never on test)."""
    prompts: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/test_prompts.jsonl"))
    """Test prompts (split: test)."""
    validation_prompts: DatasetSpec = field(
        default_factory=lambda: DatasetSpec(path="stage:task/val_prompts.jsonl"))
    """Validation prompts (split: validation)."""
    reference: DatasetSpec = field(default_factory=DatasetSpec)
    """Reference answers every policy is compared with, as AlpacaEval does (empty path: none): e.g. AlpacaEval's
    `results/gpt4_1106_preview/model_outputs.json` (instruction, input, output) or any SFT-format rows. Each
    evaluated prompt is matched to the row with the same prompt (instruction and input); one with no answer
    stops the stage before any sampling. Adds `win_rate_vs_ref` (reward model), `_lc` (length-controlled),
    `_gold` and, with a judge, `judge_win_rate_vs_ref` per policy (docs/evaluation.md)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    reward_model: str = "stage:reward"
    """Scores responses ('rm_score', RM win rate); empty to skip."""
    reward_fn: str = ""
    """A reward function `module:function` (or `task:gold`) scoring responses in place of the reward model: called
    as fn(example, response) -> float, with example the prompt row (prompt_id, prompt, instruction, input)."""
    task: str = "auto"
    """Gold scorer; `auto` uses the experiment's task (`none`: no gold figures)."""
    checkpoints: bool = False
    """Also evaluate every saved checkpoint of each aligner (dpo/simpo `checkpoints/checkpoint-N`, ppo
    `snapshots/iter-N`): the curves of gold and reward-model score against KL to SFT that show over-optimisation
    (Gao et al. 2022; Rafailov et al. 2023, Fig. 2)."""
    checkpoint_prompts: int = 0
    """Prompts used for the checkpoint curves (the first N of the split; 0: all). Curves are cheaper on fewer."""
    best_of_n: list[int] = field(default_factory=list)
    """Best-of-n rows from the baseline: sample max(n) per prompt, keep the reward model's (or reward_fn's) best
    of the first n. KL to the baseline: the exact best-of-n KL under each prompt's max(n) samples, ties counted
    (Beirami et al. 2024), beside the upper bound log n - (n-1)/n (Stiennon et al. 2020). Empty: none."""
    samples_per_prompt: int = 2
    temperature: float = 1.0
    """Sampling temperature; the KL to the baseline is measured between the distributions at this temperature."""
    top_p: float = 1.0
    max_new_tokens: int = 32
    seed: int = 1234
    """Sampling seed. Each policy (checkpoint, best-of-n draw) samples under its own seed derived from this one, the
    experiment's seed and its name (`sampling_seeds` in the summary), so no policy's samples share random numbers
    with the baseline's: shared ones made identical responses, ties that pulled win rates towards 1/2."""
    batch_size: int = 64
    """Prompts per generate call (each batch samples under its own seed, so this changes the samples)."""
    logprob_batch_size: int = 0
    """Sequences per log-prob / reward-model pass (values change only by float rounding). 0: `batch_size` on a GPU,
    4 x it on CPU."""
    backend: Literal["auto", "transformers", "vllm"] = "auto"
    """Generation backend; `auto` picks vLLM when it can run. Log-probs always use transformers."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the models loaded for log-probs (float32 on CPU whatever is asked)."""
    rm_max_length: int = 0
    """Tokens the reward model reads (prompt + response), as `score.max_length`. 0: the reward model's own limit (its
    config's max_position_embeddings or its tokenizer's model_max_length, the smaller); more than that is an error."""
    rm_format: Literal["auto", "policy", "chat"] = "auto"
    """What the reward model reads, as `score.rm_format`: the policy's rendered prompt + response (`policy`), or the
    raw prompt and response in the reward model's own chat template (`chat`, hub reward models; `auto` decides)."""
    trust_remote_code: bool = False
    """Allow a hub reward model's own code (ArmoRM needs it)."""
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    suite: SuiteConfig = field(default_factory=SuiteConfig)
    """Perplexity, multiple-choice accuracy (C-Eval / MMLU files) and lm-eval tasks per policy (`suite.md`)."""

    def __post_init__(self):
        check_ranges(self, samples_per_prompt=dict(ge=1), temperature=dict(ge=0), top_p=dict(gt=0, le=1),
                     max_new_tokens=dict(ge=1), batch_size=dict(ge=1), rm_max_length=dict(ge=0),
                     logprob_batch_size=dict(ge=0), checkpoint_prompts=dict(ge=0))
        if any(n < 1 for n in self.best_of_n):
            raise ValueError(f"evaluate.best_of_n: every n must be >= 1, got {self.best_of_n}")
        # the limits vLLM samples within (`backend: auto` picks it on a GPU machine); best-of-n samples max(n)
        samples, key = max([self.samples_per_prompt, *self.best_of_n]), "samples_per_prompt"
        if samples > self.samples_per_prompt:
            key = "best_of_n"
        problem = temperature_problem(self.temperature, samples, key)
        if problem:
            raise FieldError("temperature", problem)
