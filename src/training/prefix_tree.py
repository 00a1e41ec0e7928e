"""A batch's sequences as a prefix tree in one row: every token the sequences share at their start is computed once.

The sequences are sorted and each is laid down from the end of the longest prefix it shares with the one before,
its position ids starting there: a depth-first walk of the tree of the batch's sequences, so a sequence's shared
prefix can span several earlier pieces. The position ids alone say it all, by one rule that varlen attention
(`prefopt.models.varlen.pieces`) and the mask built from positions (`training.forward.allowed_from_positions`)
both read: a restart at 0 begins a new tree, a drop to p continues the first p tokens of the sequence before.

What it saves is what the batch shares: a template or system prompt that starts every example (the quickstart's
Alpaca preamble is 60% of its SFT tokens), a pair's prompt, a prompt sampled n times, a common start of two
answers. A target predicted by a shared token is read from the one position that computes it.
"""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def lay_down(sequences: list[tuple[list[int], list[tuple[int, int, int]]]]) -> dict:
    """(ids, targets) of each sequence, targets (index in the sequence of the token that predicts, token, sequence
    number) -> the one row: {"ids", "pos", "targets"} with each target's predicting index now its row index.
    A target with no predicting token (index < 0: a response with an empty prompt) is left out."""
    ids, pos, targets = [], [], []
    path: list[int] = []  # row index of each token of the previous sequence
    prev: list[int] = []
    for seq, seq_targets in sorted(sequences, key=lambda s: s[0]):
        shared = common_prefix(prev, seq)
        path = path[:shared] + list(range(len(ids), len(ids) + len(seq) - shared))
        ids += seq[shared:]
        pos += range(shared, len(seq))
        targets += [(path[src], tok, n) for src, tok, n in seq_targets if src >= 0]
        prev = seq
    return {"ids": ids, "pos": pos, "targets": targets}
