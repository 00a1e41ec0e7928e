"""The page's logic without the page: which pair an annotator sees next, progress, and the row a label becomes.

Kept free of gradio so that it is tested directly; page.py only wires these calls to buttons.

Label counts go to the tracker (the W&B run of `prefopt annotate` and its metrics.jsonl) as each label is written,
cumulative over the label files (earlier sessions included), at step = labels in the files:
  labels/A, labels/B, labels/tie, labels/skip, labels/total     over all annotators
  annotator/<id>/A, ... /B, /tie, /skip                         per annotator
"""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from prefopt.annotate.items import Pair, order
from prefopt.annotate.store import LABELS, OTHER_LABELS, PREFERENCE_LABELS, LabelStore
from prefopt.runtime.tracking import NullTracker


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


def label_metrics(counts: dict[str, dict[str, int]]) -> dict[str, int]:
    """`LabelStore.counts()` as tracker metrics: totals per label (`labels/<label>`, `labels/total`) and per
    annotator (`annotator/<id>/<label>`; a "/" in an id becomes "_" so the id stays one level)."""
    out = {f"labels/{k}": sum(c[k] for c in counts.values()) for k in LABELS}
    out["labels/total"] = sum(out.values())
    for annotator, c in counts.items():
        out.update({f"annotator/{annotator.replace('/', '_')}/{k}": c[k] for k in LABELS})
    return out


class Session:
    """All pairs of one page and its label store; every method takes the annotator, so tabs do not interfere.
    `tracker` receives the label counts (`label_metrics`) after every written label and on `log_counts`."""

    def __init__(self, pairs: list[Pair], store: LabelStore, seed: int = 0, tracker=None):
        self.pairs, self.store, self.seed = pairs, store, seed
        self.by_id = {p.pair_id: p for p in pairs}
        self.tracker = tracker or NullTracker()
        self._log_lock = threading.Lock()  # one label's counts logged before the next's: steps only grow

    def log_counts(self) -> dict[str, int]:
        """Log the label counts now (at start: what earlier sessions left); returns them."""
        metrics = label_metrics(self.store.counts())
        self.tracker.log(metrics, step=metrics["labels/total"])
        return metrics

    def summary(self) -> dict:
        """What the run ends with: pairs served, the label files, and the last counts under their logged names."""
        return {"pairs": len(self.pairs), "out": str(self.store.out), "ties_skips": str(self.store.side),
                **label_metrics(self.store.counts())}

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
        with self._log_lock:
            written = self.store.record(label_row(pair, label, annotator.strip(), self.seed))
            if written:
                self.log_counts()
        return written
