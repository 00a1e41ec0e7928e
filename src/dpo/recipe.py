"""The `dpo` stage: DPO / IPO / conservative DPO (+ RPO's NLL term) in prefopt's own loop.

    prefopt dpo experiments/quickstart.yaml
    accelerate launch --config_file experiments/accelerate/deepspeed_zero3.yaml -m prefopt dpo CONFIG

The loop (prefopt.preference.loop) calls `dpo_loss` from dpo/loss.py at every step, so editing that function changes
what trains. The reference log-probs are computed once and cached unless `reference` says otherwise. TRL's
DPOTrainer is the oracle in the tests (same token ids, same loss, same weights after 3 steps), not the engine.
"""

from __future__ import annotations

from prefopt.dpo.loss import dpo_loss
from prefopt.preference.loop import PairLogps, train


def objective(sec):
    def fn(pi: PairLogps, ref: PairLogps):
        return dpo_loss(pi.chosen, pi.rejected, ref.chosen, ref.rejected, sec.beta, sec.loss_type,
                        sec.label_smoothing, pi.chosen_lengths, pi.rejected_lengths, ipo_per_token=sec.ipo_per_token,
                        sft_weight=sec.sft_weight)
    return fn


def run(ctx) -> dict:
    sec = ctx.section
    return train(ctx, objective(sec), reference=sec.reference, ref_model=sec.ref_model)
