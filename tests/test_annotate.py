"""The feedback page's logic without a browser: pairs in, label rows out, atomic appends, resume, bad files refused.

The page itself, in a real headless Chromium, is tested in test_annotate_browser.py."""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from argparse import Namespace

import pytest
import yaml

from prefopt.annotate.command import prepare, resolve_section
from prefopt.annotate.items import Pair, load_candidates, load_pair_file, make_pair_id, order
from prefopt.annotate.session import Session, label_row
from prefopt.annotate.store import LabelStore, append_line, read_labels, side_path
from prefopt.cli import main as cli_main
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_preferences
from prefopt.data.spec import DatasetSpec


def write_pairs(path, n=6):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt_id": f"p{i}", "prompt": f"Sort {i + 4} 3 1", "chosen": f"1 3 {i + 4}",
                                "rejected": f"{i + 4} 3 1", "chosen_score": 1.0}) + "\n")
    return path


def args(**kw) -> Namespace:
    base = dict(config=None, pairs=None, candidates=None, out=None, annotator=None, host=None, port=None, seed=None,
                limit=None, round=1)
    return Namespace(**{**base, **kw})


def test_order_is_seeded_per_pair_and_pair_id_ignores_answer_order():
    ids = [make_pair_id(f"prompt {i}", "x", "y") for i in range(40)]
    orders = [order(pid, seed=0) for pid in ids]
    assert orders == [order(pid, seed=0) for pid in ids]  # a restart (same seed) shows the same order
    assert {(0, 1), (1, 0)} == set(orders)  # and both orders occur
    assert 8 <= sum(o == (1, 0) for o in orders) <= 32
    assert make_pair_id("p", "x", "y") == make_pair_id("p", "y", "x")
    assert make_pair_id("p", "x", "y") != make_pair_id("q", "x", "y")


def test_label_row_maps_the_shown_letter_back_to_the_answer():
    pair = Pair("id1", "Sort 2 1", ("1 2", "2 1"), ("chosen", "rejected"), {"file": "f", "row": 1})
    a, b = order("id1", 0)
    row_a = label_row(pair, "A", "alice", 0)
    assert row_a["chosen"] == pair.answers[a] and row_a["rejected"] == pair.answers[b]
    assert row_a["shown_order"] == [pair.sources[a], pair.sources[b]]
    assert row_a["chosen_source"] == pair.sources[a]
    row_b = label_row(pair, "B", "alice", 0)
    assert (row_b["chosen"], row_b["rejected"]) == (row_a["rejected"], row_a["chosen"])
    tie = label_row(pair, "tie", "alice", 0)
    assert "chosen" not in tie and (tie["answer_a"], tie["answer_b"]) == (pair.answers[a], pair.answers[b])
    assert {"annotator", "pair_id", "label", "shown_order", "time", "source"} <= set(row_a)
    with pytest.raises(ValueError, match="unknown label"):
        label_row(pair, "C", "alice", 0)


def test_append_line_from_threads_gives_whole_lines(tmp_path):
    path = tmp_path / "l.jsonl"
    text = "x" * 5000  # longer than a pipe buffer: interleaved writes would show up as broken JSON

    def worker(k):
        for i in range(25):
            append_line(path, {"k": k, "i": i, "text": text})

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_labels(path)
    assert len(rows) == 200
    assert sorted((r["k"], r["i"]) for r in rows) == [(k, i) for k in range(8) for i in range(25)]


def test_a_short_write_leaves_no_partial_line(tmp_path, monkeypatch):
    path = tmp_path / "l.jsonl"
    append_line(path, {"n": 1})
    before = path.read_bytes()
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[:7]))  # a disk that fills mid-line
    with pytest.raises(OSError, match="short write"):
        append_line(path, {"n": 2, "text": "a long enough row"})
    assert path.read_bytes() == before


def test_read_labels_refuses_a_damaged_file(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"a": 1}\n{"a": 2')
    with pytest.raises(DataError, match=r"l.jsonl, row 2: the last line is incomplete"):
        read_labels(path)
    path.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(DataError, match=r"row 2: not a JSON line"):
        read_labels(path)


def test_labels_resume_and_load_as_preferences(tmp_path):
    pairs, skipped = load_pair_file(write_pairs(tmp_path / "pairs.jsonl"))
    assert skipped == 0
    out = tmp_path / "labels" / "prefs.jsonl"
    s = Session(pairs, LabelStore(out), seed=3)
    assert s.progress("alice") == (0, 6) and s.next_pair("alice") is pairs[0]
    for pair, label in zip(pairs, ["A", "B", "tie", "skip"]):
        assert s.label("alice", pair.pair_id, label)
    assert not s.label("alice", pairs[0].pair_id, "B")  # a double press labels once
    assert s.label("bob", pairs[0].pair_id, "B")  # another annotator labels the same pair
    with pytest.raises(ValueError, match="annotator id"):
        s.label("  ", pairs[5].pair_id, "A")

    # a restarted page reads both files back: alice resumes at the fifth pair, bob at the second
    s2 = Session(load_pair_file(tmp_path / "pairs.jsonl")[0], LabelStore(out), seed=3)
    assert s2.progress("alice") == (4, 6) and s2.next_pair("alice").pair_id == pairs[4].pair_id
    assert s2.progress("bob") == (1, 6) and s2.next_pair("bob").pair_id == pairs[1].pair_id

    rows = read_labels(out)
    assert [(r["annotator"], r["label"]) for r in rows] == [("alice", "A"), ("alice", "B"), ("bob", "B")]
    assert [r["label"] for r in read_labels(side_path(out))] == ["tie", "skip"]
    assert side_path(out).name == "prefs.ties_skips.jsonl"
    # what the reward and dpo stages read: every A/B row, ties and skips nowhere in it
    loaded = load_preferences(DatasetSpec(path=str(out))).rows
    assert len(loaded) == 3
    for row, got in zip(rows, loaded):
        assert (got["prompt"], got["chosen"], got["rejected"]) == (row["prompt"], row["chosen"], row["rejected"])
    # the dpo / simpo stages' reader (pairs given as a file: --dpo.pairs=<out>)
    from prefopt.preference.data import load_pairs

    assert [r["chosen"] for r in load_pairs(str(out), "alpaca", None)] == [r["chosen"] for r in rows]
    shown = s.shown(pairs[0])
    assert rows[0]["chosen"] == shown[0] and rows[2]["chosen"] == shown[1]  # alice chose A, bob chose B


def test_pairs_with_an_empty_answer_are_skipped_and_limit_counts_served_pairs(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl", n=4)
    with open(path, "a") as f:  # the pairs stage keeps an empty candidate; no loader would take its label
        f.write(json.dumps({"prompt": "Sort 9 8", "chosen": "8 9", "rejected": ""}) + "\n")
    pairs, skipped = load_pair_file(path)
    assert (len(pairs), skipped) == (4, 1)
    assert [p.origin["row"] for p in load_pair_file(path, limit=2)[0]] == [1, 2]


def test_candidates_pair_two_distinct_answers_seeded(tmp_path):
    gen = tmp_path / "generate"
    gen.mkdir()
    rows = [{"prompt_id": "a", "prompt": "P1", "candidates": ["x", "y", "z", "w"]},
            {"prompt_id": "b", "prompt": "P2", "candidates": ["same", "same"]},  # nothing to judge
            {"prompt_id": "c", "prompt": "P3", "candidates": ["u", "u", "v"]},
            {"prompt_id": "e", "prompt": "P5", "candidates": ["t", " t\n", ""]}]  # the same text, and empty
    (gen / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, skipped = load_candidates(gen, seed=0)
    assert skipped == 2 and [p.prompt for p in pairs] == ["P1", "P3"]
    assert pairs[0].answers[0] != pairs[0].answers[1] and set(pairs[1].answers) == {"u", "v"}
    assert pairs[1].sources in (("candidate 0", "candidate 2"), ("candidate 2", "candidate 0"))
    again, _ = load_candidates(gen, seed=0)
    assert [p.answers for p in again] == [p.answers for p in pairs]
    (gen / "shard-00001.jsonl").write_text('{"prompt_id": "d", "prompt": "P4"}\n')
    with pytest.raises(DataError, match=r"shard-00001.jsonl, row 1, field 'candidates': missing"):
        load_candidates(gen)


@pytest.mark.parametrize("content, message", [
    (None, r"missing.jsonl: file not found"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": \n',
     r"bad.jsonl, row 2: invalid JSON"),
    ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "q", "chosen": "a"}\n',
     r"bad.jsonl, row 2, field 'rejected': missing"),
])
def test_an_unreadable_pairs_file_is_refused_before_serving(tmp_path, capsys, content, message):
    path = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        path.write_text(content)
    code = cli_main(["annotate", "--pairs", str(path), "--out", str(tmp_path / "out.jsonl"), "--port", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert len(err.splitlines()) == 1 and err.startswith("prefopt: data error: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out.jsonl").exists()


def test_a_damaged_label_file_is_refused_and_out_must_differ(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    (tmp_path / "out.jsonl").write_text('{"label": "A"')
    assert cli_main(["annotate", "--pairs", str(pairs), "--out", str(tmp_path / "out.jsonl")]) == 3
    assert "out.jsonl, row 1: the last line is incomplete" in capsys.readouterr().err
    assert cli_main(["annotate", "--pairs", str(pairs), "--out", str(pairs)]) == 2
    assert "the file being served" in capsys.readouterr().err
    assert cli_main(["annotate", "--pairs", str(pairs)]) == 2
    assert "--out FILE is needed" in capsys.readouterr().err


def test_config_mode_resolves_the_run_folder(tmp_path):
    cfg = {"name": "exp", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"},
           "annotate": {"annotator": "carol", "seed": 5}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    sec = resolve_section(args(config=str(path), port=0), ["--annotate.limit=2"])
    root = tmp_path / "runs" / "exp"
    assert sec.pairs == str(root / "pairs" / "pairs.jsonl")
    assert sec.out == str(root / "annotate" / "preferences.jsonl")
    assert (sec.annotator, sec.seed, sec.limit, sec.port) == ("carol", 5, 2, 0)
    sec2 = resolve_section(args(config=str(path), round=2, candidates=str(tmp_path / "gen")), [])
    assert sec2.source == "candidates" and sec2.pairs == str(root / "round2" / "pairs" / "pairs.jsonl")
    (root / "pairs").mkdir(parents=True)
    write_pairs(root / "pairs" / "pairs.jsonl", n=5)
    assert prepare(sec).progress("carol") == (0, 2)  # limit 2


def test_annotate_without_gradio_names_the_extra(tmp_path, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_gradio(name, *a, **kw):
        if name == "gradio" or name.startswith("gradio."):
            raise ImportError("No module named 'gradio'")
        return real_import(name, *a, **kw)

    monkeypatch.delitem(sys.modules, "prefopt.annotate.page", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_gradio)
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    assert cli_main(["annotate", "--pairs", str(pairs), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "pip install 'prefopt[annotate]'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the W&B run


class RecordingTracker:
    def __init__(self):
        self.logged, self.finished = [], None

    def log(self, metrics, step=None):
        self.logged.append((step, dict(metrics)))

    def finish(self, summary):
        self.finished = summary


def test_label_counts_are_logged_as_labels_arrive_and_resume(tmp_path):
    """Each written label logs the cumulative counts (all annotators and per annotator) at step = labels in the
    files; a double press logs nothing; a restarted page starts from what the files hold."""
    pairs, _ = load_pair_file(write_pairs(tmp_path / "pairs.jsonl"))
    out = tmp_path / "prefs.jsonl"
    tracker = RecordingTracker()
    s = Session(pairs, LabelStore(out), seed=0, tracker=tracker)
    for pair, label in zip(pairs, ["A", "A", "tie", "skip"]):
        s.label("alice", pair.pair_id, label)
    s.label("alice", pairs[0].pair_id, "B")  # already labelled: nothing written, nothing logged
    s.label("bob/x", pairs[0].pair_id, "B")
    assert [step for step, _ in tracker.logged] == [1, 2, 3, 4, 5]
    assert tracker.logged[0][1] == {"labels/A": 1, "labels/B": 0, "labels/tie": 0, "labels/skip": 0,
                                    "labels/total": 1, "annotator/alice/A": 1, "annotator/alice/B": 0,
                                    "annotator/alice/tie": 0, "annotator/alice/skip": 0}
    last = tracker.logged[-1][1]
    assert {k: last[k] for k in ("labels/A", "labels/B", "labels/tie", "labels/skip", "labels/total")} == {
        "labels/A": 2, "labels/B": 1, "labels/tie": 1, "labels/skip": 1, "labels/total": 5}
    assert (last["annotator/alice/A"], last["annotator/alice/skip"], last["annotator/bob_x/B"]) == (2, 1, 1)

    again = RecordingTracker()
    s2 = Session(pairs, LabelStore(out), seed=0, tracker=again)
    assert s2.log_counts() == last and again.logged == [(5, last)]
    assert s2.summary() == {"pairs": 6, "out": str(out), "ties_skips": str(side_path(out)), **last}


def _fake_page(labels):
    """Stands in for page.py (no gradio): `serve` labels as a browser would, then returns as after Ctrl-C."""
    def serve(session, host, port, annotator):
        for pair, label in zip(session.pairs, labels):
            session.label(annotator, pair.pair_id, label)
    from types import SimpleNamespace

    return SimpleNamespace(serve=serve)


def test_annotate_command_has_an_offline_wandb_run_with_the_counts(tmp_path, monkeypatch):
    """`prefopt annotate --pairs ... --out ...` without a key: an offline W&B run beside the label file whose
    summary holds the counts, and its metrics.jsonl one row per label (plus the start); the labels file is
    the same as without a run."""
    from wandb.sdk.wandb_run import Run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "prefopt.annotate.page", _fake_page(["A", "B", "tie", "A"]))
    sent, ended = [], {}  # what reached the W&B run (an offline run's .wandb file has no reader in wandb itself)
    real_log, real_finish = Run.log, Run.finish
    monkeypatch.setattr(Run, "log", lambda self, data, step=None, **k: sent.append((step, dict(data)))
                        or real_log(self, data, step=step, **k))
    keys = ("labels/A", "labels/tie", "annotator/alice/B", "pairs")
    monkeypatch.setattr(Run, "finish", lambda self, *a, **k: ended.update({x: self.summary[x] for x in keys})
                        or real_finish(self, *a, **k))
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "labels" / "prefs.jsonl"
    argv = ["annotate", "--pairs", str(pairs), "--out", str(out), "--annotator", "alice", "--port", "1"]
    assert cli_main(argv) == 0
    run = tmp_path / "labels" / "prefs.run"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert {k: rows[-1][k] for k in ("labels/A", "labels/B", "labels/tie", "labels/skip", "annotator/alice/A")} == {
        "labels/A": 2, "labels/B": 1, "labels/tie": 1, "labels/skip": 0, "annotator/alice/A": 2}
    assert len(list(run.glob("wandb/offline-run-*/*.wandb"))) == 1
    assert sent == [(r["step"], {k: v for k, v in r.items() if k not in ("step", "time")}) for r in rows]
    assert ended == {"labels/A": 2, "labels/tie": 1, "annotator/alice/B": 1, "pairs": 6}
    assert [r["label"] for r in read_labels(out)] == ["A", "B", "A"]
    assert yaml.safe_load((run / "config.yaml").read_text())["stage"] == "annotate"


def test_annotate_with_wandb_disabled_keeps_the_local_record(tmp_path, monkeypatch):
    """`wandb.mode: disabled` in the experiment config: no W&B files, the counts still in
    <run>/annotate/metrics.jsonl."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "prefopt.annotate.page", _fake_page(["B", "skip"]))
    cfg = {"name": "exp", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"},
           "annotate": {"annotator": "carol"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(cfg))
    root = tmp_path / "runs" / "exp"
    (root / "pairs").mkdir(parents=True)
    write_pairs(root / "pairs" / "pairs.jsonl", n=3)
    assert cli_main(["annotate", str(tmp_path / "exp.yaml"), "--port", "1"]) == 0
    d = root / "annotate"
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert (rows[-1]["labels/B"], rows[-1]["labels/skip"], rows[-1]["annotator/carol/B"]) == (1, 1, 1)
    assert not (d / "wandb").exists() and [r["label"] for r in read_labels(d / "preferences.jsonl")] == ["B"]
