"""bench/gpu_check.sh --tiny: the GPU check's code on CPU at tiny sizes, launched as a user launches it, and its
harness (a failing, late or impossible section is recorded and the others still run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_check  # noqa: E402  (bench/ is not a package)


def non_finite(value, where: str = "") -> list[str]:
    """Paths of every number in a JSON value that is NaN or infinite."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in non_finite(v, f"{where}/{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in non_finite(v, f"{where}[{i}]")]
    if isinstance(value, float) and not math.isfinite(value):
        return [where]
    return []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One `bash bench/gpu_check.sh --tiny` with $OUT set, as the device tool sets it: (JSON, stdout)."""
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "OUT": str(out), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--tiny"], cwd=str(out), env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / "gpu_check.log").read_text() == proc.stdout  # the log beside the JSON, for $OUT to bring back
    return json.loads((out / "gpu_check.json").read_text()), proc.stdout


def test_every_section_runs_with_finite_figures(tiny):
    data, stdout = tiny
    assert data["mode"] == "tiny" and data["dtype"] == "torch.float32"
    assert list(data["sections"]) == list(gpu_check.SECTIONS)
    for name, rec in data["sections"].items():
        # a layout the lead's batching refuses for Gemma-2's eager attention would be a config error, by design
        allowed = ("ok", "refused") if name.startswith("gemma2/") and name.endswith(("packed", "prompt")) else ("ok",)
        assert rec["status"] in allowed, (name, rec)
        assert rec["wall_s"] >= 0 and rec["peak_mem_mib"] > 0, name
    assert non_finite(data) == []
    for family in gpu_check.FAMILIES:
        s = data["sections"]
        assert s[f"{family}/generate"]["candidates"] == 6 * 3  # 6 prompts x 3 candidates, at most 12 tokens each
        assert 0 < s[f"{family}/generate"]["generated_tokens"] <= 6 * 3 * 12
        # fp32: the prompts prefilled once sample what transformers' own prefill samples (tests/test_generation.py)
        assert s[f"{family}/generate"]["same_samples_as_own_prefill"] == 6 * 3, family
        assert s[f"{family}/pairs"]["pairs"] == 6  # best vs worst: one pair per prompt
        for name in gpu_check.FAMILY_SECTIONS:
            rec = s[f"{family}/{name}"]
            if name.startswith(("generate", "score", "dpo", "simpo", "trl")) and rec["status"] == "ok":
                assert rec["tokens_per_s"] > 0, name
            if name.startswith(("dpo", "simpo")) and rec["status"] == "ok":  # MFU as the stages report it
                assert 0 < rec["mfu"] < rec["mfu_with_attention"] and rec["peak_tflops"] > 0, name
    assert "| llama/parity | ok |" in stdout and "prefopt DPO (prefix_tree" in stdout


def test_llama_layouts_equal_padded_and_the_models_own_forward_in_fp32(tiny):
    """The layouts' summed completion log-probs against the padded layout and against log_softmax(model(ids).logits)
    of each sequence alone, within the conformance suite's fp32 tolerance (1e-5 + 1e-6 |sum|: float32 spacing
    at a sum of ~100 nats is 7.6e-6). A mask that let a token see the future moved them by 0.02-0.18 (issue 22)."""
    data, _ = tiny
    par = data["sections"]["llama/parity"]
    tol = gpu_check.FP32_ATOL + gpu_check.FP32_RTOL * par["max_abs_sum"]
    # each layout with the model's own masks, and the packed ones as the loop runs them (varlen, no masks)
    loop = {"packed+loop", "shared_prompt+loop", "prefix_tree+loop"}
    assert set(par["max_abs_vs_padded"]) == {"packed", "shared_prompt", "prefix_tree"} | loop
    assert set(par["max_abs_vs_reference"]) == set(gpu_check.LAYOUTS) | loop
    assert max(par["max_abs_vs_padded"].values()) <= tol
    assert max(par["max_abs_vs_reference"].values()) <= tol
    assert par["within_fp32_tolerance"] is True
    # the same weights and the same batch give the same first loss in every layout
    assert data["summary"]["llama"]["dpo_loss_first_max_abs_vs_padded"] <= 1e-5
    assert data["summary"]["llama"]["simpo_loss_first_max_abs_vs_padded"] <= 1e-5
    # Gemma-2 (eager, soft-capping, window 16 < the sequences): every layout, the loop's too, within the tolerance
    gem = data["sections"]["gemma2/parity"]
    assert set(gem["max_abs_vs_reference"]) == set(gpu_check.LAYOUTS) | loop
    assert gem["within_fp32_tolerance"] is True


def test_dpo_starts_at_log2_in_prefopt_and_trl_and_ppo_starts_at_zero_kl(tiny):
    """At step 1 the policy is the reference, so DPO's loss is -log sigmoid(0) = log 2 = 0.693147 in prefopt (the
    reference pass precomputed) and in TRL (a live reference); PPO's first rollout has KL 0 (policy and reference
    are the same fp32 weights)."""
    data, _ = tiny
    s = data["sections"]
    for family in gpu_check.FAMILIES:
        assert s[f"{family}/dpo_padded"]["loss_first"] == pytest.approx(math.log(2), abs=1e-6)
        assert s[f"{family}/trl_dpo"]["loss_first"] == pytest.approx(math.log(2), abs=1e-4)  # TRL logs 4 digits
        assert s[f"{family}/trl_dpo"]["ratio_tokens_per_s"] > 0
    assert s["ppo"]["kl_first"] == 0.0 and s["ppo"]["iterations"] == 2


def make_run(tmp_path, **size) -> "gpu_check.Run":
    import copy
    import signal

    signal.signal(signal.SIGALRM, gpu_check._on_alarm)
    sz = copy.deepcopy(gpu_check.TINY)
    for k, v in size.items():
        setattr(sz, k, v)
    return gpu_check.Run(size=sz, mode="tiny", out_path=tmp_path / "gpu_check.json")


def test_a_failing_late_or_unmet_section_is_recorded_and_the_rest_run(tmp_path, capsys):
    run = make_run(tmp_path, section_s=0.3)
    run.section("a", lambda: 1 / 0)
    run.section("b", lambda: {"x": 1.0}, needs=("a",))
    run.section("c", lambda: time.sleep(5) or {})
    run.section("d", lambda: {"tokens_per_s": 2.0})
    s = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert s["a"]["status"] == "error" and s["a"]["error"].startswith("ZeroDivisionError")
    assert s["b"] == {**s["b"], "status": "skipped", "reason": "needs a"}
    assert s["c"]["status"] == "error" and "SectionTimeout" in s["c"]["error"] and s["c"]["wall_s"] < 2
    assert s["d"]["status"] == "ok" and s["d"]["tokens_per_s"] == 2.0
    assert "a FAILED" in capsys.readouterr().out
    spent = make_run(tmp_path, budget_s=0.5)
    time.sleep(0.6)
    spent.section("e", lambda: {})
    assert spent.sections["e"]["status"] == "skipped" and "budget" in spent.sections["e"]["reason"]


def test_trl_missing_is_a_printed_skip_not_a_failure(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError, as on the GPU machine
    run = make_run(tmp_path)
    run.section("llama/trl_dpo", lambda: gpu_check.trl_dpo(run, "llama"))
    rec = run.sections["llama/trl_dpo"]
    assert rec["status"] == "skipped" and rec["reason"].startswith("trl does not import")
    gpu_check.print_table(run)
    assert "llama: TRL comparison skipped: trl does not import" in capsys.readouterr().out
