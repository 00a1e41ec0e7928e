"""What the W&B page of an experiment shows, read back from the offline runs' own files (no key, no network)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import tiny_experiment
from prefopt.experiment import ExperimentConfig, for_seed
from prefopt.config import from_dict
from prefopt.runtime.tracking import Tracker, read_offline_run, run_name, stage_tables


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_run_names():
    assert run_name("quickstart", "dpo") == "quickstart/dpo"
    assert run_name("quickstart", "dpo", 2) == "quickstart/dpo/round2"
    assert run_name("quickstart", "dpo", 2, 43) == "quickstart/dpo/round2/seed43"
    assert run_name("quickstart", "evaluate", 1, 7) == "quickstart/evaluate/seed7"


def test_evaluate_run_has_group_job_type_name_config_summary_and_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = from_dict(ExperimentConfig, {**tiny_experiment(tmp_path), "seeds": [7, 8]})
    cfg = for_seed(cfg, 7)
    d = tmp_path / "evaluate"
    d.mkdir()
    prompt = lambda i: f"Sort {i} 1."  # noqa: E731
    # the baseline's samples in another order than the policy's: rows are matched by (prompt_id, sample)
    _jsonl(d / "samples_sft.jsonl", [{"prompt_id": f"p{i}", "prompt": prompt(i), "sample": s, "response": f"sft {i}.{s}",
                                      "rm": -1.0 - i, "gold": 0.0} for i in reversed(range(3)) for s in range(2)])
    _jsonl(d / "samples_dpo.jsonl", [{"prompt_id": f"p{i}", "prompt": prompt(i), "sample": s, "response": f"dpo {i}.{s}",
                                      "rm": 0.5 + i, "gold": 1.0} for i in range(3) for s in range(2)])
    summary = {"stage": "evaluate", "baseline": "sft", "split": "test",
               "policies": {"sft": {"gold_score": 0.25, "gold_score_se": 0.05, "model": "x"},
                            "dpo": {"gold_score": 0.75, "gold_score_se": 0.04, "model": "y"}},
               "curves": {"dpo": [{"step": 0, "kl": 0.0, "gold": 0.25, "rm": -1.0},
                                  {"step": 25, "kl": 0.8, "kl_se": 0.1, "gold": 0.7, "gold_se": 0.02, "rm": 0.5},
                                  {"step": "final", "kl": 0.9, "gold": 0.75, "rm": 0.6}]},
               "best_of_n": [{"n": 4, "kl": 0.4, "kl_se": 0.01, "gold": 0.6, "gold_se": 0.03, "rm": 0.1}]}
    tracker = Tracker.start(cfg, "evaluate", d, 2, {"replicate_seed": 7})
    tables = stage_tables("evaluate", d, summary, max_rows=4)
    tracker.log_tables(tables)
    tracker.finish(summary)

    run = read_offline_run(next((d / "wandb").glob("offline-run-*")))
    assert (run["name"], run["group"], run["job_type"]) == ("tiny/evaluate/round2/seed7", "tiny", "evaluate")
    # config: the experiment's own fields and this stage's section, not the other stages'
    assert run["config"]["name"] == "tiny" and run["config"]["seed"] == cfg.seed
    assert run["config"]["evaluate"]["samples_per_prompt"] == 1 and run["config"]["replicate_seed"] == 7
    assert "dpo" not in run["config"] and "sft" not in run["config"] and "launch" in run["config"]
    # summary: the stage's summary.json figures, flattened
    assert run["summary"]["policies/dpo/gold_score"] == 0.75 and run["summary"]["policies/sft/gold_score_se"] == 0.05
    assert run["summary"]["split"] == "test"
    # the evaluation table: a row per policy, its figures and their standard errors
    ev = run["tables"]["evaluation"]
    assert ev["columns"] == ["policy", "gold_score", "gold_score_se"]
    assert ev["data"] == [["sft", 0.25, 0.05], ["dpo", 0.75, 0.04]]
    # samples: 4 of dpo's rows (the cap), each beside the baseline's response to the same prompt and sample
    s = run["tables"]["samples"]
    rows = [dict(zip(s["columns"], r)) for r in s["data"]]
    assert len(rows) == 4 and {r["policy"] for r in rows} == {"dpo"}
    # the over-optimisation curves (each aligner's checkpoints, best-of-n by n) and their line plots
    c = run["tables"]["curves"]
    assert c["columns"] == ["policy", "step", "kl", "kl_se", "gold", "gold_se", "rm", "rm_se"]
    assert c["data"] == [["dpo", 0, 0.0, None, 0.25, None, -1.0, None], ["dpo", 25, 0.8, 0.1, 0.7, 0.02, 0.5, None],
                         ["dpo", "final", 0.9, None, 0.75, None, 0.6, None],  # the final model: step "final"
                         ["best_of_n", 4, 0.4, 0.01, 0.6, 0.03, 0.1, None]]
    for y in ("gold", "rm"):
        chart = run["config"][f"_wandb/visualize/{y}_vs_kl"]["panel_config"]
        assert chart["panelDefId"] == "wandb/line/v0"
        assert chart["fieldSettings"] == {"x": "kl", "y": y, "stroke": "policy"}
        assert run["summary"][f"{y}_vs_kl_table/path"] == run["summary"]["curves/path"]  # the same table's file
    assert rows[3] == {"policy": "dpo", "prompt_id": "p1", "sample": 1, "prompt": "Sort 1 1.", "response": "dpo 1.1",
                       "baseline_response": "sft 1.1", "rm": 1.5, "baseline_rm": -2.0, "gold": 1.0,
                       "baseline_gold": 0.0}


def test_pairs_table_is_capped(tmp_path):
    _jsonl(tmp_path / "pairs.jsonl", [{"prompt_id": f"p{i}", "prompt": "x", "chosen": "a", "rejected": "b",
                                       "chosen_score": 1.0, "rejected_score": -float(i), "chosen_len": 1,
                                       "rejected_len": 2, "seed": 0} for i in range(250)])
    cols, rows = stage_tables("pairs", tmp_path, {})["pairs"]
    assert len(rows) == 100 and cols[:4] == ["prompt_id", "prompt", "chosen", "rejected"]
    assert rows[99][cols.index("rejected_score")] == -99.0
    assert stage_tables("sft", tmp_path, {}) == {}


def test_a_table_wandb_refuses_is_a_warning_not_a_failed_stage(tmp_path, capsys):
    class Refusing:
        def log(self, data, step=None):
            raise RuntimeError("upload refused")

    tracker = Tracker(tmp_path, Refusing(), "offline")
    tracker.log_tables({"pairs": (["a"], [[1]])})
    assert capsys.readouterr().out == ("WARNING: W&B tables ['pairs'] not logged (RuntimeError: upload refused)\n")


def test_an_offline_command_makes_its_whole_process_offline_for_wandb(tmp_path, monkeypatch):
    """`auto` without credentials, or `offline`: the CLI sets WANDB_MODE=offline for itself and the stages it
    launches (W&B starts its analytics from the process-wide mode, not the run's). A mode the environment already
    names, an online run and a disabled one are left as they are."""
    import os
    import yaml

    from prefopt.cli import main
    from prefopt.runtime.tracking import offline_process

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with W&B credentials
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for requested, preset, expected in [("auto", None, "offline"), ("offline", None, "offline"),
                                        ("online", None, None), ("disabled", None, None),
                                        ("auto", "online", "online"), ("offline", "disabled", "disabled")]:
        if preset is None:
            monkeypatch.delenv("WANDB_MODE", raising=False)
        else:
            monkeypatch.setenv("WANDB_MODE", preset)
        offline_process(requested)
        assert os.environ.get("WANDB_MODE") == expected, (requested, preset)

    # through the CLI: `prefopt check` on an experiment with the default `auto` mode and no key
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump({**tiny_experiment(tmp_path), "wandb": {"mode": "auto"}}))
    main(["check", str(cfg)])
    assert os.environ.get("WANDB_MODE") == "offline"
