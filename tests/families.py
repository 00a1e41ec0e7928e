"""Tiny random-init instances of the model families users bring, built from their transformers config classes.

Each family keeps what makes it different at full size: its attention kinds (GQA, Gemma-2's eager-only attention
with logit soft-capping, sliding windows, tied embeddings, Qwen's ChatML without BOS, Phi-3's fused projections),
its real chat template (the public template, written here as a fixture) and its special tokens, carried by a
byte-level BPE tokenizer trained here (no downloads). Sizes are tiny, but every window is smaller than the test
sequences so the sliding-window layers really slide.

`prefopt.models.architectures.CHECKED` says what the conformance suite (tests/test_architectures.py) checks for each
family; `test_every_checked_family_is_built_here` keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

WINDOW = 8  # sliding window of the tiny models: shorter than the test pairs, so it is exercised

# Public chat templates (Hub tokenizer_config.json of each instruct model), reduced to the parts a chat without
# tools uses. Each renders exactly what its original renders for system/user/assistant turns.
LLAMA3_TEMPLATE = (  # meta-llama/Meta-Llama-3-8B-Instruct
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # google/gemma-2-9b-it (gemma-3 renders the same turns)
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
QWEN_TEMPLATE = (  # Qwen/Qwen2.5-7B-Instruct, without the tools branch
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
MISTRAL_TEMPLATE = (  # mistralai/Mistral-7B-Instruct-v0.1
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% endif %}{% endfor %}"
)
PHI3_TEMPLATE = (  # microsoft/Phi-3-mini-4k-instruct
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + "
    "'<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One model family: its transformers config class and tiny settings, tokens and chat template."""

    name: str            # as `prefopt.models.architectures.CHECKED` and the README table name it
    model_type: str      # config.model_type
    config_class: str    # transformers config class
    config: dict         # tiny settings; the family's own switches (soft-capping, windows, layer types) kept
    bos: str | None      # the BOS token the tokenizer adds (None: the family uses none)
    eos: str
    pad: str | None      # None: the family ships no pad token (prefopt pads with EOS)
    specials: tuple[str, ...]
    template: str
    attn: tuple[str, ...]  # attention implementations the family supports in transformers
    extra: dict = field(default_factory=dict)


FAMILIES = {
    f.name: f for f in [
        Family("llama3", "llama", "LlamaConfig",
               dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False),
               "<|begin_of_text|>", "<|eot_id|>", None,
               ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
               LLAMA3_TEMPLATE, ("eager", "sdpa")),
        Family("gemma2", "gemma2", "Gemma2Config",
               dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                    attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16,
                    tie_word_embeddings=True),
               "<bos>", "<eos>", "<pad>", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
               GEMMA_TEMPLATE, ("eager",)),
        Family("qwen2.5", "qwen2", "Qwen2Config",
               dict(num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
                    max_window_layers=1, tie_word_embeddings=True),
               None, "<|im_end|>", "<|endoftext|>", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
               QWEN_TEMPLATE, ("eager", "sdpa")),
        Family("mistral", "mistral", "MistralConfig",
               dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=WINDOW, tie_word_embeddings=False),
               "<s>", "</s>", None, ("<unk>", "<s>", "</s>"), MISTRAL_TEMPLATE, ("eager", "sdpa")),
        Family("phi3", "phi3", "Phi3Config",
               dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=WINDOW, tie_word_embeddings=False),
               "<s>", "<|endoftext|>", "<|endoftext|>",
               ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
               PHI3_TEMPLATE, ("eager", "sdpa")),
        Family("gemma3", "gemma3_text", "Gemma3TextConfig",
               dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                    query_pre_attn_scalar=16, tie_word_embeddings=True,
                    layer_types=["sliding_attention", "full_attention"]),
               "<bos>", "<eos>", "<pad>", ("<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"),
               GEMMA_TEMPLATE, ("eager", "sdpa")),
    ]
}

TEXTS = [
    "Sort the numbers in ascending order: 3 1 2 7 5. The answer is 1 2 3 5 7.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9",
    "Write a response that appropriately completes the request. Hello there, how can I help you today?",
    "system user assistant model You are a helpful assistant. [INST] [/INST]",
] * 10


def build_tokenizer(fam: Family, vocab_size: int = 400):
    """A byte-level BPE trained here carrying the family's special tokens, BOS added as the family adds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in fam.specials else None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(fam.specials),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    if fam.bos:
        bos_id = tok.token_to_id(fam.bos)
        tok.post_processor = processors.TemplateProcessing(single=f"{fam.bos} $A", pair=f"{fam.bos} $A {fam.bos} $B",
                                                           special_tokens=[(fam.bos, bos_id)])
    kw = {"bos_token": fam.bos, "eos_token": fam.eos}
    if fam.pad:
        kw["pad_token"] = fam.pad
    if "<unk>" in fam.specials:
        kw["unk_token"] = "<unk>"
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = fam.template
    return fast


def build_model(fam: Family, tokenizer, attn: str = "eager", hidden_size: int = 64, layers: int = 2, seed: int = 0):
    """The family's causal LM at tiny size, random init (seeded), fp32, dropout off."""
    import transformers

    transformers.set_seed(seed)
    cls = getattr(transformers, fam.config_class)
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
              num_hidden_layers=layers, max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id,
              pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
              attention_dropout=0.0, initializer_range=0.3)
    kw.update(fam.config)
    if "layer_types" in kw:
        kw["layer_types"] = (kw["layer_types"] * layers)[:layers]
    config = cls(**kw)
    config._attn_implementation = attn
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float().eval()


def save_family(fam: Family, out: Path, attn: str = "eager", **kw) -> Path:
    """Build and save the family's tiny model and tokenizer as a checkpoint folder (stages read folders)."""
    from prefopt.models.loading import save_model

    tok = build_tokenizer(fam)
    save_model(build_model(fam, tok, attn, **kw), tok, out)
    return out
