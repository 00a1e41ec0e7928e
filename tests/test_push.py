"""`prefopt push`: the folder it would upload loads back (datasets, transformers), its card parses with
huggingface_hub and carries the provenance; the upload goes through one replaceable function; bad input is one line."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_experiment
from prefopt.config import from_dict, to_dict
from prefopt.experiment import ExperimentConfig

GEN = {"path": "runs/exp/sft/model", "sha256": "261a38f675df6dc8", "backend": "transformers"}
SAMPLING = {"n": 3, "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 16, "seed": 5}
RM = {"path": "runs/exp/reward/model", "sha256": "ba413a563e761b88"}


def cli(*args) -> tuple[int, str, str]:
    from prefopt.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def _stage(root: Path, stage: str, experiment: dict, summary: dict) -> Path:
    d = root / stage
    d.mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"experiment": experiment, "stage": stage, "round": 1,
                                                   "versions": {"transformers": "5.23.0", "prefopt": "0.1.0"}}))
    (d / "summary.json").write_text(json.dumps({"stage": stage, "round": 1, **summary}))
    (d / "_DONE.json").write_text(json.dumps({"fingerprint": "0" * 16, "finished": 1.7e9, "outputs": {}}))
    return d


@pytest.fixture
def run(tmp_path, tiny_model_dir):
    """A finished run's generate, score, pairs, dpo and evaluate folders in the formats the stages write."""
    exp = to_dict(from_dict(ExperimentConfig, tiny_experiment(tmp_path, name="exp", base={"model": "Qwen/Qwen2.5-0.5B"},
                                                              sft={"model": "stage:base"})))
    root = tmp_path / "runs" / "exp"
    prompts = [(f"p{i}", f"Sort {i} 2 1.") for i in range(5)]
    gen = _stage(root, "generate", exp, {"candidates": 15})
    (gen / "shard-00000.jsonl").write_text("".join(json.dumps(
        {"prompt_id": pid, "prompt": p, "candidates": [f"{i}a", f"{i}b", f"{i}c"], "sampling": SAMPLING, "seed": 5,
         "generator": GEN}) + "\n" for i, (pid, p) in enumerate(prompts)))
    score = _stage(root, "score", exp, {"scored": 15})
    (score / "shard-00000.jsonl").write_text("".join(json.dumps(
        {"prompt_id": pid, "scores": [0.5 * i, -1.0, 2.0], "reward_model": RM}) + "\n" for i, (pid, _) in
        enumerate(prompts)))
    pairs = _stage(root, "pairs", exp, {"pairs": 4, "margin/mean": 1.25, "gold/chosen_better": 0.75})
    rows = [{"prompt_id": pid, "prompt": p, "chosen": f"{i}c", "rejected": f"{i}b", "chosen_index": 2,
             "rejected_index": 1, "chosen_score": 2.0, "rejected_score": -1.0, "chosen_len": 2, "rejected_len": 2,
             "generator_sha256": GEN["sha256"], "reward_model_sha256": RM["sha256"], "seed": 5}
            for i, (pid, p) in enumerate(prompts[:4])]
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo = _stage(root, "dpo", exp, {"loss": 0.5, "rewards/accuracies": 0.75, "steps": 2})
    shutil.copytree(tiny_model_dir, dpo / "model")
    ev = _stage(root, "evaluate", exp, {"policies": {}})
    (ev / "table.md").write_text("| policy | gold |\n|---|---|\n| sft | 0.500 ± 0.020 |\n| dpo | 0.700 ± 0.010 |\n")
    return root, rows


def test_pairs_folder_loads_back_with_its_provenance(run, tmp_path):
    from datasets import load_dataset
    from huggingface_hub import DatasetCard

    root, rows = run
    out = tmp_path / "repo"
    code, stdout, err = cli("push", root / "pairs", "alice/exp-pairs", "--to-dir", out, "--license", "mit")
    assert code == 0, err
    assert f"hf upload alice/exp-pairs {out} . --repo-type=dataset" in stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "README.md", "data/candidates/train-00000-of-00001.parquet", "data/pairs/train-00000-of-00001.parquet"]
    # the default config is the pairs, split train, the same rows in the same order
    cache = tmp_path / "hf-cache"  # not the shared datasets cache: a stale entry there must not answer for these files
    ds = load_dataset(str(out), cache_dir=str(cache))
    assert list(ds) == ["train"] and [dict(r) for r in ds["train"]] == rows
    cand = load_dataset(str(out), "candidates", split="train", cache_dir=str(cache))
    assert cand[2]["candidates"] == ["2a", "2b", "2c"] and cand[2]["scores"] == [1.0, -1.0, 2.0]
    assert cand[2]["generator_sha256"] == GEN["sha256"]

    card = DatasetCard.load(out / "README.md")
    assert card.data.license == "mit" and "prefopt" in card.data.tags and "pairs" in card.data.tags
    prov = card.data.prefopt
    assert prov["generator"] == {**GEN, "sampling": SAMPLING} and prov["reward_model"] == RM
    assert prov["seed"] == 1 and prov["experiment"] == "exp" and prov["stage"] == "pairs"
    assert prov["summary"]["pairs"] == 4 and prov["versions"]["transformers"] == "5.23.0"
    assert "- `gold/chosen_better`: 0.75" in card.text and "## Experiment config" in card.text
    assert "| dpo | 0.700 ± 0.010 |" in card.text  # the run's evaluation table
    assert yaml.safe_load(card.text.split("```yaml\n")[1].split("```")[0])["dpo"]["beta"] == 0.1


def test_model_folder_loads_with_transformers_and_the_card_has_the_method(run, tmp_path, tiny_model_dir):
    import torch
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root, _ = run
    out = tmp_path / "repo"
    code, _, err = cli("push", root / "dpo", "alice/exp-dpo", "--to-dir", out)
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 3]])
    pushed = AutoModelForCausalLM.from_pretrained(out).eval()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        torch.testing.assert_close(pushed(ids).logits, original(ids).logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out)("hi")["input_ids"] == AutoTokenizer.from_pretrained(tiny_model_dir)(
        "hi")["input_ids"]

    card = ModelCard.load(out / "README.md")
    # base_model follows dpo.model -> stage:sft -> stage:base -> the Hub id base.model names
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B" and card.data.library_name == "transformers"
    assert {"prefopt", "dpo", "arxiv:2305.18290"} <= set(card.data.tags) and card.data.license == "other"
    prov = card.data.prefopt
    assert prov["generator"]["sha256"] == GEN["sha256"] and prov["reward_model"]["sha256"] == RM["sha256"]
    assert len(prov["weights_sha256"]) == 16 and prov["summary"]["rewards/accuracies"] == 0.75
    assert "| dpo | 0.700 ± 0.010 |" in card.text and "arxiv.org/abs/2305.18290" in card.text


def test_upload_goes_through_hub_upload(run, tmp_path, monkeypatch):
    import prefopt.push

    root, _ = run
    sent = []

    def recorder(folder, repo_id, repo_type, private, revision, token):
        sent.append((sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()), repo_id,
                     repo_type, private, revision, token))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(prefopt.push, "hub_upload", recorder)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    code, stdout, err = cli("push", root / "dpo", "alice/exp-dpo", "--private", "--revision", "v1")
    assert code == 0, err
    assert sent == [(sorted(["README.md", *(p.name for p in (root / "dpo" / "model").iterdir()
                                           if not p.name.startswith("."))]),
                     "alice/exp-dpo", "model", True, "v1", "hf_test")]
    assert "[prefopt] push: dpo -> https://huggingface.co/alice/exp-dpo" in stdout


def test_bad_input_is_one_line(run, tmp_path, monkeypatch):
    import huggingface_hub

    root, _ = run
    code, _, err = cli("push", root / "dpo", "exp-dpo", "--to-dir", tmp_path / "x")
    assert (code, err) == (2, "prefopt: config error: repo id 'exp-dpo': must be owner/name (letters, digits, '-', "
                              "'_', '.'), e.g. alice/quickstart-dpo\n")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    code, out, err = cli("push", root / "dpo", "alice/exp-dpo")  # no token: written here, the command printed
    local = root / "push" / "alice__exp-dpo"
    assert (code, err) == (0, "") and (local / "README.md").is_file() and (local / "config.json").is_file()
    assert f"hf upload alice/exp-dpo {local} . --repo-type=model" in out and "nothing uploaded" in out
    (root / "dpo" / "_DONE.json").unlink()
    code, _, err = cli("push", root / "dpo", "alice/exp-dpo", "--to-dir", tmp_path / "y")
    assert (code, err) == (3, f"prefopt: data error: {root / 'dpo'}: stage dpo has not finished (no valid "
                              "_DONE.json); run it first, then push its result\n")
    code, _, err = cli("push", root / "evaluate", "alice/exp-eval", "--to-dir", tmp_path / "z")
    assert code == 2 and "evaluate makes nothing to publish" in err
    assert not (tmp_path / "y").exists() and not (tmp_path / "z").exists()


def test_push_to_hub_publishes_named_stages_when_the_run_ends(run, tmp_path, monkeypatch):
    """`push_to_hub: {stage: repo}` pushes each named stage's result (offline: under <experiment>/push/ with the
    upload command); a stage with nothing to publish, a malformed repo id or a replicated stage is a config error
    naming the key."""
    import huggingface_hub

    from prefopt.config import ConfigError
    from prefopt.push import publish

    root, _ = run
    exp = yaml.safe_load((root / "dpo" / "config.yaml").read_text())["experiment"]
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    cfg = from_dict(ExperimentConfig, {**exp, "push_to_hub": {"pairs": "alice/exp-pairs", "dpo": "alice/exp-dpo"}})
    out = publish(cfg)
    assert out == [root / "push" / "alice__exp-pairs", root / "push" / "alice__exp-dpo"]
    from datasets import load_dataset

    rows = [json.loads(x) for x in (root / "pairs" / "pairs.jsonl").read_text().splitlines()]
    pushed = load_dataset(str(out[0]), "pairs", split="train", cache_dir=str(tmp_path / "cache"))
    assert pushed["chosen"] == [r["chosen"] for r in rows]
    for bad, key in (({"evaluate": "alice/x"}, "push_to_hub.evaluate"), ({"dpo": "x"}, "push_to_hub.dpo")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict(ExperimentConfig, {**exp, "push_to_hub": bad})
    with pytest.raises(ConfigError, match="runs once per seed"):
        from_dict(ExperimentConfig, {**exp, "replicates": 2, "push_to_hub": {"dpo": "alice/exp-dpo"}})
