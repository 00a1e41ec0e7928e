"""The `simpo` stage: SimPO (Meng et al. 2024) or ORPO (Hong et al. 2024), reference-free, in prefopt's own loop.

    prefopt simpo experiments/quickstart.yaml
    accelerate launch --config_file experiments/accelerate/deepspeed_zero3.yaml -m prefopt simpo CONFIG

The loop (prefopt.preference.loop, shared with `dpo`) calls `simpo_loss` / `orpo_loss` from simpo/loss.py on summed
log-probs and lengths; the length normalisation and the NLL term are inside those functions.
"""

from __future__ import annotations

from prefopt.preference.loop import PairLogps, train
from prefopt.simpo.loss import orpo_loss, simpo_loss


def objective(sec):
    def fn(pi: PairLogps, _ref=None):
        if sec.loss_type == "orpo":
            return orpo_loss(pi.chosen, pi.rejected, pi.chosen_lengths, pi.rejected_lengths, sec.beta)
        return simpo_loss(pi.chosen, pi.rejected, pi.chosen_lengths, pi.rejected_lengths, sec.beta,
                          sec.gamma_beta_ratio, sec.sft_weight)
    return fn


def run(ctx) -> dict:
    return train(ctx, objective(ctx.section), reference=None)
