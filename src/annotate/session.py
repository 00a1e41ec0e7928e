"""The page's logic without the page: which pair an annotator sees next, progress, and the row a label becomes.

Kept free of gradio so that it is tested directly; page.py only wires these calls to buttons.
"""

from __future__ import annotations

from datetime import datetime, timezone

from prefopt.annotate.items import Pair, order
from prefopt.annotate.store import OTHER_LABELS, PREFERENCE_LABELS, LabelStore


def label_row(pair: Pair, label: str, annotator: str, seed: int) -> dict:
    """The JSON row one label becomes: a preference row for A/B, an answer_a/answer_b row for tie/skip."""
    a, b = order(pair.pair_id, seed)
    common = {"label": label, "annotator": annotator, "pair_id": pair.pair_id,
              "shown_order": [pair.sources[a], pair.sources[b]],
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "source": pair.origin}
    if label in OTHER_LABELS:
        return {"prompt": pair.prompt, "answer_a": pair.answers[a], "answer_b": pair.answers[b], **common}
    if label not in PREFERENCE_LABELS:
        raise ValueError(f"unknown label {label!r}; one of {PREFERENCE_LABELS + OTHER_LABELS}")
    win, lose = (a, b) if label == "A" else (b, a)
    return {"prompt": pair.prompt, "chosen": pair.answers[win], "rejected": pair.answers[lose],
            "chosen_source": pair.sources[win], **common}


class Session:
    """All pairs of one page and its label store; every method takes the annotator, so tabs do not interfere."""

    def __init__(self, pairs: list[Pair], store: LabelStore, seed: int = 0):
        self.pairs, self.store, self.seed = pairs, store, seed
        self.by_id = {p.pair_id: p for p in pairs}

    def progress(self, annotator: str) -> tuple[int, int]:
        """(pairs this annotator has labelled, tie and skip included; pairs in all)."""
        done = self.store.done(annotator)
        return sum(p.pair_id in done for p in self.pairs), len(self.pairs)

    def next_pair(self, annotator: str) -> Pair | None:
        """The first pair, in file order, that this annotator has not labelled; None when all are done."""
        done = self.store.done(annotator)
        return next((p for p in self.pairs if p.pair_id not in done), None)

    def shown(self, pair: Pair) -> tuple[str, str]:
        """The answers as shown, (A, B)."""
        a, b = order(pair.pair_id, self.seed)
        return pair.answers[a], pair.answers[b]

    def label(self, annotator: str, pair_id: str, label: str) -> bool:
        """Record a label for the pair that was on screen; False if it was already labelled (nothing written)."""
        if not annotator.strip():
            raise ValueError("an annotator id is needed before labelling")
        pair = self.by_id.get(pair_id)
        if pair is None:
            raise KeyError(f"no pair {pair_id!r} on this page")
        return self.store.record(label_row(pair, label, annotator.strip(), self.seed))
