"""`prefopt --help` as a user sees it: every stage and command is listed with its one-line help."""

from __future__ import annotations

import os
import subprocess

from pair_helpers import PY, REPO


def test_top_level_help_lists_stages_and_commands():
    """The issue-11 additions are discoverable from `--help`: the `self_instruct` stage and the `annotate` command,
    beside the pipeline's stages; the `dpo` line describes the loop that trains (ours), not TRL's trainer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "prefopt", "--help"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines: dict[str, str] = {}  # command -> its help, wrapped continuation lines joined
    name = None
    for line in proc.stdout.splitlines():
        if line.startswith("    ") and line[4:5].strip():
            name, *words = line.split()
            lines[name] = " ".join(words)
        elif name and line.startswith(" " * 5) and line.strip():
            lines[name] += " " + line.strip()
        else:
            name = None
    for command in ("self_instruct", "annotate", "task", "sft", "dpo", "simpo", "ppo", "evaluate", "run", "check"):
        assert command in lines, f"{command} missing from prefopt --help:\n{proc.stdout}"
    assert "self-instruct" in lines["self_instruct"]
    assert "gradio" in lines["annotate"]
    assert "prefopt's own preference loop" in lines["dpo"] and "DPOTrainer" not in proc.stdout


def test_run_help_explains_every_experiment_key():
    """`prefopt run --help` (and `prefopt --help`) list every key of the experiment outside the stage sections
    (top level, `wandb`, `launch`, ...) with its meaning; each stage's keys are in `prefopt STAGE --help`. The top
    level's list used to stop after 40 lines, in the middle of `launch`."""
    import dataclasses
    import typing

    from prefopt.experiment import ORDER, ExperimentConfig

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([PY, "-m", "prefopt", "run", "--help"], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]

    def keys(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or (not prefix and f.name in ORDER):
                continue
            if dataclasses.is_dataclass(hints[f.name]):
                yield from keys(hints[f.name], prefix + f.name + ".")
            else:
                yield prefix + f.name

    expected = list(keys(ExperimentConfig))
    assert "launch.preload" in expected and "wandb.mode" in expected and "sft.learning_rate" not in expected
    for key in expected:
        assert f"  --{key}=" in proc.stdout, f"--{key} missing from prefopt run --help"
    assert "  --sft." not in proc.stdout and "prefopt STAGE --help" in proc.stdout


def test_stage_help_gives_a_nested_sections_meaning_and_its_real_defaults():
    """A dataset key is a section of its own: `--help` says what it is for, then its keys with the defaults the
    stage gives them (evaluate reads the task's test prompts by default, not an empty path)."""
    from prefopt.cli import _section_class, describe_section

    text = "\n".join(describe_section(_section_class("evaluate"), "evaluate"))
    assert "  --evaluate.prompts.path='stage:task/test_prompts.jsonl'  [str]" in text
    assert "  --evaluate.validation_prompts.path='stage:task/val_prompts.jsonl'  [str]" in text
    assert "  --evaluate.reference.path=''  [str]" in text
    head = text.index("  --evaluate.reference.<key>")
    assert "Reference answers every policy is compared with" in text[head:text.index("--evaluate.reference.path")]
