"""`prefopt push STAGE_DIR OWNER/NAME`: publish what a stage made on the Hugging Face Hub, with a card.

    prefopt push runs/quickstart/pairs alice/quickstart-pairs --to-dir out/pairs    # the folder, no upload
    prefopt push runs/quickstart/dpo alice/quickstart-dpo --private --revision v1   # HF_TOKEN or `hf auth login`

A `pairs`, `score` or `generate` folder becomes a dataset repo: parquet files read by `datasets.load_dataset`
(config `pairs`, the default, and `candidates`: each prompt's sampled candidates with their reward-model scores),
split `train` as the run used them (the pairs and candidates come from the training prompts; the task's
validation and test prompts never had any). A training stage (`sft`, `reward`, `dpo`, `simpo`, `ppo`) becomes a
model repo: its `model/` folder as saved (transformers loads it). Either carries a README.md whose YAML front matter
follows the Hub's card schema (license, tags, base_model, datasets) plus a `prefopt:` block of the provenance the run
recorded: the generator and its sampling, the reward model and its weights hash, the seeds, the stage's summary
figures, package versions and the experiment config; the text repeats it with the method's paper and the final
evaluation table. The SimPO authors published their on-policy pairs the same way (princeton-nlp/
gemma2-ultrafeedback-armorm).

`--to-dir DIR` writes exactly the folder that would be uploaded, and uploads nothing; without it the folder is built
in a temporary directory and `hub_upload` sends it (HfApi: create_repo, create_branch for a revision,
upload_folder).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from prefopt.config import ConfigError
from prefopt.data.errors import DataError
from prefopt.experiment import REPO_ID, ROUND_STAGES
from prefopt.stage import MARKER, read_marker

DATASET_STAGES = ("pairs", "score", "generate")
MODEL_STAGES = ("sft", "reward", "dpo", "simpo", "ppo")
# The method's paper, for the card's text and the Hub's `arxiv:` tag.
PAPERS = {
    "sft": None,
    "reward": ("Training language models to follow instructions with human feedback (Ouyang et al., 2022): the "
               "Bradley-Terry reward model", "2203.02155"),
    "dpo": ("Direct Preference Optimization (Rafailov et al., 2023)", "2305.18290"),
    "simpo": ("SimPO: Simple Preference Optimization with a Reference-Free Reward (Meng et al., 2024)", "2405.14734"),
    "ppo": ("Proximal Policy Optimization (Schulman et al., 2017), as in InstructGPT (2203.02155)", "1707.06347"),
}


def push(stage_dir: str, repo_id: str, to_dir: str | None = None, private: bool = False,
         revision: str | None = None, license: str = "other") -> Path | str:
    """Build the repo folder for `stage_dir` and upload it (or only write it to `to_dir`). Returns the folder
    written, or the uploaded repo's URL."""
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or "--" in repo_id:
        raise ConfigError(f"repo id {repo_id!r}: must be owner/name (letters, digits, '-', '_', '.'), e.g. "
                          "alice/quickstart-dpo")
    d = Path(stage_dir)
    info = read_stage(d)
    repo_type = "dataset" if info["stage"] in DATASET_STAGES else "model"
    token = None if to_dir is not None else hub_token()
    if to_dir is None and not token:  # offline or not logged in: the files here, and the command that sends them
        to_dir = str(local_folder(d, repo_id))
        shutil.rmtree(to_dir, ignore_errors=True)  # a folder an earlier push left: rebuilt from this result
        print("[prefopt] push: no Hugging Face token (HF_TOKEN or `hf auth login`): nothing uploaded", flush=True)
    if to_dir is not None:
        out = Path(to_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ConfigError(f"--to-dir {out}: not an empty folder (it receives exactly what would be uploaded)")
        build(d, info, repo_id, out, license)
        print(f"[prefopt] push: wrote the {repo_type} repo {repo_id} to {out}; upload it with: "
              f"hf upload {repo_id} {out} . --repo-type={repo_type}" + (" --private" if private else "")
              + (f" --revision={revision}" if revision else ""), flush=True)
        return out
    with tempfile.TemporaryDirectory(prefix="prefopt-push-") as tmp:
        build(d, info, repo_id, Path(tmp) / "repo", license)
        url = hub_upload(Path(tmp) / "repo", repo_id, repo_type, private, revision, token)
    print(f"[prefopt] push: {info['stage']} -> {url}", flush=True)
    return url


def local_folder(stage_dir: Path, repo_id: str) -> Path:
    """Where a push without a token writes the repo: `<experiment>/push/<owner>__<name>`, beside the stage folders
    (outside them, so it is no stage's output)."""
    return Path(stage_dir).parent / "push" / repo_id.replace("/", "__")


def publish(cfg) -> list:
    """`push_to_hub: {stage: owner/name}`: push each named stage's result of the experiment's last round (after
    evaluate, so a card carries the final table). Without a token each is written under `<experiment>/push/`."""
    from prefopt.experiment import stage_dir

    out = []
    for stage, repo_id in cfg.push_to_hub.items():
        d = stage_dir(cfg, stage, cfg.iterations if stage in ROUND_STAGES else 1)
        out.append(push(str(d), repo_id, private=cfg.push_private))
    return out


def hub_token() -> str | None:
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token()


def hub_upload(folder: Path, repo_id: str, repo_type: str, private: bool, revision: str | None, token: str) -> str:
    """The only network call: create the repo (and the branch), upload the folder as one commit. Tests replace it."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, repo_type=repo_type, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type=repo_type, revision=revision,
                      commit_message="prefopt push")
    return str(url)


# --------------------------------------------------------------------------------------------- the stage's record


def read_stage(d: Path) -> dict:
    """{"stage", "round", "experiment", "versions", "summary", "replicate_seed"} of a finished stage folder; a
    one-line error when it is not one."""
    if not d.is_dir():
        raise ConfigError(f"push: no stage folder {d} (runs/<experiment>/<stage>)")
    try:
        record = yaml.safe_load((d / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        record = None
    if not isinstance(record, dict) or "stage" not in record:
        raise DataError(d, None, None, "not a prefopt stage folder (no readable config.yaml)")
    stage = record["stage"]
    if read_marker(d) is None:
        raise DataError(d, None, None, f"stage {stage} has not finished (no valid {MARKER}); run it first, then "
                        "push its result")
    if stage not in DATASET_STAGES + MODEL_STAGES:
        raise ConfigError(f"push: {stage} makes nothing to publish; push a dataset stage "
                          f"({', '.join(DATASET_STAGES)}) or a model stage ({', '.join(MODEL_STAGES)})")
    summary = json.loads((d / "summary.json").read_text()) if (d / "summary.json").exists() else {}
    return {"stage": stage, "round": record.get("round", 1), "experiment": record.get("experiment") or {},
            "versions": record.get("versions") or {}, "summary": summary,
            "replicate_seed": record.get("replicate_seed")}


def provenance(d: Path, info: dict) -> dict:
    """What the run recorded about how this result was made: experiment, stage, seeds, generator and sampling,
    reward model and its hash, the stage's summary figures, package versions."""
    exp, stage = info["experiment"], info["stage"]
    out = {"experiment": exp.get("name"), "stage": stage, "round": info["round"], "seed": exp.get("seed")}
    if info["replicate_seed"] is not None:
        out["replicate_seed"] = info["replicate_seed"]
    # the data behind the result: the sampled candidates (a dataset; the pairs DPO and SimPO train on) and the
    # reward model that scored them (also PPO's reward)
    gen = _first_row(d.parent / "generate", "shard-*.jsonl")
    if gen and stage in DATASET_STAGES + ("dpo", "simpo"):
        out["generator"] = {**gen.get("generator", {}), "sampling": gen.get("sampling")}
    scored = _first_row(d.parent / "score", "shard-*.jsonl")
    if scored and scored.get("reward_model") and stage in ("pairs", "score", "dpo", "simpo", "ppo"):
        out["reward_model"] = scored["reward_model"]
    if stage in MODEL_STAGES and (d / "model").is_dir():
        from prefopt.io import weights_sha256

        out["weights_sha256"] = weights_sha256(d / "model")
    out["summary"] = {k: v for k, v in info["summary"].items()
                      if isinstance(v, (int, float, str, bool)) and k not in ("stage", "round")}
    out["versions"] = info["versions"]
    return out


def _first_row(d: Path, pattern: str) -> dict | None:
    for p in sorted(d.glob(pattern)):
        with open(p, encoding="utf-8") as f:
            line = f.readline()
        if line.strip():
            return json.loads(line)
    return None


def _read_rows(d: Path, pattern: str) -> list[dict]:
    from prefopt.io import read_jsonl

    return [r for p in sorted(d.glob(pattern)) for r in read_jsonl(p)]


# --------------------------------------------------------------------------------------------- the repo folder


def build(d: Path, info: dict, repo_id: str, out: Path, license: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    prov = provenance(d, info)
    if info["stage"] in DATASET_STAGES:
        configs = write_dataset(d, info["stage"], out)
        card = dataset_card(d, info, prov, repo_id, configs, license)
    else:
        for p in sorted((d / "model").iterdir()):
            if p.is_file() and not p.name.startswith("."):
                shutil.copy2(p, out / p.name)
        card = model_card(d, info, prov, repo_id, license)
    card.save(str(out / "README.md"))


def write_dataset(d: Path, stage: str, out: Path) -> dict[str, int]:
    """Parquet files per config and split: `pairs` (when the stage is pairs) and `candidates` (a prompt, its
    candidates and their scores). {config: rows}."""
    import datasets
    from datasets import Dataset

    datasets.disable_progress_bars()  # a bar per parquet file: noise on a command's console
    configs = {}
    if stage == "pairs":
        rows = _read_rows(d, "pairs.jsonl")
        configs["pairs"] = rows
    gen_dir = d if stage == "generate" else d.parent / "generate"
    score_dir = d if stage == "score" else d.parent / "score"
    candidates = _read_rows(gen_dir, "shard-*.jsonl")
    if candidates:
        scores = {r["prompt_id"]: r for r in _read_rows(score_dir, "shard-*.jsonl")} if stage != "generate" else {}
        configs["candidates"] = [
            {"prompt_id": r["prompt_id"], "prompt": r["prompt"], "candidates": r["candidates"],
             **({"scores": scores[r["prompt_id"]]["scores"]} if r["prompt_id"] in scores else {}),
             "generator_sha256": (r.get("generator") or {}).get("sha256")}
            for r in candidates]
    for name, rows in configs.items():
        path = out / "data" / name / "train-00000-of-00001.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        Dataset.from_list(rows).to_parquet(str(path))
    return {name: len(rows) for name, rows in configs.items()}


def _figures(summary: dict) -> list[str]:
    """`- key: value ± se` for the summary's numbers (a `<key>_se` beside its key)."""
    lines = []
    for k, v in summary.items():
        if k.endswith("_se") or isinstance(v, bool) or not isinstance(v, (int, float)) or k in ("round",):
            continue
        se = summary.get(k + "_se")
        lines.append(f"- `{k}`: {v:.4g} ± {se:.2g}" if isinstance(se, (int, float)) else f"- `{k}`: {v:.6g}")
    return lines


def _evaluation(d: Path, stage: str) -> list[str]:
    table = d.parent / "evaluate" / "table.md"
    if not table.exists():
        return []
    text = table.read_text().strip()
    whose = (f"this {stage} policy's row is the one named after it" if stage in MODEL_STAGES else
             "the aligned policies were trained on these pairs" if stage == "pairs" else "from the same run")
    return ["## Evaluation", "", f"The run's final evaluation table (its `evaluate` stage; {whose}):", "", text, ""]


def _common_body(info: dict, prov: dict, d_evaluation: list[str]) -> list[str]:
    exp = info["experiment"]
    lines = ["## Provenance", ""]
    lines.append(f"- experiment `{prov['experiment']}`, stage `{prov['stage']}` (round {prov['round']}), seed "
                 f"{prov['seed']}" + (f", replicate seed {prov['replicate_seed']}" if "replicate_seed" in prov else ""))
    if "generator" in prov:
        g = prov["generator"]
        lines.append(f"- generator `{g.get('path')}` (weights sha256 {g.get('sha256')}, {g.get('backend')}), "
                     f"sampling {json.dumps(g.get('sampling'))}")
    if "reward_model" in prov:
        lines.append(f"- reward model `{prov['reward_model'].get('path')}` (weights sha256 "
                     f"{prov['reward_model'].get('sha256')})")
    if "weights_sha256" in prov:
        lines.append(f"- these weights: sha256 {prov['weights_sha256']}")
    lines.append("- packages: " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()))
    lines += ["", "## Summary figures (± one standard error where the stage computed one)", ""]
    lines += _figures(info["summary"]) or ["(none)"]
    lines += ["", *d_evaluation, "## Experiment config", "", "```yaml",
              yaml.safe_dump(exp, sort_keys=False, allow_unicode=True).rstrip(), "```", ""]
    return lines


def dataset_card(d: Path, info: dict, prov: dict, repo_id: str, configs: dict[str, int], license: str):
    from huggingface_hub import DatasetCard, DatasetCardData

    data = DatasetCardData(
        license=license, tags=["prefopt", "preference", info["stage"]], pretty_name=repo_id.split("/")[1],
        size_categories=[_size_category(max(configs.values(), default=0))],
        configs=[{"config_name": name, **({"default": True} if i == 0 else {}),
                  "data_files": [{"split": "train", "path": f"data/{name}/train-*.parquet"}]}
                 for i, name in enumerate(configs)],
        prefopt=prov)
    stage = info["stage"]
    body = [f"# {repo_id}", "", f"Made by prefopt's `{stage}` stage of the experiment "
            f"`{prov['experiment']}`: " + ", ".join(f"`{n}` ({rows} rows)" for n, rows in configs.items()) + ".",
            "Split `train` is what the run used: pairs and candidates come from its training prompts; its "
            "validation and test prompts have none.", "", "```python", "from datasets import load_dataset",
            f"pairs = load_dataset({repo_id!r}, split='train')" if "pairs" in configs else
            f"ds = load_dataset({repo_id!r}, 'candidates', split='train')", "```", ""]
    body += _common_body(info, prov, _evaluation(d, stage))
    return DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def model_card(d: Path, info: dict, prov: dict, repo_id: str, license: str):
    from huggingface_hub import ModelCard, ModelCardData

    stage, exp = info["stage"], info["experiment"]
    paper = PAPERS.get(stage)
    base = base_model(exp, stage)
    datasets = hub_datasets(exp.get(stage) or {})
    classifier = stage == "reward" and (exp.get("reward") or {}).get("kind") == "classifier"
    data = ModelCardData(
        license=license, library_name="transformers", base_model=base, datasets=datasets or None,
        pipeline_tag="text-classification" if classifier else "text-generation",
        tags=["prefopt", stage] + ([f"arxiv:{paper[1]}"] if paper else []), model_name=repo_id.split("/")[1],
        prefopt=prov)
    body = [f"# {repo_id}", "", f"The `{stage}` policy of the prefopt experiment `{prov['experiment']}`"
            + (f", trained with {paper[0]}, [arXiv:{paper[1]}](https://arxiv.org/abs/{paper[1]})." if paper
               else "."), "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f"model = AutoModelForCausalLM.from_pretrained({repo_id!r})", "```", ""]
    body += _common_body(info, prov, _evaluation(d, stage))
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body))


def base_model(exp: dict, stage: str) -> str | None:
    """The Hub id the stage's weights descend from: its section's model (policy, for PPO) followed through `stage:`
    references (dpo -> sft -> base) to the first value that is not one; None when that is a local folder or a model
    built by the run."""
    seen = set()
    while stage not in seen:
        seen.add(stage)
        sec = exp.get(stage) or {}
        value = sec.get("policy") or sec.get("model") or ""
        if isinstance(value, str) and value.startswith("stage:"):
            stage = value[len("stage:"):].split("/", 1)[0]
            continue
        if isinstance(value, str) and REPO_ID.match(value) and not Path(value).exists():
            return value
        return None
    return None


def hub_datasets(section: dict) -> list[str]:
    """Hub ids among a section's dataset specs (`{path: owner/name, ...}`, a mixture's parts)."""
    out = []

    def walk(v):
        if isinstance(v, dict):
            path = v.get("path")
            if isinstance(path, str) and REPO_ID.match(path) and not path.startswith("stage:") \
                    and not Path(path).exists():
                out.append(path)
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)

    walk(section)
    return sorted(set(out))


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"
