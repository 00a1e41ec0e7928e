"""The model families the conformance suite checks, and a warning for the ones it does not.

"Supports model X" means a test ran model X's architecture: tests/test_architectures.py builds a tiny random-init
instance of each family below from its transformers config class (tests/families.py: real chat template and
special tokens, every sliding window shorter than the test sequences) and checks, for each attention
implementation listed, what `CHECKS` names. The README's supported-models table is `support_table(LAYOUTS)`, and a test
keeps the two equal, so the table says what the suite checks and nothing more.
"""

from __future__ import annotations

import warnings

CHECKS = {
    "logps": "log-probs of every batching layout (padded, packed, shared_prompt, prefix_tree; hook, chunked and "
             "in-forward projection) equal log_softmax(model(input_ids).logits) within 1e-5 (fp32)",
    "bf16": "the same under bf16 autocast, within the stated bf16 tolerance",
    "bos": "exactly the family's BOS (or none) in generation, pairs, reward scoring, evaluation, PPO, SFT, judge",
    "sft_mask": "SFT trains on the completion and its EOS only",
    "vllm_ids": "the vLLM request's prompt token ids equal the transformers generator's",
    "rm_batch": "reward-model scores batched equal scores one at a time",
}

# model_type -> (family name, Hub models it stands for, attention implementations checked, notes)
CHECKED: dict[str, dict] = {
    "llama": {"family": "llama3", "models": "Llama-3 / 3.1 8B-Instruct, Skywork-Reward-Llama-3.1, ArmoRM backbone",
              "attn": ("eager", "sdpa"), "notes": "GQA, no pad token (EOS pads)"},
    "gemma2": {"family": "gemma2", "models": "gemma-2-2b/9b/27b-it, Skywork-Reward-Gemma-2-27B",
               "attn": ("eager",), "notes": "eager (prefopt loads it so on every version: SDPA, which transformers "
                                            "5.17 picks, drops the attention soft-cap); attention and final-logit "
                                            "soft-capping; sliding window on alternate layers; tied embeddings"},
    "qwen2": {"family": "qwen2.5", "models": "Qwen2.5-*-Instruct", "attn": ("eager", "sdpa"),
              "notes": "ChatML, no BOS; sliding-window layers when use_sliding_window"},
    "mistral": {"family": "mistral", "models": "Mistral-7B-Instruct", "attn": ("eager", "sdpa"),
                "notes": "[INST] template; sliding window on every layer"},
    "phi3": {"family": "phi3", "models": "Phi-3-mini/medium-instruct", "attn": ("eager", "sdpa"),
             "notes": "fused qkv and gate-up projections; sliding window"},
    "gemma3_text": {"family": "gemma3", "models": "gemma-3-1b-it (text)", "attn": ("eager", "sdpa"),
                    "notes": "sliding and full layer types; q/k norms"},
}


def support_table(layouts) -> str:
    """The README's supported-models table, written from `CHECKED`, every family with the batch `layouts` the suite
    runs it in (prefopt.preference.batching.LAYOUTS: models sit below the loop and do not import it)."""
    lines = ["| family (model_type) | stands for | attention checked | layouts | what differs |",
             "|---|---|---|---|---|"]
    for model_type, c in CHECKED.items():
        lines.append(f"| {c['family']} (`{model_type}`) | {c['models']} | {', '.join(c['attn'])} | "
                     f"{', '.join(layouts)} | {c['notes']} |")
    return "\n".join(lines)


def unchecked(config) -> str | None:
    """What the suite has not checked for a model with this config, or None when its family and attention
    implementation are checked."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None)
    attn = getattr(text, "_attn_implementation", None) or "eager"
    entry = CHECKED.get(model_type)
    if entry is None:
        return (f"model family {model_type!r} is not in prefopt's conformance suite: its batching layouts' log-probs, "
                f"BOS handling and reward scoring have not been checked against its own forward (checked: "
                f"{', '.join(CHECKED)}); layout: padded is the safe choice")
    if attn not in entry["attn"]:
        return (f"attn_implementation {attn!r} of {model_type!r} is not in prefopt's conformance suite (checked: "
                f"{', '.join(entry['attn'])})")
    return None


def warn_if_unchecked(config, where: str) -> str | None:
    """A warning (never a failure) naming what the conformance suite has not checked for this model."""
    message = unchecked(config)
    if message:
        warnings.warn(f"{where}: {message}", stacklevel=2)
    return message
