"""SFT training steps in each batch layout, on a finished quickstart's data and base model, in one process.

    OMP_NUM_THREADS=2 python bench/bench_layouts.py --run runs/quickstart
    python bench/bench_layouts.py --run runs/quickstart --layouts packed,prefix_tree,padded --blocks 4 --steps 25

Each layout gets its own copy of the base model and AdamW (fused) and trains on the same batches of the task's
SFT rows, tokenized as the `sft` stage does; the layouts take turns in blocks of `steps` steps, so a machine whose
speed drifts (a shared CPU) slows them alike. Prints each block's ms per step, the positions a step computes, and
the last loss (the layouts train the same weights to float rounding, so the losses should agree to ~6 digits).
Run by hand, not by the tests.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/quickstart", help="a quickstart run folder (its task/ and base/ are read)")
    p.add_argument("--layouts", default="packed,prefix_tree", help="comma-separated sft.layout values")
    p.add_argument("--batch-size", type=int, default=16, help="examples per step (the quickstart's)")
    p.add_argument("--blocks", type=int, default=4, help="turns each layout takes")
    p.add_argument("--steps", type=int, default=25, help="steps per turn")
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args(argv)

    import torch

    from prefopt.data.loaders import load_sft
    from prefopt.data.spec import DatasetSpec
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.preference.batching import collate
    from prefopt.preference.loop import SequenceLogps, disable_dropout, packed_varlen
    from prefopt.sft.recipe import objective, sft_examples
    from prefopt.training.forward import pair_logps

    run = Path(args.run)
    base = str(run / "base" / "model")
    tok = load_tokenizer(base)
    n = args.batch_size * args.blocks * args.steps
    rows = load_sft(DatasetSpec(path=str(run / "task" / "sft.jsonl")), "alpaca").rows[:n]  # as the stage reads them
    examples, _ = sft_examples(rows, tok, args.max_length)
    layouts = args.layouts.split(",")
    setups = {}
    for layout in layouts:
        torch.manual_seed(0)
        model = load_causal_lm(base, dtype="float32")
        disable_dropout(model)
        packed_varlen(model, layout)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        batches = [collate(examples[i:i + args.batch_size], tok.pad_token_id, args.max_length, layout,
                           masks=layout == "padded") for i in range(0, len(examples), args.batch_size)]
        setups[layout] = (model, opt, batches)

    def step(model, opt, batch) -> float:
        sums, lengths = pair_logps(model, batch, 0)
        loss, _ = objective(SequenceLogps(sums, lengths, lengths.sum()), None)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return float(loss.detach())

    times = {layout: [] for layout in layouts}
    last = {}
    for b in range(args.blocks):
        for layout in layouts:
            model, opt, batches = setups[layout]
            part = batches[b * args.steps:(b + 1) * args.steps]
            t0 = time.perf_counter()
            for batch in part:
                last[layout] = step(model, opt, batch)
            times[layout].append((time.perf_counter() - t0) / max(len(part), 1) * 1000)
    for layout in layouts:
        positions = sum(int(b["input_ids"].numel()) for b in setups[layout][2]) / len(setups[layout][2])
        print(f"{layout:12s} ms/step {' '.join(f'{t:.1f}' for t in times[layout])}  positions/step {positions:.0f}  "
              f"last loss {last[layout]:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
