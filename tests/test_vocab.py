"""Vocabulary extension (`models/vocab.py`, `base.extend_vocab`): new BPE tokens learned from Chinese Alpaca text
on every family's tokenizer, appended after the tokenizer's own merges, so what it already tokenized keeps its ids;
and the `base` stage extending a named model whose extended copy the `sft` stage then continues to pretrain on
`text` rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SHARED_DATA
from families import FAMILIES, build_tokenizer, save_family

CHINESE = SHARED_DATA / "alpaca-chinese-dataset" / "data_v3_alpaca_chinese_part_0.json"
ENGLISH = ["Sort the numbers in ascending order: 3 1 2 7 5. The answer is 1 2 3 5 7.",
           "Write a response that appropriately completes the request. Hello there!"]


def chinese_texts():
    rows = json.loads(CHINESE.read_text(encoding="utf-8"))
    return [r["zh_instruction"] + r["zh_input"] + r["zh_output"] for r in rows]


@pytest.mark.shared_data
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_learned_tokens_shorten_new_text_and_leave_old_text_as_it_was(family, tmp_path):
    from prefopt.models.vocab import learn_merges

    fam = FAMILIES[family]
    tok = build_tokenizer(fam)
    texts = chinese_texts()
    train, held = texts[:800], texts[800:]
    before = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in held)
    old_ids = [tok(t)["input_ids"] for t in ENGLISH]
    chat = [{"role": "user", "content": "排序 3 1 2"}]
    old_chat = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    new, learned = learn_merges(tok, train, 300, tmp_path / "tok")
    assert len(learned) == 300 and len(new) == len(tok) + 300
    after = sum(len(new(t, add_special_tokens=False)["input_ids"]) for t in held)
    assert after < 0.75 * before, (before, after)  # measured x0.53 on the qwen2.5 tokenizer
    assert [new(t)["input_ids"] for t in ENGLISH] == old_ids  # every old merge still wins
    assert all(new.decode(new(t, add_special_tokens=False)["input_ids"]) == t for t in held[:50])
    assert new.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == old_chat
    assert (new.bos_token, new.eos_token, new.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert max(new.get_vocab().values()) == len(new) - 1  # the ids the grown embedding rows will cover


@pytest.mark.shared_data
def test_base_stage_extends_a_named_model_and_sft_continues_pretraining_it(tmp_path):
    """`base.model` + `base.extend_vocab`: the stage saves the extended model (new embedding rows at the mean of the
    old ones, old rows untouched) and `stage:base` names it; an `sft` stage on Chinese `text` rows trains from it."""
    from prefopt.experiment import load_config, resolve
    from prefopt.models.loading import load_causal_lm, load_tokenizer
    from prefopt.stage import run_stage

    model_dir = save_family(FAMILIES["qwen2.5"], tmp_path / "qwen", attn="sdpa", hidden_size=32, layers=1)
    texts = chinese_texts()
    data = tmp_path / "zh.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts[:300]),
                    encoding="utf-8")
    cfg = {"name": "zh", "output_dir": str(tmp_path / "runs"), "wandb": {"mode": "disabled"},
           "stages": ["base", "sft"],
           "base": {"model": str(model_dir), "extend_vocab": 200, "tokenizer_data": [str(data)]},
           "sft": {"model": "stage:base", "dataset": {"path": str(data)}, "max_steps": 4, "max_length": 64,
                   "per_device_train_batch_size": 8, "learning_rate": 1e-3, "logging_steps": 1}}
    path = tmp_path / "zh.yaml"
    path.write_text(json.dumps(cfg))
    exp = load_config(str(path))
    summary = run_stage(exp, "base")
    root = tmp_path / "runs" / "zh"
    assert resolve(exp, "stage:base") == str(root / "base" / "model")
    assert summary["tokens_learned"] == 200 and summary["rows_added"] == 200
    assert summary["held_out_token_ratio"] < 0.8
    old = load_causal_lm(str(model_dir)).get_input_embeddings().weight
    grown = load_causal_lm(str(root / "base" / "model")).get_input_embeddings().weight
    n = old.shape[0]
    assert grown.shape[0] == n + 200 == len(load_tokenizer(str(root / "base" / "model")))
    torch.testing.assert_close(grown[:n], old)
    torch.testing.assert_close(grown[n:], old.mean(0, keepdim=True).expand(200, -1))

    sft = run_stage(exp, "sft")
    assert sft["steps"] == 4 and sft["dataset"]["rows"] == 300
    assert len(load_tokenizer(str(root / "sft" / "model"))) == n + 200


def test_extension_keys_name_what_they_need():
    from prefopt.config import ConfigError
    from prefopt.experiment import load_config

    with pytest.raises(ConfigError, match=r"base\.extend_vocab.*base\.model"):
        load_config("experiments/quickstart.yaml", ["--base.extend_vocab=100"])
    with pytest.raises(ConfigError, match=r"base\.new_tokens.*base\.model"):
        load_config("experiments/quickstart.yaml", ["--base.new_tokens=[排序]"])
    with pytest.raises(ConfigError, match=r"base\.pretrain_steps.*sft stage on `text` rows"):
        load_config("experiments/quickstart.yaml", ["--base.model=Qwen/Qwen2.5-0.5B", "--base.pretrain_steps=10"])


def sentencepiece_bpe():
    """A tokenizer laid out as Llama-2's and Gemma's are (SentencePiece BPE converted by transformers: `▁` for
    spaces, characters as symbols, byte fallback for the rest), trained on English only."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(ENGLISH * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                               show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.shared_data
def test_a_sentencepiece_style_bpe_gets_the_new_scripts_characters_with_its_merges(tmp_path):
    from prefopt.models.vocab import learn_merges

    tok = sentencepiece_bpe()
    texts = chinese_texts()
    held = texts[800:]
    before = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in held)  # byte fallback: 3 per char
    old_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in ENGLISH]
    new, learned = learn_merges(tok, texts[:800], 300, tmp_path / "tok")
    assert len(learned) == 300 and any(len(t) == 1 for t in learned)  # characters, then merges of them
    after = sum(len(new(t, add_special_tokens=False)["input_ids"]) for t in held)
    assert after < 0.75 * before, (before, after)  # measured x0.67 (300 entries: characters, then merges)
    assert [new(t, add_special_tokens=False)["input_ids"] for t in ENGLISH] == old_ids
    assert all(new.decode(new(t, add_special_tokens=False)["input_ids"]) == t for t in held[:50])


def test_check_names_a_missing_tokenizer_data_file():
    from prefopt.checks import problems_and_warnings
    from prefopt.experiment import load_config

    cfg = load_config("experiments/quickstart.yaml", ["--base.model=Qwen/Qwen2.5-0.5B", "--base.extend_vocab=100",
                                                      "--base.tokenizer_data=[/nowhere/zh.jsonl]"])
    assert any(w.startswith("base.tokenizer_data[0]: file '/nowhere/zh.jsonl' does not exist")
               for w in problems_and_warnings(cfg)[1])


def test_a_tokenizer_without_bpe_merges_is_named(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prefopt.models.vocab import VocabError, learn_merges

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.Whitespace()
    wp.train_from_iterator(ENGLISH * 5, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]"],
                                                                 show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=wp, unk_token="[UNK]")
    with pytest.raises(VocabError, match="learns BPE merges, but this tokenizer's model is WordPiece"):
        learn_merges(tok, ["排序 排序"], 10, tmp_path / "tok")
    # text the tokenizer already merges its own way adds nothing: a fresh BPE on it learns merges ('S'+'o', ...)
    # that the old merges pre-empt, so their tokens would never be emitted, and they are dropped
    from families import FAMILIES, build_tokenizer

    bpe = build_tokenizer(FAMILIES["llama3"])
    same, learned = learn_merges(bpe, ["Sort the numbers"] * 3, 10, tmp_path / "bpe")
    assert learned == [] and len(same) == len(bpe)


def test_extension_with_no_text_is_a_data_error(tmp_path):
    from prefopt.data.errors import DataError
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    model_dir = save_family(FAMILIES["qwen2.5"], tmp_path / "qwen", attn="sdpa", hidden_size=32, layers=1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    exp = load_config("experiments/quickstart.yaml", [f"--output_dir={tmp_path}", "--wandb.mode=disabled",
                                                      f"--base.model={model_dir}", "--base.extend_vocab=10",
                                                      f"--base.tokenizer_data=[{empty}]"])
    with pytest.raises(DataError, match="no text to learn base.extend_vocab's tokens from"):
        run_stage(exp, "base")
