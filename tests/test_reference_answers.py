"""Win rates against reference answers (`evaluate.reference`, AlpacaEval's way): matching each prompt to its
reference, the figures on hand-made scores, the stage's figures recomputed from its sample files, and the errors a
reference that does not fit the prompts gets."""

from __future__ import annotations

import json

import pytest

from prefopt.data.errors import DataError
from prefopt.data.spec import DatasetSpec
from prefopt.evaluate import metrics as M
from prefopt.evaluate import reference as REF
from prefopt.generation.base import Completion

PROMPTS = [
    {"instruction": "Sort the numbers in ascending order.", "input": "3 1 2"},
    {"instruction": "Name a colour.", "input": ""},
    {"instruction": "Sort the numbers in ascending order.", "input": "2 0"},
]
LONG = " ".join(["word"] * 60)
# in another order than the prompts, one answer given twice alike, one row for a prompt not evaluated
REFERENCES = [
    {"instruction": "Name a colour.", "output": LONG, "generator": "ref"},
    {"instruction": "Sort the numbers in ascending order.", "input": "2 0", "output": "x", "generator": "ref"},
    {"instruction": "Unrelated.", "output": "y", "generator": "ref"},
    {"instruction": "Sort the numbers in ascending order.", "input": "3 1 2", "output": "x", "generator": "ref"},
    {"instruction": "Name a colour.", "output": LONG, "generator": "ref"},
]


def _json(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _prompt_rows(tmp_path):
    from prefopt.data.loaders import load_prompts

    return load_prompts(DatasetSpec(path=str(_json(tmp_path / "prompts.json", PROMPTS)))).rows


def test_each_prompt_gets_its_own_reference(tmp_path):
    """Matched by instruction and input, whatever the order, duplicates that agree and rows not evaluated."""
    rows = _prompt_rows(tmp_path)
    got, _ = REF.answers(DatasetSpec(path=str(_json(tmp_path / "ref.json", REFERENCES))), "alpaca", rows,
                         "prompts.json")
    assert got == ["x", LONG, "x"]


def test_a_prompt_without_a_reference_is_named(tmp_path):
    rows = _prompt_rows(tmp_path)
    ref = _json(tmp_path / "ref.json", [r for r in REFERENCES if r["output"] != LONG])
    with pytest.raises(DataError) as e:
        REF.answers(DatasetSpec(path=str(ref)), "alpaca", rows, "prompts.json")
    msg = str(e.value)
    assert str(ref) in msg and "field 'evaluate.reference'" in msg
    assert "no answer to 1 of the 3 prompts of prompts.json" in msg and "Name a colour." in msg


def test_two_different_answers_to_one_prompt_are_refused(tmp_path):
    rows = _prompt_rows(tmp_path)
    ref = _json(tmp_path / "ref.json", REFERENCES + [{"instruction": "Name a colour.", "output": "red"}])
    with pytest.raises(DataError, match=r"answers one prompt twice, differently \(usable rows 1 and 6"):
        REF.answers(DatasetSpec(path=str(ref)), "alpaca", rows, "prompts.json")


def _set(lengths):
    return {"completions": [[Completion(text="a " * n, token_ids=[1] * n) for n in row] for row in lengths]}


def test_figures_against_the_reference_by_hand():
    """Policy RM scores [[1, 3], [1]] against the reference's [[2], [0]]: prompt 1 wins 1 of 2 (1/2), prompt 2
    wins (1): 0.75 ± sd([0.5, 1]) / sqrt(2) = 0.25; a tie counts 1/2 ([[2]] vs [[2]]: 0.5). Lengths equal on each
    side: the length-controlled rate is the regression's intercept alone, which weighs pairs, not prompts:
    (0 + 1 + 1) / 3. The names say `vs_ref`, none says `vs_sft`."""
    s, ref = _set([[3, 3], [3]]), _set([[3], [3]])
    f = REF.figures(s, None, [[1.0, 3.0], [1.0]], ref, None, [[2.0], [0.0]])
    assert f["win_rate_vs_ref"] == pytest.approx(0.75) and f["win_rate_vs_ref_se"] == pytest.approx(0.25)
    assert f["win_rate_vs_ref_lc"] == pytest.approx(2 / 3, abs=1e-4)
    assert not any("sft" in k for k in f) and "ref_identical_pairs" in f
    gold = REF.figures(_set([[3]]), [[2.0]], None, _set([[3]]), [[2.0]], None)
    assert gold == {"win_rate_vs_ref_gold": 0.5, "win_rate_vs_ref_gold_se": 0.0, "ref_identical_pairs": 1.0,
                    "ref_identical_pairs_se": 0.0}
    assert REF.judge_keys({"judge_win_rate": 0.6, "judge_win_rate_lc_se": 0.1, "judge_order_disagreement": 0.2}) == {
        "judge_win_rate_vs_ref": 0.6, "judge_win_rate_vs_ref_lc_se": 0.1, "judge_vs_ref_order_disagreement": 0.2}


@pytest.fixture(scope="module")
def ref_run(tiny_model_dir, tmp_path_factory):
    """The stage with two policies (the same tiny model under two names), a word-count reward function, the tiny
    model as judge and the references above."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    tmp = tmp_path_factory.mktemp("ref")
    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"a": str(tiny_model_dir), "sft": str(tiny_model_dir)}, "task": "none",
                     "reward_fn": "plugins.bad_tasks:reward_length", "reward_model": "",
                     "prompts": {"path": str(_json(tmp / "prompts.json", PROMPTS))},
                     "reference": {"path": str(_json(tmp / "ref.json", REFERENCES))},
                     "samples_per_prompt": 3, "max_new_tokens": 6, "backend": "transformers",
                     "judge": {"model": str(tiny_model_dir)}},
    })
    return cfg.root / "evaluate", run_stage(cfg, "evaluate")


def test_stage_figures_recomputed_from_its_files(ref_run, capsys):
    """Every policy's win rate against the reference is what its samples' and the reference's scores in the
    stage's files give; the reference file holds each prompt's own answer; the judge's figures are there; the
    console table shows the columns and says what they compare with."""
    from prefopt.pipeline import print_table

    d, summary = ref_run
    refs = [json.loads(x) for x in (d / "samples_reference.jsonl").read_text().splitlines()]
    assert [r["response"] for r in refs] == ["x", LONG, "x"] and [r["rm"] for r in refs] == [1.0, 60.0, 1.0]
    assert summary["reference"]["rm_score"] == pytest.approx(62 / 3) and summary["reference"]["prompts"] == 3
    for name in ("a", "sft"):
        rows = [json.loads(x) for x in (d / f"samples_{name}.jsonl").read_text().splitlines()]
        per = [M.prompt_win_rate([r["rm"] for r in rows if r["prompt_id"] == ref["prompt_id"]], [ref["rm"]])
               for ref in refs]
        f = summary["policies"][name]
        assert (f["win_rate_vs_ref"], f["win_rate_vs_ref_se"]) == pytest.approx(M.mean_se(per))
        assert per[1] == 0.0  # six new tokens never outnumber sixty words
        assert 0.0 < f["judge_win_rate_vs_ref"] < 1.0 and 0.0 <= f["judge_vs_ref_order_disagreement"] <= 1.0
        assert 0.0 <= f["win_rate_vs_ref_lc"] <= 1.0
    assert "judge_win_rate" in summary["policies"]["a"] and "judge_win_rate" not in summary["policies"]["sft"]
    print_table(summary)
    out = capsys.readouterr().out
    assert "ref win (RM)" in out and "ref win (judge)" in out and "judge win" in out
    assert "reference answers of" in out and "ref.json" in out and "by the reward model and by the judge" in out
    assert "win vs ref (RM)" in (d / "table.md").read_text()


def test_reference_missing_a_prompt_stops_before_sampling(tiny_model_dir, tmp_path):
    """The error names the reference file and the key, and nothing was sampled."""
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    cfg = from_dict(ExperimentConfig, {
        "name": "t", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(tiny_model_dir)}, "task": "none", "reward_model": "",
                     "prompts": {"path": str(_json(tmp_path / "prompts.json", PROMPTS))},
                     "reference": {"path": str(_json(tmp_path / "ref.json", REFERENCES[:2]))},
                     "backend": "transformers"},
    })
    with pytest.raises(DataError, match=r"ref\.json, field 'evaluate\.reference': has no answer to 1 of the 3"):
        run_stage(cfg, "evaluate")
    assert not list((tmp_path / "t").rglob("sft.json"))
