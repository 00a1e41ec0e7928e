"""Scale (issue 22, item 6): the recipe's global batch on any number of nodes, `prefopt run` checking before the
first stage, launch configs that work for every architecture and on several nodes, bounded extras."""

from __future__ import annotations

import configparser
import importlib.util
import re
import subprocess
import sys
from importlib.metadata import version

import pytest
import yaml

from conftest import REPO
from prefopt.config import ConfigError, from_dict
from prefopt.experiment import load_config
from prefopt.experiment import ExperimentConfig

GEMMA = REPO / "experiments/simpo/gemma2_9b_it.yaml"


def nodes(n: int) -> list[str]:
    """What experiments/slurm/prefopt_run.sbatch passes for `sbatch --nodes=n` (8 GPUs a node)."""
    return ["--launch.srun=true", f"--launch.num_machines={n}", f"--launch.num_processes={8 * n}",
            "--launch.main_process_ip=head"]


def test_four_nodes_keep_the_gemma_recipe_global_batch():
    """4 x 8 GPUs x per-device 2 x accumulation 8 (set for one node) would train with 512; the accumulation becomes
    128 / (32 x 2) = 2, and the stages `prefopt run` launches read the YAML again with that override, so their
    fingerprints are the ones the run computed."""
    from prefopt.pipeline import launch_command, preflight
    from prefopt.stage import fingerprint

    cfg = load_config(GEMMA, nodes(4))
    notes, problems, _, _, overrides = preflight(cfg)
    assert problems == []
    assert overrides == ["--dpo.gradient_accumulation_steps=2", "--simpo.gradient_accumulation_steps=2"]
    assert cfg.simpo.gradient_accumulation_steps == 2 and cfg.simpo.global_batch(32) == 128
    assert cfg.dpo.global_batch(32) == 128
    assert any("simpo: gradient_accumulation_steps 8 -> 2" in n for n in notes)
    child = load_config(GEMMA, nodes(4) + overrides)  # what a launched stage loads
    for stage in ("dpo", "simpo"):
        assert fingerprint(child, stage) == fingerprint(cfg, stage)
    assert "--simpo.gradient_accumulation_steps=2" in launch_command(cfg, "simpo", 1, overrides)[-1]
    one = load_config(GEMMA)  # one node: the recipe's own accumulation, nothing changed
    assert preflight(one)[4] == [] and one.simpo.gradient_accumulation_steps == 8


@pytest.mark.parametrize("n_nodes,per_step", [(6, 96), (16, 256)])
def test_a_global_batch_that_cannot_be_kept_is_refused(n_nodes, per_step, capsys):
    from prefopt.pipeline import check

    cfg = load_config(GEMMA, nodes(n_nodes))
    assert check(cfg) == 2
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("ERROR: simpo:"))
    assert f"recipe's global batch 128 (simpo.recipe_global_batch) is not a multiple of {8 * n_nodes} processes x " \
           f"per-device batch 2 = {per_step}" in line
    assert "simpo.per_device_train_batch_size" in line and "launch.num_processes" in line


def test_prefopt_run_refuses_before_any_stage(tmp_path):
    """`prefopt run` runs `prefopt check`'s checks first: one line, exit code 2, no folder made, no model loaded."""
    out = subprocess.run([sys.executable, "-m", "prefopt", "run", str(GEMMA), *nodes(6),
                          f"--output_dir={tmp_path / 'runs'}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    # every problem in the one line
    assert len(lines) == 1 and lines[0].startswith("prefopt: config error: dpo: the recipe's global batch 128")
    assert "; simpo: the recipe's global batch 128" in lines[0] and "(2 problems;" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_prefopt_run_prints_warnings_and_stops_on_a_problem(tmp_path, capsys):
    from prefopt.pipeline import run_experiment

    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n')
    cfg = from_dict(ExperimentConfig, {
        "name": "w", "output_dir": str(tmp_path / "runs"), "stages": ["sft", "evaluate"],
        "launch": {"launcher": "inline"},
        "sft": {"model": "nobody/model", "dataset": {"path": str(tmp_path / "absent.jsonl")},
                "per_device_train_batch_size": 2, "recipe_global_batch": 3},
        "evaluate": {"policies": {"sft": "stage:sft"}, "prompts": {"path": str(tmp_path / "p.jsonl")},
                     "suite": {"lm_eval_tasks": ["hellaswag"]}}})
    with pytest.raises(ConfigError) as e:
        run_experiment(cfg)
    # on the machine it runs on, a missing data file is a problem beside the others, all in one line
    assert str(e.value).startswith(f"sft.dataset.path: file '{tmp_path / 'absent.jsonl'}' does not exist; sft: the "
                                   "recipe's global batch 3 (sft.recipe_global_batch)")
    if importlib.util.find_spec("lm_eval") is None:  # a warning is printed, and does not stop the run
        assert "WARNING: evaluate.suite.lm_eval_tasks: lm-evaluation-harness is not installed here" \
            in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------- launch configs


def _accelerate_args(config_file: str, *extra: str):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args(["--config_file", config_file, *extra, "x.py"])
    _validate_launch_command(args)
    return args


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp2.yaml"])
def test_fsdp_configs_wrap_each_models_own_layers(name):
    """No layer class in the file: accelerate 1.15 wraps the model's `_no_split_modules`, so a Gemma-2 (which has
    no LlamaDecoderLayer, the class fsdp.yaml used to name) is wrapped by its own decoder layer."""
    import torch
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import Gemma2Config, Gemma2ForCausalLM

    args = _accelerate_args(f"experiments/accelerate/{name}")
    assert args.fsdp_auto_wrap_policy == "TRANSFORMER_BASED_WRAP" and args.fsdp_transformer_layer_cls_to_wrap is None
    with torch.device("meta"):
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                               intermediate_size=32))
    plugin = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    assert plugin.transformer_cls_names_to_wrap == ["Gemma2DecoderLayer"]
    named = FullyShardedDataParallelPlugin(fsdp_version=1, auto_wrap_policy="transformer_based_wrap",
                                           transformer_cls_names_to_wrap=["LlamaDecoderLayer"])
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):  # what the old fsdp.yaml gave a Gemma-2
        named.set_auto_wrap_policy(model)


@pytest.mark.parametrize("name", ["deepspeed_zero3.yaml", "deepspeed_zero3_offload.yaml", "deepspeed_zero2.yaml"])
def test_deepspeed_configs_launch_each_node_without_pdsh(name):
    args = _accelerate_args(f"experiments/accelerate/{name}", "--num_machines", "4", "--machine_rank", "1")
    assert args.deepspeed_multinode_launcher == "standard"


# ------------------------------------------------------------------------------------------------- extras


def _extras() -> dict[str, list[str]]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    return {k: [r for r in v.strip().splitlines() if r.strip()] for k, v in parser["options.extras_require"].items()}


def test_every_extra_is_bounded_to_the_tested_series():
    from packaging.requirements import Requirement

    extras = _extras()
    for name, reqs in extras.items():
        for r in reqs:
            assert any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(r).specifier), (name, r)
    vllm = Requirement(extras["vllm"][0]).specifier
    pinned = re.search(r"^vllm==(\S+)$", (REPO / "requirements/gpu-vllm.txt").read_text(), re.M).group(1)
    assert vllm.contains(pinned) and not vllm.contains("0.32.0") and not vllm.contains("0.33.0")
    for extra, dist in (("annotate", "gradio"), ("eval", "lm_eval")):  # the versions the tests here ran with
        assert Requirement(extras[extra][0]).specifier.contains(version(dist)), (extra, version(dist))


def test_fsdp2_cpu_config_still_matches():
    """tests/fsdp_on_cpu/fsdp2_cpu.yaml is experiments/accelerate/fsdp2.yaml's fsdp_config on CPU processes."""
    gpu = yaml.safe_load((REPO / "experiments/accelerate/fsdp2.yaml").read_text())
    cpu = yaml.safe_load((REPO / "tests/fsdp_on_cpu/fsdp2_cpu.yaml").read_text())
    assert gpu["fsdp_config"] == cpu["fsdp_config"]


# ------------------------------------------------------------------------------ generation over a node's GPUs


def _generate_experiment(tmp_path, model_dir, out: str, **generate):
    import json

    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps({"instruction": f"Sort {i} {i + 2} {i + 1}."}) + "\n" for i in range(7)))
    section = {"model": str(model_dir), "prompts": {"path": str(prompts)}, "backend": "transformers", "n": 2,
               "max_new_tokens": 4, "shard_size": 2, "batch_size": 2, **generate}
    return from_dict(ExperimentConfig, {"name": "g", "output_dir": str(tmp_path / out), "wandb": {"mode": "disabled"},
                                        "generate": section})


def _shards(root):
    from prefopt.io import read_jsonl

    return {p.name: read_jsonl(p) for p in sorted((root / "g" / "generate").glob("shard-*.jsonl"))}


def test_two_generation_processes_write_what_one_writes(tmp_path, tiny_model_dir):
    """generate.data_parallel 2: two worker processes, each its own model and every other shard; the 4 shards (7
    prompts in 2s) merged in order equal one process's, row for row (each shard is seeded by its index alone)."""
    from prefopt.stage import run_stage

    one = run_stage(_generate_experiment(tmp_path, tiny_model_dir, "one"), "generate")
    two = run_stage(_generate_experiment(tmp_path, tiny_model_dir, "two", data_parallel=2), "generate")
    assert one["data_parallel"] == 1 and two["data_parallel"] == 2
    a, b = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert list(a) == ["shard-00000.jsonl", "shard-00001.jsonl", "shard-00002.jsonl", "shard-00003.jsonl"]
    assert a == b
    assert (one["rows"], one["candidates"], one["tokens"]) == (two["rows"], two["candidates"], two["tokens"])
    assert not list((tmp_path / "two" / "g" / "generate").glob(".data_parallel*"))  # job and logs cleaned up


def test_generation_engine_is_released_before_the_next_stage(tmp_path, tiny_model_dir, monkeypatch):
    import prefopt.generate.recipe as recipe
    from prefopt.stage import run_stage

    closed = []
    real = recipe.build_generator

    def tracked(*args):
        gen = real(*args)
        gen.close = lambda: closed.append(gen.name)
        return gen

    monkeypatch.setattr(recipe, "build_generator", tracked)
    run_stage(_generate_experiment(tmp_path, tiny_model_dir, "rel"), "generate")
    assert closed == ["transformers"]


def test_a_failed_generation_worker_is_named(tmp_path, tiny_model_dir):
    from prefopt.stage import run_stage

    bad = tmp_path / "bad-model"
    bad.mkdir()  # a folder whose weights cannot load, in the workers: the parent reads only the tokenizer
    for f in tiny_model_dir.iterdir():
        if "token" in f.name or f.name in ("config.json", "special_tokens_map.json"):
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(RuntimeError, match=r"data-parallel generation failed .*worker 0 exited 1"):
        run_stage(_generate_experiment(tmp_path, bad, "bad", data_parallel=2), "generate")


# -------------------------------------------------------------------------------- scoring over a node's GPUs


@pytest.fixture(scope="module")
def score_rms(tiny_model_dir, tmp_path_factory):
    """Two tiny reward models (the tiny Llama with a one-label head): a working one, and one whose head is NaN."""
    import torch

    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    root = tmp_path_factory.mktemp("rms")
    model = load_reward_model(str(tiny_model_dir))
    save_model(model, load_tokenizer(str(tiny_model_dir)), root / "rm")
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    save_model(model, load_tokenizer(str(tiny_model_dir)), root / "nan-rm")
    return root / "rm", root / "nan-rm"


def _score_experiment(tmp_path, rm_dir, out: str, **score):
    """4 candidate shards of 2 prompts x 3 candidates. Prompt "P1" is in shards 0 and 1 (two workers' shares) with
    the candidate "1 2 3" both times, and "1 2 3" repeats within each row: one process scores that text once."""
    from prefopt.io import write_jsonl

    gen = tmp_path / "candidates"
    if not gen.exists():
        prompts = ["P0", "P1", "P1", "P2", "P3", "P4", "P5", "P6"]
        rows = [{"prompt_id": f"r{i}", "prompt": f"### Input:\n{p} 3 1 2\n\n### Response:\n",
                 "candidates": ["1 2 3", f"{i} {i} 1", "1 2 3"], "generator": {"sha256": "g"}}
                for i, p in enumerate(prompts)]
        for k in range(4):
            write_jsonl(gen / f"shard-{k:05d}.jsonl", rows[2 * k:2 * k + 2])
    section = {"reward_model": str(rm_dir), "candidates": str(gen), "rm_format": "policy", "batch_size": 2, **score}
    return {"name": "s", "output_dir": str(tmp_path / out), "wandb": {"mode": "disabled"}, "score": section}


def _scored(root):
    from prefopt.io import read_jsonl

    return {p.name: read_jsonl(p) for p in sorted((root / "s" / "score").glob("shard-*.jsonl"))}


def test_two_scoring_processes_write_what_one_writes(tmp_path, score_rms):
    """score.data_parallel 2: two worker processes, each its own reward model and every other shard; the 4 output
    shards and the score cache equal one process's, value for value, and each (prompt, response) is scored and
    cached once: of 24 candidates 15 distinct texts (8 rows x 2, less P1's second "1 2 3")."""
    from prefopt.score.recipe import read_scores
    from prefopt.stage import run_stage

    one = run_stage(from_dict(ExperimentConfig, _score_experiment(tmp_path, score_rms[0], "one")), "score")
    two = run_stage(from_dict(ExperimentConfig, _score_experiment(tmp_path, score_rms[0], "two", data_parallel=2)),
                    "score")
    assert one["data_parallel"] == 1 and two["data_parallel"] == 2
    assert (one["candidates"], one["scored"], one["cached"]) == (24, 15, 9)
    assert {k: two[k] for k in ("candidates", "scored", "cached", "score/mean", "score/std")} == \
        {k: one[k] for k in ("candidates", "scored", "cached", "score/mean", "score/std")}
    a, b = _scored(tmp_path / "one"), _scored(tmp_path / "two")
    assert list(a) == [f"shard-{k:05d}.jsonl" for k in range(4)] and a == b
    assert a["shard-00000.jsonl"][1]["scores"][0] == a["shard-00001.jsonl"][0]["scores"][0]  # P1's "1 2 3"
    cache_one, cache_two = (tmp_path / d / "s" / "cache" / "scores.jsonl" for d in ("one", "two"))
    assert read_scores(cache_one) == read_scores(cache_two) and len(read_scores(cache_one)) == 15
    assert len(cache_two.read_text().splitlines()) == 15  # no text scored by both workers
    assert [p.name for p in cache_two.parent.iterdir()] == ["scores.jsonl"]  # the workers' parts merged
    assert not list((tmp_path / "two" / "s" / "score").glob(".data_parallel*"))  # job and logs cleaned up


def test_a_failed_scoring_worker_is_one_line_naming_it(tmp_path, score_rms):
    """A reward model that scores NaN, two workers: each refuses it before its cache part (a data error, exit 3),
    and `prefopt score` prints one line naming both workers, their exits and errors, and exits 3."""
    import contextlib
    import io

    from conftest import write_yaml
    from prefopt.cli import main

    exp = write_yaml(tmp_path / "bad.yaml", _score_experiment(tmp_path, score_rms[1], "bad", data_parallel=2))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["score", str(exp)])
    lines = re.findall(r"prefopt: [^\r\n]*", err.getvalue())  # the progress bar shares stderr
    assert code == 3 and len(lines) == 1, err.getvalue()
    assert re.fullmatch(r"prefopt: data error: data-parallel scoring failed \(.*\): worker 0 exited 3: DataError: "
                        r".*shard-00000\.jsonl, row 1, field 'candidates\[0\]': the reward model .* gave a non-finite "
                        r"score \(nan\) .*; its output: .*\.data_parallel_0\.log \| worker 1 exited 3: DataError: "
                        r".*shard-00001\.jsonl, .*; its output: .*\.data_parallel_1\.log", lines[0])
    assert "Traceback" not in err.getvalue()
    cache = tmp_path / "bad" / "s" / "cache"
    assert not cache.exists() or all(p.read_text() == "" for p in cache.iterdir())


def test_score_cache_parts_and_cut_lines(tmp_path):
    """A killed run's worker part is merged when the cache opens, and an append after a line a kill cut short
    starts on a line of its own: no score is lost."""
    from prefopt.score.recipe import ScoreCache, read_scores

    path = tmp_path / "scores.jsonl"
    path.write_text('{"key": "a", "score": 1.5}\n{"key": "b", "sco')  # killed mid-line
    ScoreCache.part(path, 1).write_text('{"key": "c", "score": -2.0}\n')
    cache = ScoreCache(path)
    assert cache.scores == {"a": 1.5, "c": -2.0} and not ScoreCache.part(path, 1).exists()
    cache.add({"b": 0.25})
    assert read_scores(path) == {"a": 1.5, "b": 0.25, "c": -2.0}


def test_the_reward_model_is_released_before_the_next_stage(tmp_path, score_rms, monkeypatch):
    """One process: the stage drops its last reference to the reward model before it empties the CUDA cache."""
    import gc
    import weakref

    import prefopt.score.recipe as stage
    import prefopt.scoring.scorer as score
    from prefopt.stage import run_stage

    refs, alive_at_free = [], []
    real = score.load_scorer

    def tracked(*args, **kwargs):
        scorer = real(*args, **kwargs)
        refs.append(weakref.ref(scorer.model))
        return scorer

    def free():
        gc.collect()
        alive_at_free.append([r() is not None for r in refs])

    monkeypatch.setattr(score, "load_scorer", tracked)
    monkeypatch.setattr(stage, "free_gpu_memory", free)
    run_stage(from_dict(ExperimentConfig, _score_experiment(tmp_path, score_rms[0], "rel")), "score")
    assert alive_at_free == [[False]]
