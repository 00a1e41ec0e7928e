"""Load models and tokenizers by folder or hub id, and build a tiny base model here when none can be downloaded.

Everywhere a model is named, a local folder (a stage's output) or a hub id of a real model works the same way:
both go through `from_pretrained`. Stages pass models to each other only as saved checkpoints.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable


def unwrapped(model):
    """The model under DDP / DeepSpeed wrappers (PEFT forwards attribute lookups itself)."""
    while hasattr(model, "module"):
        model = model.module
    return model

# A small chat template (ChatML-style) so chat-format data works with the tokenizer built here.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]


def is_local_model_path(path: str) -> bool:
    """Whether a model reference names a local folder (absolute, or starting with . or ~) rather than a Hub id."""
    return Path(str(path)).expanduser().is_absolute() or str(path).startswith((".", "~"))


def check_model_path(path: str, need_config: bool = True) -> None:
    """A local model path (`is_local_model_path`) that is not a model folder: a one-line data error instead of
    transformers' traceback about repo ids. Hub ids (`org/name`) pass through."""
    from prefopt.data.errors import DataError

    p = Path(str(path)).expanduser()
    if not is_local_model_path(path):
        return
    if not p.exists():
        raise DataError(path, None, None, "model folder not found")
    if not p.is_dir() or (need_config and not (p / "config.json").exists()):
        raise DataError(path, None, None, "not a model folder (no config.json in it)")


@contextmanager
def hub_errors(path: str):
    """A Hub model id that cannot be had (not in the local cache and no network, a typo, a gated repo): a one-line
    data error naming it, instead of transformers' OSError traceback. Errors with an errno (a full disk, a file
    that cannot be read) are left to the fault handling (exit 6)."""
    try:
        yield
    except OSError as e:
        if e.errno is not None or Path(str(path)).expanduser().exists():
            raise
        from huggingface_hub.constants import HF_HUB_CACHE

        from prefopt.data.errors import DataError

        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(path, None, None, f"no local folder of that name, and as a Hub model id it could not be "
                        f"loaded ({first}); the cache is {HF_HUB_CACHE}: download it where there is a network "
                        f"(`huggingface-cli download {path}`) or name a local folder") from None


def load_tokenizer(path: str, padding_side: str = "right", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    check_model_path(path, need_config=False)  # a tokenizer may be saved alone
    with hub_errors(path):
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        # Llama-style tokenizers ship no pad token; EOS is the usual stand-in (masked out by attention).
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def attention_kwargs(path: str, trust_remote_code: bool = False) -> dict:
    """`attn_implementation="eager"` for a model that soft-caps its attention scores (Gemma-2), else nothing.

    Gemma-2 is defined with soft-capping inside attention; SDPA cannot apply it. transformers 5.23 refuses SDPA for
    Gemma-2, but 5.17 (the vLLM set) picks SDPA by default and silently trains and scores a model without its
    soft-cap. Every prefopt stage loads such a model with eager attention, as transformers recommends for training
    it, so the numbers are the model's own on every version."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - from_pretrained itself reports an unreadable folder or id
        return {}
    return {"attn_implementation": "eager"} if getattr(config.get_text_config(), "attn_logit_softcapping", None) else {}


def load_causal_lm(path: str, dtype: str = "auto", trust_remote_code: bool = False):
    import torch
    from transformers import AutoModelForCausalLM

    from prefopt.models.architectures import warn_if_unchecked

    check_model_path(path)
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    with hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code,
                                                     **attention_kwargs(path, trust_remote_code))
    warn_if_unchecked(model.config, str(path))  # a family the conformance suite has not run: said, not refused
    return model


# Remote model code (ArmoRM's modeling_custom.py) written for transformers 4 imports names that transformers 5 removed
# when it generated its docstrings (`LLAMA_INPUTS_DOCSTRING` from transformers.models.llama.modeling_llama). Names of
# this kind only ever held docstring text, passed to `add_start_docstrings*` decorators: giving the module an empty
# string under that name changes the model's `__doc__` and nothing it computes, so loading goes on (with a one-line
# notice). Any other missing name (a class, a function, a constant the code computes with) could change the numbers
# if stood in for, so that is a one-line error naming the symbol, the model and what to do, never a guess.
_DOCSTRING_NAME = re.compile(r"^_?[A-Z0-9_]*(_DOCSTRING|_FOR_DOC)$")


def _from_pretrained(cls, path: str, trust_remote_code: bool, **kw):
    """`cls.from_pretrained(path, ...)`, with the docstring names above given to transformers' modules when a model's
    own code imports them."""
    import importlib

    import transformers

    stood_in: set[tuple[str, str]] = set()
    while True:
        try:
            return cls.from_pretrained(path, trust_remote_code=trust_remote_code, **kw)
        except ImportError as e:
            found = re.match(r"cannot import name '(\w+)' from '([\w.]+)'", str(e))
            if not trust_remote_code or found is None or not found.group(2).startswith("transformers"):
                raise
            name, module = found.groups()
            if not _DOCSTRING_NAME.match(name) or (name, module) in stood_in:
                from prefopt.config import ConfigError

                raise ConfigError(
                    f"the model code of {path} imports {name} from {module}, which transformers "
                    f"{transformers.__version__} does not have: run it with the transformers its config.json names, "
                    f"or use a revision of its code that does not import {name}") from None
            setattr(importlib.import_module(module), name, "")
            stood_in.add((name, module))
            print(f"[prefopt] the model code of {path} imports {module}.{name}, a docstring transformers "
                  f"{transformers.__version__} no longer has: given as an empty string (only the docs change)",
                  flush=True)


def load_reward_model(path: str, trust_remote_code: bool = False, num_labels: int | None = 1, dtype=None,
                      complete: bool = False):
    """A sequence classifier whose output is the scalar reward (`num_labels`: None keeps the checkpoint's).

    `complete=False` (training, a value model): a causal LM folder gets a new, random score head on purpose.
    `complete=True` (scoring): every weight must come from the checkpoint; a missing or reshaped tensor (a base LM
    named as a reward model, a head dropped from the files, a remote-code model read as a plain classifier) would be
    scored with random values, so it is a one-line error naming the checkpoint and the tensors. The pad id is then
    left as the checkpoint has it: `scoring.scorer.score_texts` chooses one per batch."""
    from transformers import AutoModelForSequenceClassification

    check_model_path(path)
    kw = {"num_labels": num_labels} if num_labels is not None else {}
    with hub_errors(path):
        kw.update(attention_kwargs(path, trust_remote_code))
        if dtype is not None:
            kw["dtype"] = dtype
        model, info = _from_pretrained(AutoModelForSequenceClassification, path, trust_remote_code,
                                       output_loading_info=True, **kw)
    if complete:
        absent = sorted(info["missing_keys"]) + sorted(k[0] if isinstance(k, tuple) else k
                                                       for k in info["mismatched_keys"])
        if absent:
            from prefopt.config import ConfigError

            shown = ", ".join(absent[:6]) + (f" and {len(absent) - 6} more" if len(absent) > 6 else "")
            raise ConfigError(f"the reward model {path} has no weights in its checkpoint for {shown} "
                              f"({type(model).__name__} would score with them randomly initialised): name a "
                              "checkpoint that holds its reward head")
        return model
    if model.config.pad_token_id is None:
        tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model.config.pad_token_id = tok.pad_token_id
    return model


def build_tokenizer(texts: Iterable[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (digits split one per token, as Llama does) with pad/bos/eos and a chat
    template, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<s>")
    # The BOS token starts every sequence, as in Llama; EOS is appended by the stages that need it.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(tokenizer, hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=256, max_position_embeddings=256):
    """A small Llama from a config (random init: seed first)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(config)


REWARD_META = "reward_model.json"  # how a reward model prefopt saved reads its input (prefopt.scoring.likelihood)


def write_classifier_meta(folder: str | Path) -> None:
    """Mark a sequence classifier prefopt saves (`save_model`): it was trained on the policy's rendered prompt
    text, so `rm_format: auto` keeps giving it that. Hub reward models carry no `reward_model.json`."""
    import json

    (Path(folder) / REWARD_META).write_text(json.dumps(
        {"kind": "classifier", "input": "policy",
         "reward": "the head's logit at the last token of rendered prompt + response + EOS (prefopt.scoring.scorer)"},
        indent=2) + "\n")


def save_model(model, tokenizer, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """save_pretrained both (safetensors), atomically: written to a temporary folder, then renamed. `state_dict`:
    the weights to write when `model`'s own are shards (`full_state_dict`); None reads them from `model`.

    A sequence classifier (the `reward` stage's) also gets `reward_model.json`: it says prefopt trained it on the
    policy's rendered text, which `score.rm_format: auto` reads to tell it from a hub reward model."""
    import os
    import shutil

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if type(model).__name__.endswith("ForSequenceClassification"):
        write_classifier_meta(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def sharded_weights(accelerator) -> str | None:
    """What shards each prepared model's weights over the processes ("FSDP", "DeepSpeed ZeRO-3"), or None when
    every process holds them whole (one process, DDP, ZeRO-1/2)."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.FSDP:
        return "FSDP"
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and plugin.zero_stage == 3:
            return "DeepSpeed ZeRO-3"
    return None


def place_frozen(accelerator, model, shard: bool, key: str):
    """A frozen model (a reference, a reward model) placed for this launch, never registered with the accelerator
    (so `save_state` never writes it; it is reloaded from its checkpoint). With `shard` where the launch shards
    weights: under FSDP2 by accelerate's own wrapping (per transformer layer, as the trained models), under ZeRO-3
    by TRL's inference engine (as TRL's DPOTrainer builds its reference). Otherwise a whole copy on this process's
    device. `key`: the config key a sharding failure names."""
    kind = sharded_weights(accelerator) if shard else None
    if kind == "DeepSpeed ZeRO-3":  # not run here: DeepSpeed is not installed on the test machines
        from trl.models.utils import prepare_deepspeed

        return prepare_deepspeed(model, accelerator)
    if kind == "FSDP" and accelerator.state.fsdp_plugin.fsdp_version == 2:  # FSDP1: a whole copy
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        from prefopt.config import ConfigError

        try:
            return fsdp2_prepare_model(accelerator, model)
        except ValueError as e:  # the config's fsdp_transformer_layer_cls_to_wrap names a class this model lacks
            raise ConfigError(f"{key}: cannot shard {type(model).__name__} with this FSDP config ({e}): use a model "
                              "of the policy's architecture, set the key for a whole copy, or leave "
                              "fsdp_transformer_layer_cls_to_wrap unset") from None
    return model.to(accelerator.device)


def full_state_dict(accelerator, model) -> dict | None:
    """The whole weights of a prepared model whose processes hold shards of them, gathered onto every process's
    CPU (collective: every process must call it, or the gather waits forever); None when each process already
    holds them whole, and `save_pretrained` reads the model itself.

    The gathered dict holds a tied weight twice (lm_head beside embed_tokens, as separate tensors, so
    `save_pretrained` cannot see they are one): only the source is kept, as an unsharded save does."""
    if sharded_weights(accelerator) is None:
        return None
    state = accelerator.get_state_dict(model)
    unwrapped = accelerator.unwrap_model(model)
    tied = getattr(unwrapped, "all_tied_weights_keys", None) or {}
    return {k: v for k, v in state.items() if k not in tied}


def check_lora_mergeable(accelerator, key: str) -> None:
    """LoRA is merged into the base weights before a stage saves its model, which needs the whole weights on one
    process: refused under FSDP and ZeRO-3 before training starts, naming the config key, not after it."""
    from prefopt.config import ConfigError

    kind = sharded_weights(accelerator)
    if kind is not None:
        raise ConfigError(f"{key}: true under {kind}, which shards the weights the LoRA adapter is merged into "
                          "at save time; train without LoRA there, or launch with DDP or DeepSpeed ZeRO-1/2")
