"""Datasets named as the ecosystem names them: parquet, Arrow, CSV, save_to_disk folders, a folder laid out as a Hub
dataset repo, a Hub id read from the HF cache with the network off, column mapping and mixtures; the bad inputs
(an id neither cached nor reachable, a split or column that does not exist, mixture weights); and the memory a
60K-row parquet preference set costs the dpo stage's pair loading against the same rows as JSONL."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TEST_DATA, tiny_experiment, write_yaml

from prefopt.config import ConfigError, from_dict

from prefopt.experiment import load_config
from prefopt.data import counts
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_preferences, load_prompts
from prefopt.data.spec import DatasetSpec

datasets = pytest.importorskip("datasets")
pd = pytest.importorskip("pandas")

# The three single-turn pairs of LLaMA-Factory's dpo_en_demo (tests/data/README.md), as prompt/chosen/rejected.
PAIRS = [json.loads(line) for line in (TEST_DATA / "preference_strings.jsonl").read_text().splitlines()]
JSONL = TEST_DATA / "preference_strings.jsonl"


@pytest.fixture(autouse=True)
def hf_cache(tmp_path, monkeypatch) -> Path:
    """`datasets`' cache in tmp (prepared parquet/CSV files land there), with the Hub off as in every test."""
    cache = tmp_path / "hf" / "datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    assert datasets.config.HF_HUB_OFFLINE  # conftest sets HF_HUB_OFFLINE=1 before datasets is imported
    return cache


def jsonl_rows(template="alpaca"):
    return load_preferences(DatasetSpec(path=str(JSONL)), template).rows


def hub_repo(root: Path, pairs=PAIRS) -> Path:
    """A folder laid out as a Hub dataset repo: parquet shards under data/, a README.md card whose YAML names two
    configs (default: train/test; `short`: its own file)."""
    (root / "data").mkdir(parents=True)
    pd.DataFrame(pairs[:2]).to_parquet(root / "data" / "train-00000-of-00001.parquet")
    pd.DataFrame(pairs[2:]).to_parquet(root / "data" / "test-00000-of-00001.parquet")
    (root / "short").mkdir()
    pd.DataFrame(pairs[1:2]).to_parquet(root / "short" / "train-00000-of-00001.parquet")
    (root / "README.md").write_text(
        "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/train-*.parquet\n"
        "  - split: test\n    path: data/test-*.parquet\n- config_name: short\n  data_files:\n  - split: train\n"
        "    path: short/train-*.parquet\n---\n# Three pairs from dpo_en_demo\n")
    return root


def cache_as_hub(folder: Path, repo_id: str, cache: Path) -> None:
    """Leave in `cache` what `load_dataset(repo_id)` leaves after a download: the prepared Arrow files under
    `<owner>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow`, which `datasets` reads when the Hub cannot
    be reached. Prepared here from a local copy of the repo, renamed as the Hub download names them."""
    builder = datasets.load_dataset_builder(str(folder), cache_dir=str(cache))
    builder.download_and_prepare()
    owner, name = repo_id.split("/")
    dst = cache / f"{owner}___{name}" / Path(builder.cache_dir).relative_to(cache / folder.name)
    dst.mkdir(parents=True)
    for f in Path(builder.cache_dir).iterdir():
        if not f.name.endswith(".lock"):
            shutil.copy(f, dst / f.name.replace(f"{folder.name}-", f"{name}-"))


# ------------------------------------------------------------------------------------------------ local datasets


def test_parquet_arrow_csv_and_save_to_disk_give_the_jsonl_rows(tmp_path):
    ref = jsonl_rows()
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "p.parquet")
    pd.DataFrame(PAIRS).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame(PAIRS).to_csv(tmp_path / "p.tsv", index=False, sep="\t")
    ds = datasets.Dataset.from_list(PAIRS)
    ds.save_to_disk(str(tmp_path / "disk"))
    datasets.DatasetDict({"train": ds.select([0, 1]), "test": ds.select([2])}).save_to_disk(str(tmp_path / "dict"))
    arrow = tmp_path / "disk" / "data-00000-of-00001.arrow"  # an Arrow file as datasets writes them
    for path in ["p.parquet", "p.csv", "p.tsv", "disk", str(arrow)]:
        res = load_preferences(DatasetSpec(path=str(tmp_path / path)), "alpaca")
        assert res.rows == ref, path
    assert load_preferences(DatasetSpec(path=str(tmp_path / "dict"), split="test"), "alpaca").rows == ref[2:]
    assert load_preferences(DatasetSpec(path=str(tmp_path / "dict")), "alpaca").rows == ref[:2]  # default: train
    # memory-mapped where datasets put it, not read into RAM
    assert load_preferences(DatasetSpec(path=str(arrow), limit=1), "alpaca").path == str(arrow)


def test_a_folder_laid_out_as_a_hub_repo_loads_by_path_with_split_and_config(tmp_path):
    repo = hub_repo(tmp_path / "uf_mini")
    ref = jsonl_rows()
    assert load_preferences(DatasetSpec(path=str(repo)), "alpaca").rows == ref[:2]
    res = load_preferences(DatasetSpec(path=str(repo), split="test"), "alpaca")
    assert res.rows == ref[2:] and res.path == f"{repo}, split test"
    assert load_preferences(DatasetSpec(path=str(repo), name="short"), "alpaca").rows == ref[1:2]


def test_a_hub_id_loads_from_the_hf_cache_with_the_network_off(tmp_path, hf_cache):
    cache_as_hub(hub_repo(tmp_path / "src"), "prefopt-test/dpo_mini", hf_cache)
    ref = jsonl_rows()
    res = load_preferences(DatasetSpec(path="prefopt-test/dpo_mini", split="test"), "alpaca")
    assert res.rows == ref[2:] and res.path == "prefopt-test/dpo_mini, split test"
    assert load_preferences(DatasetSpec(path="prefopt-test/dpo_mini"), "alpaca").rows == ref[:2]


def test_a_bad_row_in_a_dataset_names_the_dataset_row_and_its_own_column(tmp_path):
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in PAIRS]
    rows[1]["good"] = "  "
    pd.DataFrame(rows).to_parquet(tmp_path / "q.parquet")
    spec = dict(path=str(tmp_path / "q.parquet"), columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    with pytest.raises(DataError) as e:
        load_preferences(DatasetSpec(**spec), "alpaca")
    assert str(e.value) == (f"{tmp_path / 'q.parquet'}, row 2, field 'good': empty; `skip_bad_rows: true` on this "
                            "dataset skips such rows")
    res = load_preferences(DatasetSpec(**spec, skip_bad_rows=True), "alpaca")
    assert res.skipped == 1 and [r["chosen"] for r in res.rows] == [PAIRS[0]["chosen"], PAIRS[2]["chosen"]]


def test_column_mapping_renames_and_selects(tmp_path):
    """{field: column} renames a set's own columns (a dataset and a JSONL file alike) and leaves the others out:
    the `messages` column would otherwise make the rows read as a conversation."""
    ref = jsonl_rows()
    rows = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"], "score": i,
             "messages": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "x"}]}
            for i, r in enumerate(PAIRS)]
    pd.DataFrame(rows).to_parquet(tmp_path / "q.parquet")
    (tmp_path / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    mapping = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    for name in ("q.parquet", "q.jsonl"):
        assert load_preferences(DatasetSpec(path=str(tmp_path / name), columns=mapping), "alpaca").rows == ref
    # a list keeps columns as they are named: prompts of a preference set, the rest left out
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "p.parquet")
    got = load_prompts(DatasetSpec(path=str(tmp_path / "p.parquet"), columns=["prompt"]), "alpaca").rows
    assert [r["prompt"] for r in got] == [r["prompt"] for r in PAIRS]


# ------------------------------------------------------------------------------------------------ mixtures


def test_mixture_takes_each_parts_fraction_and_reports_its_count(tmp_path, capsys):
    """Part 1: 3 pairs (parquet, weight 1), part 2: 10 Alpaca pairs (JSONL, weight 0.5 -> int(10 x 0.5) = 5
    drawn). 8 rows, each part's count printed, in LoadResult.stats() and in the stage counts; the same seed
    gives the same rows in the same order, another seed another draw."""
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "a.parquet")
    sort = [{"instruction": f"Sort {i} {i + 1} 0", "chosen": f"0 {i} {i + 1}", "rejected": f"{i + 1} {i} 0"}
            for i in range(1, 11)]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sort))
    parts = [{"path": str(tmp_path / "a.parquet")}, {"path": str(tmp_path / "b.jsonl"), "weight": 0.5}]
    counts.take()
    res = load_preferences(from_dict(DatasetSpec, {"mixture": parts, "seed": 3}, "dpo.pairs"), "alpaca")
    assert len(res) == 8 and sum(r["chosen"] in [p["chosen"] for p in PAIRS] for r in res.rows) == 3
    assert [(p["available"], p["drawn"], p["kept"]) for p in res.stats()["parts"]] == [(3, 3, 3), (10, 5, 5)]
    noted = counts.take()
    assert noted == {f"rows from mixture part 1, {tmp_path / 'a.parquet'} (weight 1: 3 of 3 drawn)": 3,
                     f"rows from mixture part 2, {tmp_path / 'b.jsonl'} (weight 0.5: 5 of 10 drawn)": 5}
    out = capsys.readouterr().out
    assert "[data] mixture of 2 parts, 8 rows:" in out and f"5 from {tmp_path / 'b.jsonl'} (weight 0.5" in out
    again = load_preferences(DatasetSpec(mixture=parts, seed=3), "alpaca").rows
    other = load_preferences(DatasetSpec(mixture=parts, seed=4), "alpaca").rows
    assert again == res.rows and other != res.rows and len(other) == 8
    drawn = [r["chosen"] for r in res.rows if r["chosen"] not in [p["chosen"] for p in PAIRS]]
    assert len(set(drawn)) == 5 and set(drawn) <= {r["chosen"] for r in sort}


def test_mixture_checks_apply_to_the_whole(tmp_path):
    """dedup over parts: the same pairs as parquet and as JSONL are one set of rows."""
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "a.parquet")
    spec = DatasetSpec(mixture=[{"path": str(tmp_path / "a.parquet")}, {"path": str(JSONL)}], dedup=True)
    res = load_preferences(spec, "alpaca")
    assert len(res) == 3 and res.deduplicated == 3 and sum(p["kept"] for p in res.parts) == 3


def test_dpo_runs_on_a_local_mixture_and_its_summary_counts_each_part(tmp_path, tiny_model_dir):
    """`prefopt dpo` as a user runs it, `dpo.pairs` a mixture of a parquet set and a Hub-laid-out folder."""
    from prefopt.cli import main

    sort = [{"prompt": f"Sort {i} 1", "chosen": f"1 {i}", "rejected": f"{i} 1"} for i in range(2, 10)]
    pd.DataFrame(sort).to_parquet(tmp_path / "sort.parquet")
    repo = hub_repo(tmp_path / "uf_mini")
    pairs = {"mixture": [{"path": str(tmp_path / "sort.parquet"), "weight": 0.5},
                         {"path": str(repo), "split": "train"}], "seed": 1}
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["dpo"], wandb={"mode": "disabled"},
                                                          dpo={"model": str(tiny_model_dir), "pairs": pairs,
                                                               "max_length": 64}))
    assert main(["dpo", str(exp)]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "dpo" / "summary.json").read_text())
    parts = {k: v for k, v in summary["counts"].items() if k.startswith("rows from mixture")}
    assert parts == {f"rows from mixture part 1, {tmp_path / 'sort.parquet'} (weight 0.5: 4 of 8 drawn)": 4,
                     f"rows from mixture part 2, {repo}, split train (weight 1: 2 of 2 drawn)": 2}
    assert summary["pairs"] == 6


def test_dpo_pairs_accept_a_dataset_spec_and_a_hub_id(tmp_path, hf_cache):
    from prefopt.preference.data import load_pairs, pairs_path

    cache_as_hub(hub_repo(tmp_path / "src"), "prefopt-test/dpo_mini", hf_cache)
    want = [(r["chosen"], r["rejected"]) for r in PAIRS]
    spec = DatasetSpec(path="prefopt-test/dpo_mini", split="test")
    assert [(r["chosen"], r["rejected"]) for r in load_pairs(spec, "alpaca", None)] == want[2:]
    assert [(r["chosen"], r["rejected"]) for r in load_pairs("prefopt-test/dpo_mini", "alpaca", None)] == want[:2]
    # a stage folder still means its pairs.jsonl; a dataset folder is read as a dataset
    (tmp_path / "pairs").mkdir()
    assert pairs_path(str(tmp_path / "pairs")) == str(tmp_path / "pairs" / "pairs.jsonl")
    assert pairs_path(str(tmp_path / "src")) == str(tmp_path / "src")
    resolved = pairs_path(DatasetSpec(mixture=[{"path": "stage:pairs"}]), lambda p: str(tmp_path / "pairs"))
    assert resolved.mixture[0].path == str(tmp_path / "pairs" / "pairs.jsonl")


# ------------------------------------------------------------------------------------------------ bad input


def test_an_unknown_hub_id_offline_is_one_line_naming_it(hf_cache):
    with pytest.raises(DataError) as e:
        load_preferences(DatasetSpec(path="prefopt-test/no_such_set", split="train"), "alpaca")
    msg = str(e.value)
    assert msg.startswith("prefopt-test/no_such_set: ") and "\n" not in msg
    assert "neither in the local cache" in msg and "nor reachable" in msg and str(hf_cache) in msg


def test_a_split_that_does_not_exist_lists_the_ones_that_do(tmp_path, hf_cache):
    repo = hub_repo(tmp_path / "src")
    cache_as_hub(repo, "prefopt-test/dpo_mini", hf_cache)
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "p.parquet")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS)}).save_to_disk(str(tmp_path / "dict"))
    cases = {"prefopt-test/dpo_mini": "train, test", str(repo): "train, test", str(tmp_path / "dict"): "train",
             str(tmp_path / "p.parquet"): "train"}
    for path, known in cases.items():
        with pytest.raises(ConfigError) as e:
            load_preferences(DatasetSpec(path=path, split="train_prefs"), "alpaca")
        assert str(e.value).endswith(f"no split 'train_prefs' (`split`); the splits it has: {known}"), path
    with pytest.raises(ConfigError) as e:
        load_preferences(DatasetSpec(path=str(repo), name="long"), "alpaca")
    assert "config 'long'" in str(e.value) and "short" in str(e.value) and "\n" not in str(e.value)


def test_a_column_that_does_not_exist_lists_the_ones_that_do(tmp_path):
    pd.DataFrame(PAIRS).to_parquet(tmp_path / "p.parquet")
    with pytest.raises(ConfigError) as e:
        load_preferences(DatasetSpec(path=str(tmp_path / "p.parquet"), columns={"prompt": "question"}), "alpaca")
    assert str(e.value) == (f"{tmp_path / 'p.parquet'}: no column 'question' (`columns.prompt`); the columns it has: "
                            "prompt, chosen, rejected")


@pytest.mark.parametrize("pairs, message", [
    ({"mixture": [{"path": "a.parquet", "weight": -0.5}, {"path": "b.parquet"}]},
     "dpo.pairs.mixture[0].weight: must be >= 0 and <= 1, got -0.5"),
    ({"mixture": [{"path": "a.parquet", "weight": 0}, {"path": "b.parquet", "weight": 0.0}]},
     "dpo.pairs.mixture: weights sum to 0: no part would give a row (weight is the fraction of a part's rows taken, "
     "0 to 1)"),
    ({"path": "a.parquet", "mixture": [{"path": "b.parquet"}]},
     "dpo.pairs.mixture: is set beside path 'a.parquet': name the rows by one of the two"),
    ({"path": "prefs.jsonl", "split": "train_prefs"},
     "dpo.pairs.split: 'prefs.jsonl' is a JSON file, which has no split; `split` is for Hub ids, dataset folders "
     "and parquet/Arrow/CSV files"),
    ({"path": "a.parquet", "columns": {"question": "q"}}, "dpo.pairs.columns: maps to ['question'], which no row "
     "format reads"),
])
def test_bad_dataset_keys_are_config_errors_naming_the_key(pairs, message):
    from prefopt.dpo.config import DPOStageConfig

    with pytest.raises(ConfigError) as e:
        from_dict(DPOStageConfig, {"pairs": pairs}, "dpo")
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ the SimPO recipe

GEMMA = REPO / "experiments/simpo/gemma2_9b_it.yaml"


def ultrafeedback_mini(root: Path) -> Path:
    """UltraFeedback-binarized's columns (prompt, prompt_id, chosen/rejected/messages as chat turns, scores) and
    splits (train_prefs, test_prefs), 4 rows of which 2 share a prompt."""
    (root / "data").mkdir(parents=True)

    def row(i, prompt):
        turn = [{"role": "user", "content": prompt}]
        return {"prompt": prompt, "prompt_id": f"id{i}", "chosen": turn + [{"role": "assistant", "content": "a"}],
                "rejected": turn + [{"role": "assistant", "content": "b"}],
                "messages": turn + [{"role": "assistant", "content": "a"}], "score_chosen": 8.0, "score_rejected": 3.0}

    train = [row(0, "Name a prime."), row(1, "Write a haiku."), row(2, "Name a prime."), row(3, "Sum 2 and 2.")]
    pd.DataFrame(train).to_parquet(root / "data" / "train_prefs-00000-of-00001.parquet")
    pd.DataFrame(train[:1]).to_parquet(root / "data" / "test_prefs-00000-of-00001.parquet")
    return root


def test_gemma_recipe_names_ultrafeedback_by_hub_id_and_check_downloads_nothing(tmp_path, hf_cache, capsys):
    from prefopt.cli import main

    cfg = load_config(GEMMA)
    spec = cfg.generate.prompts
    assert (spec.path, spec.split) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert main(["check", str(GEMMA)]) == 0
    out = capsys.readouterr().out
    assert "generate.prompts" not in out and out.rstrip().endswith("ok")
    assert not hf_cache.exists()  # nothing fetched, nothing prepared
    # at run time a failed load names the id
    with pytest.raises(DataError) as e:
        load_prompts(spec, cfg.generate.template)
    assert str(e.value).startswith("HuggingFaceH4/ultrafeedback_binarized: ") and "nor reachable" in str(e.value)
    # from the cache: the unique prompts, each the user's turn for the chat template, with UltraFeedback's ids
    cache_as_hub(ultrafeedback_mini(tmp_path / "uf"), "HuggingFaceH4/ultrafeedback_binarized", hf_cache)
    res = load_prompts(spec, cfg.generate.template)
    assert [r["prompt"] for r in res.rows] == [[{"role": "user", "content": p}]
                                               for p in ("Name a prime.", "Write a haiku.", "Sum 2 and 2.")]
    assert [r["prompt_id"] for r in res.rows] == ["id0", "id1", "id3"] and res.deduplicated == 1


def test_llama3_recipe_names_ultrafeedback_as_gemma_does():
    a, b = load_config(GEMMA).generate.prompts, load_config(REPO / "experiments/simpo/llama3_8b_instruct.yaml")
    assert b.generate.prompts == a


# ------------------------------------------------------------------------------------------------ memory

# VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec, so a child of a large pytest process would report the
# parent's size as its own peak.
MEASURE = r"""
import json, sys
import datasets, torch  # noqa: F401  (imported on both paths, before the baseline)
from prefopt.data.spec import DatasetSpec
from prefopt.preference.data import load_pairs

def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024

base = status("VmRSS")
source = sys.argv[1] if sys.argv[1].endswith(".jsonl") else DatasetSpec(path=sys.argv[1])
rows = load_pairs(source, "alpaca", None)
print(json.dumps({"rows": len(rows), "base": base, "peak": status("VmHWM"), "last": rows[-1]["chosen"]}))
"""


def test_a_60k_row_parquet_set_costs_dpo_pair_loading_no_more_than_its_jsonl(tmp_path):
    """60,000 preference rows (26 MB as JSONL, 11 MB parquet), each loaded by `load_pairs` in a fresh process.
    Measured here: peak RSS (VmHWM) over the RSS after imports, JSONL 133 MB, parquet 97 MB on the first load (which
    prepares datasets' Arrow cache), 79 MB from the cache."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    words = "the of and to in is that for it as was with be by on not he this are or his from at which".split()

    def text(n):
        return " ".join(rng.choice(words) for _ in range(n))

    rows = [{"prompt": f"Question {i}: {text(20)}", "chosen": text(40), "rejected": text(35)} for i in range(60_000)]
    with open(tmp_path / "prefs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "prefs.parquet")
    del rows
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}

    def measure(path):
        out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], env=env, capture_output=True, text=True,
                             check=True)
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["rows"] == 60_000
        return got

    jsonl, first, cached = (measure(tmp_path / name) for name in ("prefs.jsonl", "prefs.parquet", "prefs.parquet"))
    assert jsonl["last"] == first["last"] == cached["last"]
    mb = {k: (v["peak"] - v["base"]) / 2**20 for k, v in (("jsonl", jsonl), ("parquet", first), ("cached", cached))}
    print("peak over baseline, MB:", {k: round(v) for k, v in mb.items()})
    assert mb["parquet"] <= mb["jsonl"] and mb["cached"] <= mb["jsonl"]


def test_check_reads_dataset_paths_without_fetching(tmp_path, hf_cache):
    """`prefopt check` on dataset paths: a Hub id passes on its form, a dataset folder passes, a plain folder is a
    problem, a mixture part that is not here is a warning naming its key; nothing reaches the cache."""
    from prefopt.checks import problems_and_warnings

    repo = hub_repo(tmp_path / "uf_mini")
    (tmp_path / "plain").mkdir()
    mixture = {"mixture": [{"path": "HuggingFaceH4/ultrafeedback_binarized", "split": "train_prefs"},
                           {"path": str(tmp_path / "gone.parquet")}, {"path": str(repo)}]}
    exp = write_yaml(tmp_path / "e.yaml", tiny_experiment(tmp_path, stages=["dpo"], dpo={"pairs": mixture},
                                                          sft={"dataset": {"path": str(tmp_path / "plain")}}))
    cfg = load_config(exp)
    problems, warnings = problems_and_warnings(cfg)
    assert [w for w in warnings if "pairs" in w] == [
        f"dpo.pairs.mixture[1].path: file '{tmp_path / 'gone.parquet'}' does not exist here (fine if the GPU machine "
        "has it)"]
    cfg.stages = ["sft"]
    problems, _ = problems_and_warnings(cfg)
    assert f"sft.dataset.path: '{tmp_path / 'plain'}' is a directory, not a data file" in problems
    assert not hf_cache.exists()
