from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from prefopt.config import FieldError, check_range
from prefopt.data.spec import DatasetSpec
from prefopt.training.fields import LoraSpec, TrainFields


@dataclass
class RewardStageConfig(TrainFields):
    """The `reward` stage: a Bradley-Terry reward model, a likelihood reward model (scoring/likelihood.py) or a
    classifier, both trained in prefopt's loop (prefopt.preference.loop); a classifier with `backend: trl` is trained
    by TRL's RewardTrainer instead, whose every trl.RewardConfig field then passes through `trainer_args`."""

    TRL_CONFIG = "trl.RewardConfig"

    model: str = "stage:base"
    """The model the reward model starts from (for `kind: classifier` a one-output head is added)."""
    dataset: DatasetSpec = field(default_factory=lambda: DatasetSpec(path="stage:task/preferences.jsonl"))
    """Preference data (any preference format the loaders read)."""
    kind: Literal["classifier", "likelihood"] = "likelihood"
    """`likelihood`: the start model itself, trained with Bradley-Terry on r = beta * mean log p(response | prompt)
    (SimPO's implicit reward): its language-model head reads the answer token by token, and on every built-in task
    it learned where a classifier did not (docs/methods.md). `classifier`: a one-output head on the last token of
    prompt + response + EOS (the usual hub reward-model format)."""
    backend: Literal["prefopt", "trl"] = "prefopt"
    """`kind: classifier` only. `prefopt`: the shared training loop (resumable, FSDP2, the same batches as the
    preference stages; padded rows); `trl`: TRL's RewardTrainer, the oracle the loop is tested against
    (tests/test_reward_loop.py: the same loss curve and weights)."""
    beta: float = 2.0
    """`kind: likelihood` only: the reward's scale, r = beta * mean log p (SimPO's beta; the Bradley-Terry loss's
    temperature)."""
    template: Literal["alpaca", "chat"] = "alpaca"
    """How Alpaca/ShareGPT rows become prompts: `alpaca` text, or `chat` messages rendered by the tokenizer's chat
    template (the reward model is trained on prompt text + response + EOS either way)."""
    eval_fraction: float = 0.1
    """Validation fraction of the preference rows: the checkpoint with the best pairwise accuracy on it is kept
    (early stopping). Never the figure reported."""
    test_fraction: float = 0.1
    """Test fraction: the held-out pairwise accuracy and margin reported (with their standard errors), the gate's
    figure, and the calibration the pairs stage estimates its label quality from."""
    early_stopping_patience: int = 4
    """Stop after this many evaluations (one every `save_steps`) without a better validation accuracy; 0: never."""
    min_eval_accuracy: float = 0.65
    """The gate: `prefopt run` stops before any stage that uses the reward model (exit code 5) unless its held-out
    (test) pairwise accuracy is above this beyond noise: accuracy - 1.96 SE >= the floor (reward/gate.py). Near 0.5
    the pairs are near random and the aligners optimise noise. 0 turns the gate off."""
    lora: LoraSpec = field(default_factory=LoraSpec)
    """LoRA adapter (PEFT, task SEQ_CLS so the new head trains fully); merged before the model is saved."""
    learning_rate: float = 1e-4
    """The likelihood reward model from a tiny SFT model: 1e-4 reached the best validation accuracy of 1e-4, 2e-4
    and 5e-4 on all three built-in tasks (within noise on two; docs/methods.md). A classifier's fresh head on a tiny model wants more
    (2e-3 from scratch on the sort task); 7B-scale reward models use about 1e-5."""
    num_train_epochs: float = 10.0
    """An upper bound: early stopping on the validation split ends training when it stops improving. Too few
    steps was the commonest failure seen (a reward model at chance on a task with 1,400 pairs and 3 epochs); on
    the quickstart, validation accuracy still rose from 3 to 6 epochs (0.72 -> 0.80 against noisy labels)."""
    per_device_train_batch_size: int = 16
    trainer_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        check_range(self, "eval_fraction", ge=0, lt=1)
        check_range(self, "test_fraction", ge=0, lt=1)
        check_range(self, "min_eval_accuracy", ge=0, le=1)
        check_range(self, "early_stopping_patience", ge=0)
        check_range(self, "beta", gt=0)
        if self.backend == "trl" and self.kind != "classifier":
            raise FieldError("backend", "trl is for kind classifier only (TRL has no likelihood reward model)")
        if self.trainer_args and (self.kind, self.backend) != ("classifier", "trl"):
            raise FieldError(sorted(self.trainer_args)[0], "is a trl.RewardConfig field: it applies with "
                             "reward.kind=classifier and reward.backend=trl only (the prefopt loop sets its own "
                             "training arguments)")
        if self.eval_fraction + self.test_fraction >= 1:
            raise ValueError(f"reward.eval_fraction + reward.test_fraction must be < 1, got "
                             f"{self.eval_fraction} + {self.test_fraction}")
