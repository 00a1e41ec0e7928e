"""The evaluation suite: per policy, perplexity on a held-out text file, multiple-choice accuracy on local C-Eval /
MMLU files, and lm-evaluation-harness tasks. Run by the `evaluate` stage after its own figures:

    prefopt evaluate experiments/quickstart.yaml --evaluate.suite.perplexity_file=heldout.txt \
        --evaluate.suite.multiple_choice=ceval/val/computer_network_val.csv --evaluate.suite.mc_method=letter
    prefopt evaluate experiments/alpaca/gpt4_x_alpaca_13b.yaml     # the four lm-eval tasks of the GPT4-x-Alpaca table

Figures (per policy, merged into summary.json's `policies` and logged as `<policy>/<figure>`):
  ppl                             exp(mean NLL per predicted token) over the file's texts (`metrics.perplexity`)
  mc/<file stem>/accuracy         fraction right; the prediction is the best-scored option (ties: the first)
  mc/<file stem>/accuracy_stderr  sqrt(p (1 - p) / n), the binomial standard error of that fraction
  lm_eval/<task>/<metric>         lm-eval's figure (`acc`, `acc_norm`, `acc_stderr`, ...), `<metric>@<filter>` when
                                  the task filters its outputs (a filter other than `none`)

Multiple choice, two ways (`mc_method`):
  letter  the prompt lists the question and its options and ends in "Answer:"; the prediction is the letter among
          " A" .. " D" with the highest log-probability as the continuation (MMLU's and C-Eval's own evaluation,
          zero-shot here, without their subject header).
  full    "<question>\\nAnswer:" followed by " <option text>": each option's whole log-likelihood, summed or
          averaged per token (`mc_normalize`), as lm-eval-harness's multiple-choice tasks (`acc` is the sum).

Outputs in the stage folder: suite.md (one row per policy, every suite figure), lm_eval_<policy>.json (lm-eval's
results, subtasks and configs included; no per-sample records; under `_prefopt`, the settings that made them).

Resume: lm-eval is the long part (hours for MMLU on a 13B model). A rerun in the same working folder after a kill
reuses a policy's lm_eval_<policy>.json when its `_prefopt` settings equal this run's (tasks, shots, limit, dtype,
model args, the policy's weights hash, the content of local task folders) and reads its figures as a fresh run
does; any difference reruns lm-eval for that policy. Perplexity and multiple choice (minutes) are recomputed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prefopt.evaluate.config import SuiteConfig
from prefopt.evaluate.samples import free_memory
from prefopt.data.errors import DataError
from prefopt.data.loaders import read_records

LETTERS = ("A", "B", "C", "D")
LM_EVAL_SETTINGS = "_prefopt"  # the key in lm_eval_<policy>.json, beside lm-eval's raw results, of what made them
MC_FIELDS = ("question", *LETTERS, "answer")  # MMLU's headerless CSV column order


def suite_warnings(cfg: SuiteConfig) -> list[tuple[str, str, str]]:
    """What `prefopt check` can say about the suite before a GPU-hour is spent, as (kind, key, text): files not
    here ("missing", the text with `checks`' `{here}` slot), lm-eval not installed ("warning")."""
    import importlib.util

    out = []
    files = [("perplexity_file", cfg.perplexity_file)] + [(f"multiple_choice[{i}]", p)
                                                          for i, p in enumerate(cfg.multiple_choice)]
    for key, value in files:
        if value and not Path(value).exists():
            out.append(("missing", f"evaluate.suite.{key}", f"file {value!r} does not exist{{here}}"))
    if cfg.lm_eval_tasks and importlib.util.find_spec("lm_eval") is None:
        out.append(("warning", "evaluate.suite.lm_eval_tasks", "lm-evaluation-harness is not installed here; the "
                    "machine that runs evaluate needs `pip install 'prefopt[eval]'`"))
    return out


# ------------------------------------------------------------------------------------------------ loaders


def load_texts(path: str | Path, field_name: str = "text") -> list[str]:
    """The perplexity file's texts: non-empty lines of a .txt file, or `field_name` of each JSON / JSONL row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    if path.suffix == ".txt":
        texts = [ln for ln in path.read_text(encoding="utf-8-sig").splitlines() if ln.strip()]
    else:
        texts = []
        for n, rec in read_records(path):
            if not isinstance(rec, dict):
                raise DataError(path, n, None, getattr(rec, "problem", "expected a JSON object"))
            value = rec.get(field_name)
            if not isinstance(value, str) or not value.strip():
                raise DataError(path, n, field_name, "missing or not a non-empty string")
            texts.append(value)
    if not texts:
        raise DataError(path, None, None, "no texts")
    return texts


def _mc_row(path: Path, n: int, rec: dict) -> dict:
    """One question in prefopt's form: {question, options: [A, B, C, D], answer: 0-3, row}."""
    vals = {}
    for key in ("question", *LETTERS):
        v = rec.get(key)
        v = "" if v is None else str(v)  # a JSON number is a fine option ("42")
        if not v.strip():
            raise DataError(path, n, key, "missing or empty" + (" option" if key in LETTERS else ""))
        vals[key] = v
    answer = "" if rec.get("answer") is None else str(rec["answer"]).strip()
    if answer not in LETTERS:
        hint = " (C-Eval's test split hides its answers: use dev or val)" if not answer else ""
        raise DataError(path, n, "answer", f"must be one of A, B, C, D, got {answer!r}{hint}")
    return {"question": vals["question"], "options": [vals[k] for k in LETTERS], "answer": LETTERS.index(answer),
            "row": n}


def _csv_rows(path: Path):
    """(1-based line where the record starts, its cells) for each non-blank CSV record (quoted newlines allowed)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        start = 1
        for cells in reader:
            if any(c.strip() for c in cells):
                yield start, cells
            start = reader.line_num + 1


def load_multiple_choice(path: str | Path) -> list[dict]:
    """Questions from a C-Eval / MMLU CSV or a JSON / JSONL file (see `SuiteConfig.multiple_choice`).

    A CSV whose first record names the columns question, A, B, C, D, answer (any case, other columns such as
    C-Eval's id or explanation ignored) is read by name; otherwise every record is MMLU's six columns. Row numbers
    are 1-based lines (the header is line 1). A missing or empty option or question, or an answer outside A-D,
    raises DataError naming the file, the row and the field."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, None, "file not found")
    rows = []
    if path.suffix.lower() == ".csv":
        records = list(_csv_rows(path))
        if not records:
            raise DataError(path, None, None, "no questions")
        header = [c.strip() for c in records[0][1]]
        index = {c.lower(): i for i, c in enumerate(header)}
        if "question" in index:  # a header row (C-Eval's); MMLU's files have none
            lacking = [k for k in MC_FIELDS if k.lower() not in index]
            if lacking:
                hint = " (C-Eval's test split has no answers: use dev or val)" if lacking == ["answer"] else ""
                raise DataError(path, 1, lacking[0], f"the header has no column {', '.join(lacking)}{hint}")
            for n, cells in records[1:]:
                at = {k: index[k.lower()] for k in MC_FIELDS}
                rows.append(_mc_row(path, n, {k: cells[i] if i < len(cells) else None for k, i in at.items()}))
        else:
            for n, cells in records:
                if len(cells) != len(MC_FIELDS):
                    missing = MC_FIELDS[len(cells)] if len(cells) < len(MC_FIELDS) else None
                    raise DataError(path, n, missing, f"{len(cells)} columns; a header naming question, A, B, C, D, "
                                    "answer, or MMLU's headerless six columns question,A,B,C,D,answer")
                rows.append(_mc_row(path, n, dict(zip(MC_FIELDS, cells))))
    else:
        for n, rec in read_records(path):
            if not isinstance(rec, dict):
                raise DataError(path, n, None, getattr(rec, "problem", "expected a JSON object"))
            rows.append(_mc_row(path, n, rec))
    if not rows:
        raise DataError(path, None, None, "no questions")
    return rows


# ------------------------------------------------------------------------------------------------ figures


def letter_prompt(question: str, options: Sequence[str]) -> str:
    """MMLU's zero-shot prompt without the subject line: the question, "A. ..." per option, then "Answer:"."""
    return question + "".join(f"\n{k}. {o}" for k, o in zip(LETTERS, options)) + "\nAnswer:"


def full_prompt(question: str) -> str:
    """The context every option is scored after in the `full` method (the continuation is " <option>")."""
    return f"{question}\nAnswer:"


def mc_questions(rows: Sequence[dict], method: str) -> list[dict]:
    """Rows as `metrics.multiple_choice_accuracy` questions: the context and the continuations compared."""
    if method == "letter":
        return [{"question": letter_prompt(r["question"], r["options"]),
                 "options": [f" {k}" for k in LETTERS[:len(r["options"])]], "answer": r["answer"]} for r in rows]
    if method == "full":
        return [{"question": full_prompt(r["question"]), "options": [f" {o}" for o in r["options"]],
                 "answer": r["answer"]} for r in rows]
    raise ValueError(f"mc_method must be 'letter' or 'full', got {method!r}")


def accuracy_with_stderr(correct: Sequence[bool]) -> tuple[float, float]:
    """(p, sqrt(p (1 - p) / n)): the fraction right and its binomial standard error."""
    if not correct:
        raise ValueError("no questions")
    n = len(correct)
    p = sum(bool(c) for c in correct) / n
    return p, math.sqrt(p * (1 - p) / n)


def lm_eval_figures(results: dict, wanted: Sequence[str]) -> dict[str, float]:
    """lm-eval's `results` ({task: {"acc,none": 0.5, "alias": ..., ...}}) as {"lm_eval/<task>/<metric>": value}
    for the wanted tasks or groups (all tasks when none of them is a key, as for a tag), numbers only; a filter
    other than `none` is kept as `<metric>@<filter>`."""
    names = [t for t in wanted if t in results] or list(results)
    out = {}
    for task in names:
        for key, value in results[task].items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # name, alias, sample_len, "N/A" standard errors
            metric, filt = key.split(",", 1)
            out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"@{filt}")] = float(value)
    return out


def suite_table(figures: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per policy, one column per suite figure (in the order first seen)."""
    cols: list[str] = []
    for f in figures.values():
        cols += [k for k in f if k not in cols]
    lines = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, f in figures.items():
        lines.append(f"| {name} | " + " | ".join("–" if f.get(c) is None else f"{f[c]:.4f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


def merge_suite(figures: dict[str, dict], suite: dict[str, dict[str, float]]) -> dict[str, dict]:
    """The stage's per-policy figures with the suite's added (no-op when the suite ran nothing)."""
    for name, f in suite.items():
        figures.setdefault(name, {}).update(f)
    return figures


# ------------------------------------------------------------------------------------------------ running


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def model_figures(model, tok, cfg: SuiteConfig, texts: list[str] | None, mc: dict[str, list[dict]]) -> dict:
    """Perplexity (`texts`, None: none) and multiple-choice figures ({file stem: rows}) of one loaded model."""
    from prefopt.evaluate import metrics as M  # torch: imported only when a model is scored, not with the config

    out: dict[str, float] = {}
    if texts is not None:
        out["ppl"] = M.perplexity(model, tok, texts, batch_size=cfg.batch_size)
    for stem, rows in mc.items():
        res = M.multiple_choice_accuracy(model, tok, mc_questions(rows, cfg.mc_method), normalize=cfg.mc_normalize)
        p, se = accuracy_with_stderr([pred == r["answer"] for pred, r in zip(res["predictions"], rows)])
        out[f"mc/{stem}/accuracy"], out[f"mc/{stem}/accuracy_stderr"] = p, se
    return out


def _load_and_score(path: str, cfg: SuiteConfig, texts: list[str] | None, mc: dict[str, list[dict]]) -> dict:
    """`model_figures` of one policy folder, its model loaded once for perplexity and multiple choice."""
    from prefopt.models.loading import load_causal_lm, load_tokenizer

    dtype = "float32" if _device() == "cpu" else cfg.dtype  # half precision on CPU is slow and moves log-probs
    model = load_causal_lm(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code).to(_device()).eval()
    out = model_figures(model, load_tokenizer(path, trust_remote_code=cfg.trust_remote_code), cfg, texts, mc)
    del model
    free_memory()
    return out


@contextlib.contextmanager
def _inside(folder: Path | None):
    """Run from `folder` (None: stay), back where we were afterwards; contextlib.chdir needs Python 3.11."""
    if folder is None:
        yield
        return
    here = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(here)


def _lm_eval_groups(cfg: SuiteConfig) -> list[tuple[Path | None, list[str]]]:
    """(local task folder or None, task entries): named tasks together; each local folder on its own, since its
    relative data paths are read from inside it."""
    named = [t for t in cfg.lm_eval_tasks if not Path(t).is_dir()]
    local = [Path(t).resolve() for t in cfg.lm_eval_tasks if Path(t).is_dir()]
    return ([(None, named)] if named else []) + [(p, [str(p)]) for p in local]


def _lm_eval_dtype(cfg: SuiteConfig) -> str:
    return cfg.dtype if _device() == "cuda" else "float32"


def _folder_sha256(folder: Path) -> str:
    """Content hash of every file under a local task folder (its YAMLs and data), by relative path."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def lm_eval_settings(path: str, cfg: SuiteConfig) -> dict:
    """What one policy's lm-eval figures depend on, as JSON gives it back: the run is reused only when all equal.
    Batch size and `parallelize`-like model args change speed, not figures, but model args are kept whole."""
    from prefopt.io import weights_sha256

    settings = {"tasks": list(cfg.lm_eval_tasks), "num_fewshot": dict(sorted(cfg.lm_eval_num_fewshot.items())),
                "limit": cfg.lm_eval_limit, "dtype": _lm_eval_dtype(cfg), "model_args": cfg.lm_eval_model_args,
                "weights_sha256": weights_sha256(path),
                "task_folders": {str(p): _folder_sha256(p) for p, _ in _lm_eval_groups(cfg) if p is not None}}
    return json.loads(json.dumps(settings, default=str))


def raw_lm_eval_figures(raw: dict) -> dict[str, float]:
    """The figures of `run_lm_eval`'s raw results (one entry per lm-eval call, keyed by its tasks joined by commas):
    the one reading used for a fresh run and a reused file alike."""
    figures: dict[str, float] = {}
    for key, res in raw.items():
        if key != LM_EVAL_SETTINGS:
            figures.update(lm_eval_figures({**(res.get("results") or {}), **(res.get("groups") or {})},
                                           key.split(",")))
    return figures


def reusable_lm_eval(file: Path, settings: dict) -> dict[str, float] | None:
    """The figures in an earlier run's lm_eval_<policy>.json when it was made with `settings`; None when the file
    is absent, unreadable, from before settings were stored, or made with other settings."""
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get(LM_EVAL_SETTINGS) != settings:
        return None
    return raw_lm_eval_figures(raw)


def run_lm_eval(path: str, cfg: SuiteConfig) -> tuple[dict[str, float], dict]:
    """lm-eval's `hf` model on one policy folder over every configured task: (figures, raw results per call)."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("evaluate.suite.lm_eval_tasks needs lm-evaluation-harness: pip install 'prefopt[eval]'"
                          ) from e

    # One `hf` model (pretrained=<policy folder>) for every call, rather than model="hf" per call: a 13B model
    # loads once whatever the few-shot settings.
    gpu = _device() == "cuda"
    lm = HFLM(pretrained=str(Path(path).resolve()), device=_device(), dtype=_lm_eval_dtype(cfg),
              batch_size=cfg.lm_eval_batch_size or ("auto" if gpu else 8), trust_remote_code=cfg.trust_remote_code,
              **cfg.lm_eval_model_args)
    raw: dict[str, Any] = {}
    for folder, entries in _lm_eval_groups(cfg):
        tm = TaskManager(include_path=str(folder) if folder else None, include_defaults=folder is None)
        names = list(tm.all_tasks) if folder else entries
        # simple_evaluate takes one num_fewshot: tasks sharing a setting go in one call.
        by_shots: dict[int | None, list[str]] = {}
        for t in names:
            by_shots.setdefault(cfg.lm_eval_num_fewshot.get(t), []).append(t)
        for shots, tasks in by_shots.items():
            with _inside(folder):
                res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=shots, task_manager=tm,
                                              limit=cfg.lm_eval_limit or None, log_samples=False,
                                              bootstrap_iters=1000)
            # a group's aggregate (mmlu) may sit under "groups" rather than "results", depending on the version
            raw[",".join(tasks)] = {k: res.get(k) for k in ("results", "groups", "n-shot", "versions", "configs")}
    del lm
    free_memory()
    return raw_lm_eval_figures(raw), raw


def check_files(cfg: SuiteConfig) -> None:
    """Read the suite's files now, so a bad row stops the stage before any sampling, not after (the `evaluate`
    stage calls this first; `run_suite` reads them again, cheaply, when it runs)."""
    if cfg.perplexity_file:
        load_texts(cfg.perplexity_file, cfg.perplexity_field)
    for p in cfg.multiple_choice:
        load_multiple_choice(p)


def run_suite(policies: dict[str, str], cfg: SuiteConfig, out_dir: Path, tracker) -> dict[str, dict[str, float]]:
    """Every configured suite figure for every policy (name -> model folder); {} when nothing is configured.

    The files are read (and bad rows reported) before any model loads. Writes suite.md and lm_eval_<policy>.json
    into out_dir and logs `<policy>/<figure>` to the tracker. A policy's lm_eval_<policy>.json already in out_dir
    with this run's settings (a rerun after a kill) is reused instead of running lm-eval again."""
    from prefopt.stage import atomic_write, write_json

    if not cfg.active:
        return {}
    texts = load_texts(cfg.perplexity_file, cfg.perplexity_field) if cfg.perplexity_file else None
    mc = {Path(p).name.split(".")[0]: load_multiple_choice(p) for p in cfg.multiple_choice}
    out: dict[str, dict[str, float]] = {}
    for name, path in policies.items():
        f: dict[str, float] = {}
        if texts is not None or mc:
            f.update(_load_and_score(path, cfg, texts, mc))
        if cfg.lm_eval_tasks:
            file, settings = Path(out_dir) / f"lm_eval_{name}.json", lm_eval_settings(path, cfg)
            figs = reusable_lm_eval(file, settings)
            if figs is None:
                figs, raw = run_lm_eval(path, cfg)
                write_json(file, {LM_EVAL_SETTINGS: settings, **raw})
            else:
                print(f"[evaluate] suite {name}: lm-eval figures reused from {file.name} (same tasks, settings "
                      "and weights)", flush=True)
            f.update(figs)
        out[name] = f
        tracker.log({f"{name}/{k}": v for k, v in f.items()})
        print(f"[evaluate] suite {name}: " + ", ".join(f"{k}={v:.4f}" for k, v in f.items()), flush=True)
    method = cfg.mc_method + (f" ({cfg.mc_normalize})" if cfg.mc_method == "full" else "")
    notes = [f"mc/{stem}: {len(rows)} questions, method {method}" for stem, rows in mc.items()]
    if texts is not None:
        notes.insert(0, f"perplexity: {len(texts)} texts from {cfg.perplexity_file}")
    atomic_write(Path(out_dir) / "suite.md", suite_table(out) + "".join(f"\n- {n}" for n in notes) + "\n")
    return out
