"""Hub reward models that load and score right (issue 22, item 4), on tiny local stand-ins of the real ones.

- ArmoRM (RLHFlow/ArmoRM-Llama3-8B-v0.1): its own `modeling_custom.py` beside the weights, named by `auto_map` in a
  config whose `model_type` is plain `llama`. The stand-in below is written from the public file's behaviour: the
  same imports from transformers (one of them, `LLAMA_INPUTS_DOCSTRING`, is gone in transformers 5), a Llama
  backbone, a regression layer to 19 objectives, a gating network over the hidden state where the assistant turn
  opens, a reward transform matrix, the `CustomOutput(rewards, ..., gating_output, score, logits)` object, and its
  last-token lookup: the token before the FIRST pad id. Its pad id is an added `[PAD]` the tokenizer does not
  declare as its pad token, as the real config's 128256.
- Skywork-Reward (Skywork/Skywork-Reward-Llama-3.1-8B, Skywork-Reward-Gemma-2-27B): plain
  Llama/Gemma2ForSequenceClassification with one label and the family's chat template. transformers reads them at
  the RIGHTMOST token that is not the pad id. The Llama stand-in has no pad token and no pad id (Llama-3's
  tokenizer ships none), so prefopt's stand-in pad is EOS = `<|eot_id|>`, the token that ends every text.

Every score is checked against the model's own forward on the text alone (no padding, the config as saved). Where
the scorer used to go wrong (the Llama-3 tokenizers without a pad token), the test also shows that padding with EOS,
as it did, misses that figure by more than 1e-3 on every affected row, so the check is not vacuous. Against the code
before this fix 8 of these 10 tests fail; the Gemma-2 one (a real pad token) and the import check pass there too.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from families import GEMMA_TEMPLATE
from test_remote_code_rm import LLAMA3_TEMPLATE, user

from prefopt.config import ConfigError
from prefopt.scoring import scorer as score_module

# Skywork-Reward-Llama-3.1-8B ships Llama-3.1-Instruct's template: a system turn with the knowledge/today dates is
# always written. Reduced to chats without tools; renders what the original renders for system/user/assistant.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content']|trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}{{- 'Cutting Knowledge Date: December 2023\n' }}"
    "{{- 'Today Date: ' + date_string + '\n\n' }}{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
GEMMA2_TEMPLATE = GEMMA_TEMPLATE  # gemma-2-27b-it's, as Skywork-Reward-Gemma-2-27B ships it
TEXTS = ["system user assistant model Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024",
         "Sort the numbers in ascending order: 9 8 7 6 5 4 3 2 1 0. The answer is 0 1 2 3 4 5 6 7 8 9.",
         "Say hello. hello there, how can I help you today? Helpfulness, correctness, verbosity."] * 10

# What RLHFlow/ArmoRM-Llama3-8B-v0.1's modeling_custom.py imports from transformers, name for name.
ARMORM_IMPORTS = {("transformers", "LlamaModel"), ("transformers", "LlamaPreTrainedModel"),
                  ("transformers.models.llama.modeling_llama", "LLAMA_INPUTS_DOCSTRING"),
                  ("transformers.utils", "ModelOutput"),
                  ("transformers.utils", "add_start_docstrings_to_model_forward")}

ARMORM_MODELING = '''"""A tiny stand-in for RLHFlow/ArmoRM-Llama3-8B-v0.1's modeling_custom.py (prefopt's tests): the
same imports, modules, output object and last-token lookup."""

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING
from transformers.utils import ModelOutput
from transformers.utils import add_start_docstrings_to_model_forward


class GatingNetwork(nn.Module):
    """ReLU MLP from the prompt's hidden state to a softmax over the objectives (at a temperature), scaled."""

    def __init__(self, in_features, out_features, bias=True, temperature=10, logit_scale=1.0, hidden_dim=1024,
                 n_hidden=3):
        super().__init__()
        self.temperature = temperature
        self.logit_scale = nn.Parameter(torch.ones(1) * logit_scale)
        sizes = [in_features] + [hidden_dim] * n_hidden
        layers = [nn.Linear(a, b) for a, b in zip(sizes, sizes[1:])]
        self.layers = nn.ModuleList(layers + [nn.Linear(sizes[-1], out_features, bias=bias)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        x = F.softmax(self.layers[-1](x) / self.temperature, dim=1)
        return x * self.logit_scale[0]


# The ids of "<|eot_id|><|start_header_id|>assistant<|end_header_id|>" in this vocabulary (the original hard-codes
# the Llama-3 ids of that and the "\\n\\n" after it): where the prompt ends and the assistant's turn opens.
token_pattern = __TOKEN_PATTERN__


def find_token_for_gating(lst):
    n = len(token_pattern)
    for j in range(len(lst) - n, -1, -1):
        if lst[j:j + n] == token_pattern:
            return j
    raise ValueError("Token pattern not found in the list.")


@dataclass
class CustomOutput(ModelOutput):
    rewards: torch.FloatTensor = None
    hidden_state: Optional[Tuple[torch.FloatTensor, ...]] = None
    prompt_embedding: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class LlamaForRewardModelWithGating(LlamaPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.model = LlamaModel(config)
        config_dict = config.to_dict()
        self.num_objectives = config_dict.get("num_objectives", 19)
        self.regression_layer = nn.Linear(config.hidden_size, self.num_objectives, bias=False)
        self.post_init()
        eye = torch.zeros(self.num_objectives, self.num_objectives)
        eye[range(self.num_objectives), range(self.num_objectives)] = 1.0
        self.reward_transform_matrix = nn.Parameter(eye)
        self.reward_transform_matrix.requires_grad = False
        self.gating = GatingNetwork(config.hidden_size, config.num_objectives,
                                    temperature=config_dict.get("gating_temperature", 10),
                                    hidden_dim=config_dict.get("gating_hidden_dim", 1024),
                                    n_hidden=config_dict.get("gating_n_hidden", 3))

    @add_start_docstrings_to_model_forward(LLAMA_INPUTS_DOCSTRING)
    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        return_dict = return_dict if return_dict is not None else self.config.use_return_dict
        transformer_outputs = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                         use_cache=use_cache, output_attentions=output_attentions,
                                         output_hidden_states=output_hidden_states, return_dict=return_dict)
        tokens_hidden_states = transformer_outputs[0]
        batch_size = input_ids.shape[0] if input_ids is not None else inputs_embeds.shape[0]
        if self.config.pad_token_id is None and batch_size != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if self.config.pad_token_id is None:
            sequence_lengths = -1
        elif input_ids is not None:
            # the token before the FIRST pad id; no pad id in the row: argmax 0, minus 1, modulo: the last position
            sequence_lengths = torch.eq(input_ids, self.config.pad_token_id).int().argmax(-1) - 1
            sequence_lengths = (sequence_lengths % input_ids.shape[-1]).to(tokens_hidden_states.device)
        else:
            sequence_lengths = -1
        rows = torch.arange(batch_size, device=tokens_hidden_states.device)
        hidden_states = tokens_hidden_states[rows, sequence_lengths]
        rewards = self.regression_layer(hidden_states)
        gating_token_positions = [find_token_for_gating(ids.tolist()) for ids in input_ids]
        prompt_embedding = tokens_hidden_states[rows, gating_token_positions, :]
        gating_output = self.gating(prompt_embedding)
        rewards_adjusted = rewards @ self.reward_transform_matrix
        score = torch.sum(gating_output * rewards_adjusted, dim=1)
        return CustomOutput(rewards=rewards, hidden_state=hidden_states, prompt_embedding=prompt_embedding,
                            gating_output=gating_output, score=score, logits=score)
'''
DOC_IMPORT = "from transformers.models.llama.modeling_llama import LLAMA_INPUTS_DOCSTRING\n"

PROMPTS = [user("Sort the numbers in ascending order.", "3 1 2"), user("Say hello.", ""),
           user("Sort the numbers in ascending order.", "9 8 7 6 5 4 3 2 1 0"), user("Say hello.", ""),
           [{"role": "system", "content": "Helpfulness, correctness."}, *user("Sort the numbers.", "2 0")]]
RESPONSES = ["1 2 3", "hello there, how can I help you today?", "0 1 2 3 4 5 6 7 8 9", "hello", "0 2"]


# ------------------------------------------------------------------------------------------------ stand-ins


def bpe_tokenizer(specials: list[str], bos: str, eos: str, pad: str | None, template: str, extra: str | None = None):
    """A byte-level BPE trained here with the family's special tokens, BOS added as the family adds it; `extra`: a
    token added after training at the end of the vocabulary and not declared as anything (ArmoRM's `[PAD]`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   **({"pad_token": pad} if pad else {}))
    if extra:
        fast.add_tokens([extra], special_tokens=True)
    fast.chat_template = template
    return fast


def llama3_tokenizer(template: str, extra: str | None = None):
    """Llama-3's special tokens, EOS `<|eot_id|>` (the instruct models' end of turn), and no pad token."""
    return bpe_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", None, template, extra)


def llama_config(tok, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256, num_labels=1,
                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, initializer_range=0.2,
                       rope_theta=500000.0, **kw)


def import_file(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def armo(tmp_path_factory) -> SimpleNamespace:
    """The ArmoRM stand-in saved as its hub folder (weights, config.json with `auto_map`, modeling_custom.py, its
    tokenizer and template), and the same model in memory: built from a copy of its code with the docstring import
    written out, so this fixture does not lean on the shim under test."""
    import transformers

    root = tmp_path_factory.mktemp("armo")
    out = root / "armorm_standin"
    out.mkdir()
    tok = llama3_tokenizer(LLAMA3_TEMPLATE, extra="[PAD]")
    pattern = tok("<|eot_id|><|start_header_id|>assistant<|end_header_id|>", add_special_tokens=False)["input_ids"]
    assert pattern[:2] == tok.convert_tokens_to_ids(["<|eot_id|>", "<|start_header_id|>"]) and len(pattern) > 3
    code = ARMORM_MODELING.replace("__TOKEN_PATTERN__", repr(pattern))
    (out / "modeling_custom.py").write_text(code)
    (root / "build_armorm.py").write_text(code.replace(DOC_IMPORT, 'LLAMA_INPUTS_DOCSTRING = ""\n'))
    module = import_file(root / "build_armorm.py", "build_armorm")

    transformers.set_seed(0)
    config = llama_config(tok, pad_token_id=tok.convert_tokens_to_ids("[PAD]"), num_objectives=19,
                          gating_temperature=10, gating_hidden_dim=16, gating_n_hidden=3)
    config.auto_map = {"AutoModelForSequenceClassification": "modeling_custom.LlamaForRewardModelWithGating"}
    model = module.LlamaForRewardModelWithGating(config)
    with torch.no_grad():  # trained values in the real model: a loaded matrix and scale are told from fresh ones
        model.reward_transform_matrix.copy_(torch.randn(19, 19))
        model.gating.logit_scale.fill_(2.5)
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == "llama" and saved["architectures"] == ["LlamaForRewardModelWithGating"]
    assert saved["auto_map"] == config.auto_map and saved["pad_token_id"] == len(tok) - 1
    assert tok.pad_token is None and tok.eos_token == "<|eot_id|>"
    return SimpleNamespace(path=out, model=model, tok=tok, module=module)


def armo_copy(armo, dest: Path, **config) -> Path:
    """The ArmoRM folder under another name (another dynamic module), with config.json keys changed."""
    shutil.copytree(armo.path, dest)
    cfg = json.loads((dest / "config.json").read_text())
    (dest / "config.json").write_text(json.dumps({**cfg, **config}, indent=2))
    return dest


@pytest.fixture(scope="module")
def skywork_llama(tmp_path_factory) -> SimpleNamespace:
    """Skywork-Reward-Llama-3.1 in small: a plain LlamaForSequenceClassification, one label, no pad token in the
    tokenizer and no pad id in the config."""
    import transformers
    from transformers import LlamaForSequenceClassification

    out = tmp_path_factory.mktemp("skywork_llama") / "model"
    tok = llama3_tokenizer(LLAMA31_TEMPLATE)
    transformers.set_seed(1)
    model = LlamaForSequenceClassification(llama_config(tok)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert json.loads((out / "config.json").read_text()).get("pad_token_id") is None and tok.pad_token is None
    return SimpleNamespace(path=out, model=model, tok=tok)


@pytest.fixture(scope="module")
def skywork_gemma(tmp_path_factory) -> SimpleNamespace:
    """Skywork-Reward-Gemma-2-27B in small: Gemma2ForSequenceClassification (eager attention, soft-capping,
    a sliding window shorter than the texts), one label, Gemma's `<pad>` (id 0) as its pad."""
    import transformers
    from transformers import Gemma2Config, Gemma2ForSequenceClassification

    out = tmp_path_factory.mktemp("skywork_gemma") / "model"
    tok = bpe_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                        "<pad>", GEMMA2_TEMPLATE)
    transformers.set_seed(2)
    config = Gemma2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16, intermediate_size=64, max_position_embeddings=256,
                          sliding_window=8, attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                          query_pre_attn_scalar=16, num_labels=1, initializer_range=0.2, pad_token_id=0,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    model = Gemma2ForSequenceClassification(config).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    assert tok.pad_token_id == 0
    return SimpleNamespace(path=out, model=model, tok=tok)


def texts_ids(tok, prompts=PROMPTS, responses=RESPONSES) -> list[list[int]]:
    """Each (messages, response) in the model's own template, as its model card tokenizes it (the template writes
    BOS)."""
    return [tok(tok.apply_chat_template([*m, {"role": "assistant", "content": r}], tokenize=False),
                add_special_tokens=False)["input_ids"] for m, r in zip(prompts, responses)]


def alone(model, rows: list[list[int]], field: str = "logits") -> list[float]:
    """The model's own score of each row by itself: one unpadded forward each, its config as saved."""
    with torch.no_grad():
        return [getattr(model(input_ids=torch.tensor([r])), field).reshape(-1)[0].item() for r in rows]


def padded_with(model, rows: list[list[int]], pad: int, field: str = "logits") -> list[float]:
    """Scores of one right-padded batch, padded with `pad` (how the scorer used to pad: the tokenizer's pad)."""
    T = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows])
    with torch.no_grad():
        return getattr(model(input_ids=ids, attention_mask=mask), field).reshape(-1).tolist()


# ------------------------------------------------------------------------------------------------ ArmoRM


def test_armorm_standin_imports_what_armorm_imports_and_transformers_5_alone_cannot_load_it(armo, tmp_path,
                                                                                            monkeypatch):
    import transformers
    import transformers.models.llama.modeling_llama as modeling_llama
    from transformers import AutoModelForSequenceClassification

    tree = ast.parse((armo.path / "modeling_custom.py").read_text())
    imported = {(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                and n.module.startswith("transformers") for a in n.names}
    assert imported == ARMORM_IMPORTS
    # The bug as a user meets it: transformers 5 has no LLAMA_INPUTS_DOCSTRING (the shim, if a test before this one
    # ran it, is taken off for this test; a fresh folder name is a fresh dynamic module).
    monkeypatch.delattr(modeling_llama, "LLAMA_INPUTS_DOCSTRING", raising=False)
    fresh = armo_copy(armo, tmp_path / "armorm_plain")
    with pytest.raises(ImportError, match="cannot import name 'LLAMA_INPUTS_DOCSTRING' from "
                                          "'transformers.models.llama.modeling_llama'"):
        AutoModelForSequenceClassification.from_pretrained(fresh, trust_remote_code=True)
    assert transformers.__version__.startswith("5.")


def test_armorm_loads_with_the_docstring_shim_and_batched_scores_equal_alone(armo, capsys):
    """Transformers 5 loads it (LLAMA_INPUTS_DOCSTRING given as ""), the reward is the `score` field, and a batch of
    texts of different lengths scores each text as the model scores it alone. The tokenizer has no pad token, so
    the scorer used to pad with EOS, which ArmoRM's lookup (the first `[PAD]`) never finds: shorter rows were read
    at the batch's last position, a padding token."""
    scorer = score_module.load_scorer(str(armo.path), trust_remote_code=True)
    assert "LLAMA_INPUTS_DOCSTRING" in capsys.readouterr().out
    model, tok = scorer.model, scorer.tokenizer
    assert type(model).__name__ == "LlamaForRewardModelWithGating"
    assert type(model).__module__.startswith("transformers_modules")
    assert tok.pad_token == "<|eot_id|>"  # prefopt's stand-in pad: EOS
    torch.testing.assert_close(model.reward_transform_matrix, armo.model.reward_transform_matrix)

    rows = texts_ids(armo.tok)
    want = alone(armo.model, rows, "score")
    assert all(r[-1] == tok.eos_token_id for r in rows) and len(set(map(len, rows))) == len(rows)
    for batch_size in (4, 2, 1):
        got = scorer.score(PROMPTS, RESPONSES, batch_size=batch_size, max_length=256)
        assert got == pytest.approx(want, abs=1e-5)
    assert len({round(s, 5) for s in want[:3]}) == 3

    with torch.no_grad():
        out = armo.model(input_ids=torch.tensor([rows[0]]))
    assert out.rewards.shape == (1, 19) and out.score.shape == (1,)
    assert out.gating_output.sum().item() == pytest.approx(2.5, abs=1e-5)  # softmax times the loaded logit_scale
    assert abs(want[0] - out.rewards[0, 0].item()) > 1e-3  # the score, not the first objective
    # Not vacuous: padded with EOS (as before), every row shorter than the longest is read at a padding token.
    old = padded_with(armo.model, rows, tok.eos_token_id, "score")
    longest = max(range(len(rows)), key=lambda i: len(rows[i]))
    assert old[longest] == pytest.approx(want[longest], abs=1e-5)
    assert all(abs(o - w) > 1e-3 for i, (o, w) in enumerate(zip(old, want)) if i != longest)


def test_armorm_without_a_pad_id_reads_the_last_token(armo, tmp_path):
    """A config with no pad id: alone, the model reads the last position. The scorer used to give it the
    tokenizer's pad (EOS) as its pad id, and ArmoRM's lookup then read the token before the FIRST `<|eot_id|>`,
    the end of the user's turn, for every text, batched or not."""
    folder = armo_copy(armo, tmp_path / "armorm_nopad", pad_token_id=None)
    scorer = score_module.load_scorer(str(folder), trust_remote_code=True)
    assert scorer.model.config.pad_token_id is None
    rows = texts_ids(armo.tok)
    armo.model.config.pad_token_id = None
    try:
        want = alone(armo.model, rows, "score")
        armo.model.config.pad_token_id = armo.tok.eos_token_id
        old = alone(armo.model, rows, "score")
    finally:
        armo.model.config.pad_token_id = len(armo.tok) - 1
    got = scorer.score(PROMPTS, RESPONSES, batch_size=3, max_length=256)
    assert got == pytest.approx(want, abs=1e-5)
    assert scorer.model.config.pad_token_id is None  # the pad id is set for each forward only
    assert all(abs(o - w) > 1e-3 for o, w in zip(old, want))


def test_untrusted_armorm_is_a_config_error_naming_the_stage_key(armo):
    """Its config's model_type is `llama`, so transformers itself loads it, untrusted, as a plain
    LlamaForSequenceClassification with a new random `score` head and no warning a user would act on."""
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(armo.path, output_loading_info=True)
    assert type(model).__name__ == "LlamaForSequenceClassification" and "score.weight" in info["missing_keys"]
    for key in ("score.trust_remote_code", "ppo.trust_remote_code", "evaluate.trust_remote_code"):
        with pytest.raises(ConfigError, match=rf"ships its own model code \(auto_map in its config.json\): set "
                                              rf"{key}: true"):
            score_module.load_scorer(str(armo.path), key=key)


def test_a_removed_name_that_is_not_a_docstring_is_one_line_naming_it(armo, tmp_path):
    folder = armo_copy(armo, tmp_path / "armorm_flash")
    code = (folder / "modeling_custom.py").read_text()
    (folder / "modeling_custom.py").write_text(code.replace(
        DOC_IMPORT, DOC_IMPORT + "from transformers.models.llama.modeling_llama import LlamaFlashAttention2\n"))
    with pytest.raises(ConfigError) as e:
        score_module.load_scorer(str(folder), trust_remote_code=True)
    msg = str(e.value)
    assert "\n" not in msg and str(folder) in msg and "imports LlamaFlashAttention2 from " \
        "transformers.models.llama.modeling_llama, which transformers 5." in msg


# ------------------------------------------------------------------------------------------------ Skywork


@pytest.mark.parametrize("fmt", ["chat", "policy"])
def test_skywork_llama_batched_scores_equal_alone_with_eos_as_pad(skywork_llama, fmt):
    """No pad token, no pad id, every text ending in EOS (`<|eot_id|>`: the template's end of turn, or the EOS
    `reward_text` appends). Alone, transformers reads such a text at its last token; padded with EOS and told EOS
    is the pad id (as the scorer used to), it reads the rightmost token that is not EOS: the one before."""
    m, tok = skywork_llama.model, skywork_llama.tok
    scorer = score_module.load_scorer(str(skywork_llama.path))
    assert type(scorer.model).__name__ == "LlamaForSequenceClassification"
    assert scorer.tokenizer.pad_token == "<|eot_id|>"
    if fmt == "chat":
        prompts, rows = PROMPTS, texts_ids(tok)
    else:
        prompts = [f"### Instruction:\n{p[-1]['content']}\n\n### Response:\n" for p in PROMPTS]
        rows = [tok(score_module.reward_text(p, r, tok.eos_token))["input_ids"] for p, r in zip(prompts, RESPONSES)]
    assert all(r[-1] == tok.eos_token_id and r[0] == tok.bos_token_id for r in rows)
    want = alone(m, rows)
    with torch.no_grad():  # the last token's hidden state through the head
        last = [m.score(m.model(input_ids=torch.tensor([r])).last_hidden_state[0, -1]).item() for r in rows]
    assert want == pytest.approx(last, abs=1e-5)
    for batch_size in (5, 2):
        assert scorer.score(prompts, RESPONSES, batch_size=batch_size, max_length=256) == pytest.approx(want, abs=1e-5)
    m.config.pad_token_id = tok.eos_token_id
    try:
        old = padded_with(m, rows, tok.eos_token_id)
    finally:
        m.config.pad_token_id = None
    assert all(abs(o - w) > 1e-3 for o, w in zip(old, want))


def test_skywork_gemma2_batched_scores_equal_alone(skywork_gemma):
    scorer = score_module.load_scorer(str(skywork_gemma.path))
    assert type(scorer.model).__name__ == "Gemma2ForSequenceClassification"
    assert score_module.rm_input_format("auto", str(skywork_gemma.path), "score.rm_format") == "chat"
    rows = texts_ids(skywork_gemma.tok, PROMPTS[:4], RESPONSES[:4])  # Gemma-2's template has no system role
    assert max(map(len, rows)) > 8 and all(r.count(skywork_gemma.tok.bos_token_id) == 1 for r in rows)
    want = alone(scorer.model, rows)  # the model as loaded: eager, its soft-cap applied (5.17 alone picks SDPA)
    for batch_size in (4, 3):
        got = scorer.score(PROMPTS[:4], RESPONSES[:4], batch_size=batch_size, max_length=256)
        assert got == pytest.approx(want, abs=1e-5)
    assert len({round(s, 5) for s in want[:3]}) == 3


# ------------------------------------------------------------------------------------------------ missing heads


def test_a_reward_model_without_its_head_weights_is_refused(skywork_llama, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from prefopt.models.loading import load_reward_model

    headless = tmp_path / "headless"
    shutil.copytree(skywork_llama.path, headless)
    weights = load_file(headless / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "score.weight"}, headless / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        score_module.load_scorer(str(headless))
    assert "\n" not in str(e.value) and str(headless) in str(e.value) and "for score.weight (" in str(e.value)

    # A base causal LM whose config does not say so (no `architectures`): loaded as a classifier, its head is new.
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "architectures"}))
    (base / "reward_model.json").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match=rf"the reward model {base} has no weights in its checkpoint for "
                                          r"score.weight \(LlamaForSequenceClassification would score"):
        score_module.load_scorer(str(base))

    # The `reward` stage starts from that same causal LM on purpose: its new head is what training learns.
    model = load_reward_model(str(base))
    assert model.score.weight.shape == (1, 32) and model.config.pad_token_id is not None


# ------------------------------------------------------------------------------------------------ the evaluate stage


EVAL_ROWS = [{"instruction": "Sort the numbers in ascending order.", "input": "3 1 2"},
             {"instruction": "Say hello.", "input": ""}]


def evaluate_config(tmp_path: Path, policy: Path, rm: Path, trust: bool):
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in EVAL_ROWS))
    return from_dict(ExperimentConfig, {
        "name": "hub", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "task": {"name": "none"},
        "stages": ["evaluate"],
        "evaluate": {"policies": {"sft": str(policy)}, "reward_model": str(rm), "trust_remote_code": trust,
                     "prompts": {"path": str(prompts)}, "samples_per_prompt": 2, "max_new_tokens": 6,
                     "backend": "transformers", "task": "none", "rm_max_length": 256}})


def test_evaluate_passes_trust_remote_code_to_armorm(armo, tiny_model_dir, tmp_path, monkeypatch):
    """Off: a config error naming evaluate.trust_remote_code before any policy is sampled. On: each sample's `rm`
    is ArmoRM's score of (the user's prompt, the response) in its own template, as the model scores it alone."""
    from prefopt.evaluate import recipe
    from prefopt.stage import run_stage

    sampled = []
    real_sample = recipe.sample_policy
    monkeypatch.setattr(recipe, "sample_policy", lambda *a, **k: sampled.append(a[0]) or real_sample(*a, **k))
    with pytest.raises(ConfigError, match="set evaluate.trust_remote_code: true"):
        run_stage(evaluate_config(tmp_path / "off", tiny_model_dir, armo.path, trust=False), "evaluate")
    assert sampled == []

    cfg = evaluate_config(tmp_path / "on", tiny_model_dir, armo.path, trust=True)
    summary = run_stage(cfg, "evaluate")
    assert sampled == ["sft"]
    samples = [json.loads(x) for x in (cfg.root / "evaluate" / "samples_sft.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    prompts = [user(r["instruction"], r["input"]) for r in EVAL_ROWS for _ in range(2)]  # in order, 2 samples each
    want = alone(armo.model, texts_ids(armo.tok, prompts, [s["response"] for s in samples]), "score")
    assert [s["rm"] for s in samples] == pytest.approx(want, abs=1e-5)
    assert summary["policies"]["sft"]["rm_score"] == pytest.approx(sum(want) / len(want), abs=1e-5)
