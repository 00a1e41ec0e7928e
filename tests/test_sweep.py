"""`prefopt sweep`: parsing W&B sweep files, expanding grid / random trials, sharing upstream stages, and a real
2x2 grid over a tiny experiment (slow)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from prefopt.cli import main as cli_main
from prefopt.config import ConfigError
from prefopt.experiment import load_config
from prefopt.experiment import stage_dir
from prefopt.stage import fingerprint
from prefopt.sweep import Sweep, expand, load_sweep, parse_command, reuse_upstream, run_sweep, write_table

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))

TINY = {
    "name": "tiny",
    "seed": 0,
    "output_dir": "runs",
    "stages": ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo", "evaluate"],
    "wandb": {"mode": "offline"},
    "launch": {"launcher": "inline"},
    "task": {"num_sft": 64, "num_prompts": 16, "num_test_prompts": 8, "num_val_prompts": 8, "num_preferences": 64},
    "base": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
             "intermediate_size": 64},
    "sft": {"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 192, "logging_steps": 1},
    "generate": {"n": 2, "max_new_tokens": 8, "batch_size": 16},
    "reward": {"max_steps": 2, "per_device_train_batch_size": 8, "max_length": 192, "logging_steps": 1,
               "min_eval_accuracy": 0},  # 2 steps learn nothing: the gate (tested in test_trust.py) is off
    "score": {"batch_size": 16},
    "dpo": {"max_steps": 2, "per_device_train_batch_size": 4, "max_length": 192, "logging_steps": 1},
    "evaluate": {"samples_per_prompt": 1, "max_new_tokens": 8, "batch_size": 16, "split": "validation"},
}
GRID = {
    "name": "grid",
    "method": "grid",
    "metric": {"name": "policies/dpo/gold_score", "goal": "maximize"},
    "parameters": {"dpo.beta": {"values": [0.1, 0.5]}, "dpo.learning_rate": {"values": [1.0e-4, 1.0e-3]}},
    "command": ["${env}", "prefopt", "run", "tiny.yaml", "${args}"],
}


def as_overrides(cfg: dict) -> list[str]:
    """The sections of a config dict as `--section.key=value` arguments (what the quickstart is shrunk with)."""
    out = []
    for key, value in cfg.items():
        if isinstance(value, dict):
            out += [f"--{key}.{k}={yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                    for k, v in value.items()]
        elif key != "name":
            out.append(f"--{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return out


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A tiny experiment and a 2x2 sweep file over it, in a fresh working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump(GRID))
    return tmp_path


# ------------------------------------------------------------------------------------------ the sweep files


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_files_parse_and_name_real_keys(path, monkeypatch):
    """Each file runs `prefopt run` on an existing YAML, and every trial's values are valid overrides of it."""
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    assert sweep.name == path.stem and Path(sweep.config).exists()
    assert sweep.metric["name"].startswith("policies/") and sweep.metric["goal"] == "maximize"
    raw = yaml.safe_load(path.read_text())
    assert raw["command"][0] == "${env}" and raw["command"][-1] == "${args}"  # what `wandb agent` expands
    for values in expand(sweep, max_trials=3):
        cfg = load_config(sweep.config, [*sweep.fixed_args, *(f"--{k}={v}" for k, v in values.items())])
        for key, v in values.items():
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == pytest.approx(v)
        method = sweep.metric["name"].split("/")[1]
        assert method in cfg.stages and "evaluate" in cfg.stages  # the metric's policy is trained and evaluated


def test_grid_expands_to_the_cartesian_product_in_file_order():
    sweep = load_sweep(REPO / "experiments" / "sweeps" / "simpo_grid.yaml")
    trials = expand(sweep)
    lrs, betas, ratios = (sweep.parameters[k]["values"] for k in sweep.parameters)
    assert len(trials) == len(lrs) * len(betas) * len(ratios) == 12
    assert trials[0] == {"simpo.learning_rate": lrs[0], "simpo.beta": betas[0], "simpo.gamma_beta_ratio": ratios[0]}
    assert trials[1]["simpo.gamma_beta_ratio"] == ratios[1] and trials[1]["simpo.learning_rate"] == lrs[0]
    assert len({tuple(t.values()) for t in trials}) == 12
    assert expand(sweep, max_trials=5) == trials[:5]


def test_random_is_seeded_and_respects_ranges():
    sweep = Sweep(name="r", method="random", config="x.yaml", run_cap=7, parameters={
        "ppo.kl_coef": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0},
        "dpo.beta": {"values": [0.1, 0.2]},
        "ppo.ppo_epochs": {"distribution": "int_uniform", "min": 1, "max": 4},
        "seed": {"value": 3},
    })
    a, b, c = expand(sweep, seed=0), expand(sweep, seed=0), expand(sweep, seed=1)
    assert len(a) == 7 and a == b and a != c
    assert len(expand(sweep, max_trials=2)) == 2
    for t in a + c:
        assert 0.01 <= t["ppo.kl_coef"] <= 1.0 and t["dpo.beta"] in (0.1, 0.2) and t["seed"] == 3
        assert isinstance(t["ppo.ppo_epochs"], int) and 1 <= t["ppo.ppo_epochs"] <= 4
    # log-uniform: about half the draws below the geometric midpoint 0.1
    many = expand(Sweep(name="r", method="random", config="x", parameters={
        "k": {"distribution": "log_uniform_values", "min": 0.01, "max": 1.0}}), max_trials=400)
    below = sum(t["k"] < 0.1 for t in many) / 400
    assert 0.4 < below < 0.6
    logs = [math.log(t["k"]) for t in many]
    assert min(logs) >= math.log(0.01) and max(logs) <= 0.0


def test_grid_rejects_a_distribution_and_nested_parameters_flatten(tmp_path):
    bad = Sweep(name="g", method="grid", config="x", parameters={"dpo.beta": {"min": 0.1, "max": 1.0}})
    with pytest.raises(ConfigError, match="needs `values`"):
        expand(bad)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "method": "grid", "command": ["${env}", "${program}", "${args}"], "program": "prefopt run exp.yaml --seed=1",
        "parameters": {"dpo": {"parameters": {"beta": {"values": [1, 2]}}}, "seed": {"values": [3]}}}))
    s = load_sweep(tmp_path / "s.yaml")
    assert s.name == "s" and s.config == "exp.yaml" and s.fixed_args == ["--seed=1"]
    assert list(s.parameters) == ["dpo.beta", "seed"] and len(expand(s)) == 2


def test_a_sweep_on_the_test_split_is_refused(tmp_path):
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "evaluate": {**TINY["evaluate"], "split": "test"}}))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**GRID, "command": ["prefopt", "run",
                                                                          str(tmp_path / "tiny.yaml"), "${args}"]}))
    with pytest.raises(ConfigError, match="evaluated on the test split; add --evaluate.split=validation"):
        run_sweep(tmp_path / "grid.yaml", dry_run=True)


def test_a_problem_every_trial_has_stops_the_sweep_before_any_stage(tmp_path):
    """A problem in the sweep's fixed command (here a data path that is a folder) is found in every trial's config
    as `prefopt check` finds it, before the shared stages run, naming the trial and the key."""
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "r")}))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({**GRID, "command": [
        "prefopt", "run", str(tmp_path / "tiny.yaml"), f"--sft.dataset.path={tmp_path}", "${args}"]}))
    with pytest.raises(ConfigError) as e:
        run_sweep(tmp_path / "grid.yaml")
    assert str(e.value) == f"sweep grid, trial tiny-grid-t1: sft.dataset.path: '{tmp_path}' is a directory, not a data file"
    assert not (tmp_path / "r").exists()  # nothing ran


def test_parse_command():
    assert parse_command(["${env}", "prefopt", "run", "e.yaml", "--stages=[a,b]", "${args}"], None) == (
        "e.yaml", ["--stages=[a,b]"])
    with pytest.raises(ConfigError, match="prefopt run"):
        parse_command(["${env}", "python", "train.py", "${args}"], None)
    with pytest.raises(ConfigError, match="--key=value"):
        parse_command(["prefopt", "run", "e.yaml", "oops"], None)


def test_dry_run_prints_one_command_per_trial(tiny, capsys):
    assert cli_main(["sweep", "grid.yaml", "--dry-run", "--seed=5"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("prefopt run")]
    assert len(lines) == 4
    assert lines[0] == ("prefopt run tiny.yaml --seed=5 --dpo.beta=0.1 --dpo.learning_rate=0.0001 "
                        "--name=tiny-grid-t1 --wandb.group=grid '--wandb.tags=[sweep-grid]'")
    assert "--dpo.beta=0.5 --dpo.learning_rate=0.001 --name=tiny-grid-t4" in lines[3]
    assert not (tiny / "runs").exists()  # nothing ran


def test_reuse_upstream_links_only_unchanged_finished_stages(tiny):
    parent = load_config("tiny.yaml")
    for s in ["task", "base", "sft", "reward", "generate", "score", "pairs", "dpo"]:  # pretend they finished
        d = stage_dir(parent, s)
        d.mkdir(parents=True)
        (d / "_DONE.json").write_text(json.dumps({"fingerprint": fingerprint(parent, s)}))
    (stage_dir(parent, "reward") / "_DONE.json").unlink()  # an unfinished stage is not linked
    trial = load_config("tiny.yaml", ["--name=tiny-t1", "--dpo.beta=0.3"])
    linked = reuse_upstream(parent, trial)
    assert linked == ["task", "base", "sft", "generate", "score", "pairs"]  # reward unfinished, dpo changed
    assert stage_dir(trial, "sft").is_symlink()
    assert stage_dir(trial, "sft").resolve() == stage_dir(parent, "sft").resolve()
    assert not stage_dir(trial, "dpo").exists() and not stage_dir(trial, "reward").exists()
    # the parent config changes under the links (another sft): the stale sft link and those downstream go
    changed = load_config("tiny.yaml", ["--sft.learning_rate=0.5"])
    trial2 = load_config("tiny.yaml", ["--name=tiny-t1", "--dpo.beta=0.3", "--sft.learning_rate=0.5"])
    assert reuse_upstream(changed, trial2) == []
    assert not stage_dir(trial2, "sft").exists() and stage_dir(trial2, "task").is_symlink()


def test_table_is_sorted_by_the_metric(tmp_path):
    sweep = Sweep(name="s", method="grid", config="x", parameters={}, metric={"name": "m", "goal": "minimize"})
    rows = [{"trial": 1, "b": 0.1, "m": 3.0}, {"trial": 2, "b": 0.2, "m": 1.0}, {"trial": 3, "b": 0.3}]
    csv_path, md_path = write_table(rows, tmp_path, sweep)
    with open(csv_path) as f:
        assert [r["trial"] for r in csv.DictReader(f)] == ["1", "2", "3"]
    body = [ln for ln in md_path.read_text().splitlines() if ln.startswith("| ") and ln[2].isdigit()]
    assert [ln.split("|")[1].strip() for ln in body] == ["2", "1", "3"]  # best first, unfinished last


# --------------------------------------------------------------------------------------------- a real sweep


@pytest.mark.slow
def test_local_2x2_sweep_over_the_quickstart_trains_only_the_swept_stage(tiny, monkeypatch):
    """experiments/quickstart.yaml shrunk to toy size by overrides given to `prefopt sweep`, a 2x2 grid over DPO's
    beta and learning rate: the unswept stages run once, each trial trains dpo and evaluates."""
    import wandb

    inits, real_init = [], wandb.init

    def spy(**kw):  # the trials run in this process (launcher inline): see every stage's W&B run
        inits.append(kw)
        return real_init(**kw)

    monkeypatch.setattr(wandb, "init", spy)
    sweep = {**GRID, "command": ["${env}", "prefopt", "run", str(REPO / "experiments" / "quickstart.yaml"),
                                 "${args}"]}
    (tiny / "grid.yaml").write_text(yaml.safe_dump(sweep))
    extra = as_overrides(TINY)
    rows = run_sweep("grid.yaml", extra=extra)
    assert [r["status"] for r in rows] == ["ok"] * 4
    assert {(r["dpo.beta"], r["dpo.learning_rate"]) for r in rows} == {(0.1, 1e-4), (0.1, 1e-3), (0.5, 1e-4),
                                                                         (0.5, 1e-3)}
    parent = load_config(REPO / "experiments" / "quickstart.yaml", extra)
    assert parent.name == "quickstart" and parent.root == Path("runs/quickstart")
    shared = ["task", "base", "sft", "reward", "generate", "score", "pairs"]
    for k in range(1, 5):
        root = tiny / "runs" / f"quickstart-grid-t{k}"
        for s in shared:  # linked to the parent's folder, not retrained
            assert (root / s).is_symlink() and (root / s).resolve() == stage_dir(parent, s).resolve()
        for s in ["dpo", "evaluate"]:
            assert not (root / s).is_symlink() and (root / s / "_DONE.json").exists()
        cfg = json.loads((root / "dpo" / "summary.json").read_text())
        assert cfg["steps"] == 2
    # the parent trained sft once: one run's worth of metric rows (a retrain would append more)
    sft_rows = (stage_dir(parent, "sft") / "metrics.jsonl").read_text().splitlines()
    assert len([r for r in sft_rows if '"loss"' in r]) == 2
    # the table: 4 rows with the values and each trial's evaluate figures
    with open(tiny / "runs" / "sweeps" / "grid" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and {r["name"] for r in table} == {f"quickstart-grid-t{k}" for k in range(1, 5)}
    for r in table:
        # KL is a Monte-Carlo mean of log pi - log pi_sft over 8 samples: two small steps from SFT can dip just below 0
        assert float(r["policies/dpo/kl_to_sft"]) > -0.05 and float(r["policies/sft/kl_to_sft"]) == 0
        assert r["run_dir"].endswith(r["name"])
    # the larger step moves the policy further from SFT (in weights: the 8-sample KL estimate is too noisy here)
    from safetensors.torch import load_file

    sft = load_file(stage_dir(parent, "sft") / "model" / "model.safetensors")

    def moved(row) -> float:
        dpo = load_file(Path(row["run_dir"]) / "dpo" / "model" / "model.safetensors")
        return sum(float((dpo[k].float() - sft[k].float()).norm() ** 2) for k in sft) ** 0.5

    by = {(r["dpo.beta"], r["dpo.learning_rate"]): moved(r) for r in table}
    assert by[("0.1", "0.001")] > 3 * by[("0.1", "0.0001")] > 0
    assert "quickstart-grid-t4" in (tiny / "runs" / "sweeps" / "grid" / "trials.md").read_text()
    # the shared stages ran once (group: the parent experiment); each trial's dpo and evaluate: group = the sweep
    assert [(i["group"], i["job_type"]) for i in inits[:7]] == [("quickstart", s) for s in shared[:3] + ["reward"]
                                                                 + ["generate", "score", "pairs"]]
    trial_runs = inits[7:]
    assert len(trial_runs) == 8 and all(i["group"] == "grid" and i["mode"] == "offline" for i in trial_runs)
    assert sorted(i["name"] for i in trial_runs) == sorted(f"quickstart-grid-t{k}/{s}" for k in range(1, 5)
                                                           for s in ("dpo", "evaluate"))
    assert all("sweep-grid" in i["tags"] for i in trial_runs)

    # run again: every trial is finished, nothing trains, the markers stay as they were
    before = {p: p.read_text() for p in (tiny / "runs").glob("quickstart-grid-t*/dpo/_DONE.json")}
    again = run_sweep("grid.yaml", extra=extra)
    assert [r["policies/dpo/kl_to_sft"] for r in again] == [r["policies/dpo/kl_to_sft"] for r in rows]
    assert {p: p.read_text() for p in before} == before


# ------------------------------------------------------------------------------------------- concurrent agents


@pytest.mark.slow
def test_two_concurrent_agents_show_every_finished_trial_as_finished(tmp_path, monkeypatch):
    """Two `prefopt sweep` processes of one file at once (3 trials over sft.max_steps: 120, 2, 120; task and base
    shared). One runs the shared stages while the other waits for their lock; a trial one agent is running is left
    to it by the other. The table, rebuilt from the trials' own records and written last by whichever agent ends
    last, shows all three finished ("ok", never "exit 4"); each trial trained once; a rerun agrees and trains
    nothing."""
    import os
    import subprocess
    import sys

    cfg = {"name": "tiny", "seed": 0, "output_dir": "runs", "stages": ["task", "base", "sft"],
           "wandb": {"mode": "disabled"}, "launch": {"launcher": "inline"}, "task": TINY["task"],
           "base": TINY["base"], "sft": {**TINY["sft"], "save_steps": 1000}}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "grid.yaml").write_text(yaml.safe_dump({
        # t1 and t3 long enough (~3 s at 1 thread) that the second agent reaches t1 while the first still trains it
        "name": "grid", "method": "grid", "parameters": {"sft.max_steps": {"values": [120, 2, 120]}},
        "command": ["${env}", "prefopt", "run", "tiny.yaml", "${args}"]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    agents = []
    for i in range(2):
        with open(tmp_path / f"agent{i}.log", "w") as log:
            agents.append(subprocess.Popen([sys.executable, "-m", "prefopt", "sweep", "grid.yaml"], cwd=tmp_path,
                                           env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [a.wait(timeout=300) for a in agents]
    logs = [(tmp_path / f"agent{i}.log").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    both = "\n".join(logs)
    assert "tiny-grid-t1: another process runs it" in both  # the agents did overlap on a trial
    with open(tmp_path / "runs" / "sweeps" / "grid" / "trials.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["trial"], r["status"], r["sft.max_steps"]) for r in table] == [
        ("1", "ok", "120"), ("2", "ok", "2"), ("3", "ok", "120")]
    for k, steps in [(1, 120), (2, 2), (3, 120)]:  # trained once: a second training would append its rows
        rows = (tmp_path / "runs" / f"tiny-grid-t{k}" / "sft" / "metrics.jsonl").read_text().splitlines()
        assert len([r for r in rows if '"loss"' in r]) == steps
        assert json.loads((tmp_path / "runs" / f"tiny-grid-t{k}" / "sweep_trial.json").read_text())["status"] == "ok"
    assert not list((tmp_path / "runs" / "sweeps" / "grid").glob(".trials.*.tmp*"))

    monkeypatch.chdir(tmp_path)  # a rerun: every trial finished, nothing trains
    markers = {p: p.read_text() for p in (tmp_path / "runs").glob("tiny-grid-t*/sft/_DONE.json")}
    rows = run_sweep("grid.yaml")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert {p: p.read_text() for p in markers} == markers and len(markers) == 3
