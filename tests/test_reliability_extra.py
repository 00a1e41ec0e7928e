"""More of issue 12: a rebuilt input stage is never answered with stale shards, a NaN reward score stops `score`
before it is written anywhere, `generate.dtype` is checked at load time, and `report` / `annotate` take the
experiment lock that `run` and the stage commands take.

The reward model here is a stand-in (`load_scorer` patched): what is under test is what the stage does with the
scores it is given, not a model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from conftest import tiny_experiment, write_yaml

REPO = Path(__file__).resolve().parents[1]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(folder: Path) -> list[dict]:
    return [json.loads(ln) for p in sorted(folder.glob("shard-*.jsonl")) for ln in p.read_text().splitlines()]


def cli(*args) -> tuple[int, str]:
    """`prefopt ARGS` in this process: (exit code, stderr)."""
    import contextlib
    import io

    from prefopt.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def crc_score(prompt: str, response: str) -> float:
    """A stand-in reward: a different number for (almost) every different text, the same for the same text."""
    return zlib.crc32((prompt + response).encode()) / 2**32


class FakeScorer:
    def __init__(self, fn):
        self.fn = fn

    def score(self, prompts, responses, batch_size=64, max_length=512, progress=None):
        return [self.fn(p, r) for p, r in zip(prompts, responses)]


# ------------------------------------------------------------------------------------------ stale shards


def test_rebuilt_generate_makes_score_redo_every_shard(tmp_path, tiny_model_dir, monkeypatch):
    """The prompts file (an outside input) changes: generate reruns with the same config and writes other
    candidates. Score's config did not change, and its old shards are intact, but they score the old candidates:
    the rerun must score the new ones, not link the old shards in."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.scoring import scorer as score
    from prefopt.stage import run_stage, stage_status

    monkeypatch.setattr(score, "load_scorer", lambda path, trust_remote_code=False, **kw: FakeScorer(crc_score))
    prompts = tmp_path / "prompts.jsonl"
    _jsonl(prompts, [{"instruction": f"Sort {i} {i + 2} {i + 1}.", "input": ""} for i in range(6)])
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"},
        "stages": ["generate", "score"],
        "generate": {"model": str(tiny_model_dir), "prompts": {"path": str(prompts)}, "backend": "transformers",
                     "n": 2, "max_new_tokens": 4, "shard_size": 2, "batch_size": 2},
        "score": {"reward_model": "stand-in/rm", "max_length": 64, "rm_format": "policy"}})  # the stand-in has no tokenizer to read
    root = tmp_path / "runs" / "t"
    run_stage(cfg, "generate")
    run_stage(cfg, "score")
    old_gen = _rows(root / "generate")

    _jsonl(prompts, [{"instruction": f"Reverse {i} {i + 1} {i + 3}.", "input": ""} for i in range(6)])
    assert stage_status(cfg, "generate") == (False, f"input file {prompts.resolve()} changed since the stage ran")
    run_stage(cfg, "generate")
    new_gen = _rows(root / "generate")
    assert [r["prompt"] for r in new_gen] != [r["prompt"] for r in old_gen]
    assert stage_status(cfg, "score") == (False, "input stage generate was rebuilt since this stage ran")

    summary = run_stage(cfg, "score")
    assert summary["shards_skipped"] == 0 and summary["candidates"] == 12
    scored = _rows(root / "score")
    assert [r["prompt_id"] for r in scored] == [r["prompt_id"] for r in new_gen]
    assert [r["scores"] for r in scored] == [[crc_score(g["prompt"], c) for c in g["candidates"]] for g in new_gen]
    assert stage_status(cfg, "score")[0]


# ------------------------------------------------------------------------------------------ non-finite scores


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_score_from_the_reward_model_is_a_data_error(tmp_path, monkeypatch, bad):
    """The reward model returns NaN (or inf) for one candidate: exit code 3, one line naming the shard, row,
    candidate, reward model and prompt_id; no score shard and no cache line is written."""
    from prefopt.scoring import scorer as score

    def fn(prompt, response):
        return bad if response == "z" else 0.5

    monkeypatch.setattr(score, "load_scorer", lambda path, trust_remote_code=False, **kw: FakeScorer(fn))
    gen = tmp_path / "gen"
    gen.mkdir()
    shard = _jsonl(gen / "shard-00000.jsonl", [{"prompt_id": "a", "prompt": "p", "candidates": ["x", "y"]},
                                               {"prompt_id": "b", "prompt": "q", "candidates": ["x", "z"]}])
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["score"], wandb={"mode": "disabled"},
                                                          score={"reward_model": "stand-in/rm", "max_length": 64,
                                                                 "rm_format": "policy",
                                                                 "candidates": str(gen)}))
    code, err = cli("score", exp)
    assert code == 3
    # the progress bar shares stderr (and, unclosed, the line): only the message itself is compared
    assert re.findall(r"prefopt: [^\r\n]*", err) == [
        f"prefopt: data error: {shard}, row 2, field 'candidates[1]': the reward model stand-in/rm gave a "
        f"non-finite score ({bad!r}) for prompt_id 'b'; check the reward model"]
    assert "Traceback" not in err
    root = tmp_path / "runs" / "tiny"
    assert not list(root.glob("**/shard-*.jsonl"))
    cache = root / "cache" / "scores.jsonl"
    assert not cache.exists() or cache.read_text() == ""


# ------------------------------------------------------------------------------------------ config values


def test_generate_dtype_is_checked_at_load_time(tmp_path):
    exp = write_yaml(tmp_path / "e.yaml", {"name": "x", "output_dir": str(tmp_path / "runs")})
    code, err = cli("check", exp, "--generate.dtype=half")
    assert (code, err) == (2, "prefopt: config error: generate.dtype: expected one of ['auto', 'float32', "
                              "'bfloat16', 'float16'], got 'half'\n")


# ------------------------------------------------------------------------------------------ the lock


def _locked_line(root: Path) -> str:
    return (f"prefopt: lock error: {root} is in use by another prefopt run (pid {os.getpid()}); wait for it or use "
            "another experiment name")


def test_report_during_a_run_is_refused(tmp_path):
    from prefopt.pipeline import experiment_lock

    root = tmp_path / "runs" / "tiny"
    root.mkdir(parents=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    env.pop("PREFOPT_LOCK_HELD", None)
    with experiment_lock(root):
        out = subprocess.run([sys.executable, "-m", "prefopt", "report", str(root)], cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 4, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert [ln for ln in out.stderr.splitlines() if ln.startswith("prefopt:")] == [_locked_line(root)]
    assert not (root / "report").exists()


def test_annotate_into_the_experiment_during_a_run_is_refused(tmp_path):
    """With the config (labels go to runs/<name>/annotate/) and with only --out inside that folder."""
    from prefopt.pipeline import experiment_lock

    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path))
    root = tmp_path / "runs" / "tiny"
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    with experiment_lock(root):
        assert cli("annotate", exp) == (4, _locked_line(root.resolve()) + "\n")
        out = root / "annotate" / "labels.jsonl"
        assert cli("annotate", "--pairs", pairs, "--out", out) == (4, _locked_line(root.resolve()) + "\n")
    assert not (root / "annotate").exists()


def test_pipeline_pairs_may_differ_only_in_whitespace_a_users_may_not(tmp_path, tiny_model_dir):
    """`7` against ` 7` are different tokens that the reward model scored apart (seen on the lookup task): the pairs
    stage's own file trains on them; in a user's file the same row is refused as a pair with nothing to learn."""
    import json as _json

    from prefopt.data.errors import DataError
    from prefopt.models.loading import load_tokenizer
    from prefopt.preference.data import load_pairs

    tok = load_tokenizer(str(tiny_model_dir))
    row = {"prompt": "Value of k?", "chosen": "7", "rejected": " 7"}
    built, user = tmp_path / "pairs", tmp_path / "mine"
    for d in (built, user):
        d.mkdir()
        (d / "pairs.jsonl").write_text(_json.dumps(row) + "\n")
    (built / "_FINGERPRINT").write_text("x")
    assert load_pairs(str(built), "alpaca", tok)[0]["rejected"] == " 7"
    with pytest.raises(DataError, match="same text as 'chosen'"):
        load_pairs(str(user), "alpaca", tok)
