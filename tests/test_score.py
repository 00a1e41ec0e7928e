"""The `score` stage: batched scores equal one-by-one scores, finished shards are skipped, and the cache makes a
second run over the same candidates cost no model call."""

import shutil

import pytest

from prefopt.config import from_dict
from prefopt.experiment import ExperimentConfig
from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
from prefopt.scoring.scorer import load_scorer, reward_text, score_texts
from prefopt.stage import run_stage
from prefopt.dist.process import seed_everything
from prefopt.io import read_jsonl, weights_sha256, write_jsonl


@pytest.fixture(scope="module")
def tiny_rm_dir(tiny_model_dir, tmp_path_factory):
    seed_everything(0)
    model = load_reward_model(str(tiny_model_dir))  # random score head on the tiny Llama
    out = tmp_path_factory.mktemp("rm") / "model"
    save_model(model, load_tokenizer(str(tiny_model_dir)), out)
    return out


def _generate_shards(root):
    gen = {"path": "/models/sft", "sha256": "gen"}
    rows = [{"prompt_id": f"p{i}", "prompt": f"### Input:\n{i} 3 1\n\n### Response:\n",
             "candidates": ["1 3", f"{i} 1 3", "1 3", "3 1 0 0 0 0 0"], "sampling": {"n": 4}, "seed": 0,
             "generator": gen} for i in range(5)]
    write_jsonl(root / "generate" / "shard-00000.jsonl", rows[:3])
    write_jsonl(root / "generate" / "shard-00001.jsonl", rows[3:])
    return rows


def _cfg(tmp_path, rm_dir, **score):
    return from_dict(ExperimentConfig, {"name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"},
                                        "score": {"reward_model": str(rm_dir), "batch_size": 3, **score}})


def test_batched_scores_match_single(tiny_rm_dir):
    scorer = load_scorer(str(tiny_rm_dir))
    model, tok = scorer.model, scorer.tokenizer
    texts = [reward_text("P: 3 1 2\n", r, tok.eos_token) for r in ["1 2 3", "1", "3 2 1 0 0 0 0 0 0"]]
    batched = score_texts(model, tok, texts, batch_size=3)
    single = [score_texts(model, tok, [t], batch_size=1)[0] for t in texts]
    assert batched == pytest.approx(single, abs=1e-5)  # right padding never leaks into the score
    assert len(set(round(s, 6) for s in batched)) == 3


def test_a_text_cut_at_the_reward_models_limit_is_said(tiny_rm_dir, capsys, monkeypatch):
    """The reward model reads at most max_length tokens of prompt + response; a longer text is scored cut, which
    the scorer says (with how many), and a text that fits is not counted."""
    import prefopt.scoring.scorer as module

    monkeypatch.setattr(module, "_CUT_WARNINGS", [0])  # said five times a process: this test's own count
    scorer = load_scorer(str(tiny_rm_dir))
    texts = [reward_text("P: 3 1 2\n", r, scorer.tokenizer.eos_token) for r in ["1 2 3", " ".join(["9 8 7"] * 20)]]
    lengths = [len(scorer.tokenizer(t)["input_ids"]) for t in texts]
    assert lengths[0] < 24 < lengths[1]
    score_texts(scorer.model, scorer.tokenizer, texts, batch_size=2, max_length=24)
    assert "[reward model] WARNING 1 of 2 texts reach the 24 tokens the reward model reads" in capsys.readouterr().out
    score_texts(scorer.model, scorer.tokenizer, texts[:1], batch_size=2, max_length=24)
    assert "WARNING" not in capsys.readouterr().out


def test_causal_lm_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="not a reward model"):
        load_scorer(str(tiny_model_dir))


def test_score_stage_resume_and_cache(tmp_path, tiny_rm_dir):
    root = tmp_path / "t"
    rows = _generate_shards(root)
    first = run_stage(_cfg(tmp_path, tiny_rm_dir), "score")
    # 20 candidates; "1 3" repeats inside each prompt, so 15 distinct (prompt, response) texts reach the model
    assert (first["candidates"], first["scored"], first["cached"]) == (20, 15, 5)
    out = read_jsonl(root / "score" / "shard-00000.jsonl") + read_jsonl(root / "score" / "shard-00001.jsonl")
    assert [r["prompt_id"] for r in out] == [r["prompt_id"] for r in rows]
    assert all(len(r["scores"]) == 4 and r["scores"][0] == r["scores"][2] for r in out)
    sha = weights_sha256(tiny_rm_dir)
    assert all(r["reward_model"] == {"path": str(tiny_rm_dir), "sha256": sha} for r in out)

    # a killed run: one shard finished, the other not -> only the unfinished one is redone (from the cache)
    (root / "score" / "shard-00001.jsonl").unlink()
    (root / "score" / "_DONE.json").unlink()
    resumed = run_stage(_cfg(tmp_path, tiny_rm_dir), "score")
    assert (resumed["shards_skipped"], resumed["scored"], resumed["cached"]) == (1, 0, 8)
    assert read_jsonl(root / "score" / "shard-00001.jsonl") == out[3:]

    # the same candidates scored again from scratch (another config, same model): no model call at all
    shutil.rmtree(root / "score")
    again = run_stage(_cfg(tmp_path, tiny_rm_dir, batch_size=7), "score")
    assert (again["scored"], again["cached"]) == (0, 20)
    again_rows = read_jsonl(root / "score" / "shard-00000.jsonl") + read_jsonl(root / "score" / "shard-00001.jsonl")
    assert again_rows == out
