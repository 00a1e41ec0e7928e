"""Near-duplicate removal (MinHash LSH over word shingles, confirmed on exact Jaccard) and the language filter, on
hand-made sentences and on real rows from tests/data (English Alpaca demo, Chinese Alpaca translation)."""

from __future__ import annotations

import json

import pytest

from conftest import TEST_DATA
from prefopt.config import ConfigError, from_dict
from prefopt.data.clean import (
    NearDuplicates,
    clean_rows,
    detect_language,
    in_languages,
    jaccard,
    prompt_text,
    row_text,
    shingles,
)
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_preferences, load_sft
from prefopt.data.spec import DatasetSpec
from prefopt.experiment import ExperimentConfig

SENTENCE = ("The committee agreed that our new library on the corner of the main square should open every day from "
            "nine each morning until eight at night during the long summer")  # 30 words, no bigram twice


def test_shingles_by_hand():
    assert shingles("What is 2+2?", 2) == {"what is", "is 2", "2 2"}  # case folded, punctuation dropped
    assert shingles("Hi there", 3) == {"hi there"}  # shorter than n: one shingle
    assert shingles("?!", 2) == set()
    # each CJK character is a word: 三原色是什么 -> 6 words, 5 bigrams
    assert shingles("三原色是什么？", 2) == {"三 原", "原 色", "色 是", "是 什", "什 么"}


def test_one_changed_word_is_a_near_duplicate_at_0_8():
    """30 words, 29 distinct bigrams; changing one word in the middle changes 2 of them: Jaccard = 27 / 31 = 0.871."""
    changed = SENTENCE.replace("library", "museum")
    assert jaccard(shingles(SENTENCE), shingles(changed)) == pytest.approx(27 / 31)
    nd = NearDuplicates(threshold=0.8, ngram=2, num_perm=128)
    assert nd.check_and_add(SENTENCE) is None
    assert nd.check_and_add(changed) == 0  # found, and named: the first text
    # distinct texts are kept, including short ones that differ in a word (different tasks)
    for text in ["Name three fruits.", "Name three rivers.", "Describe a process of making crepes.",
                 "The committee disagreed about the budget for the new sports hall."]:
        assert nd.check_and_add(text) is None
    # at 0.9 the same edit is no longer near enough; with 3-word shingles 3 of 28 change: 25 / 31 = 0.806
    assert NearDuplicates(threshold=0.9).check_and_add(SENTENCE) is None
    strict = NearDuplicates(threshold=0.9)
    strict.check_and_add(SENTENCE)
    assert strict.check_and_add(changed) is None
    assert jaccard(shingles(SENTENCE, 3), shingles(changed, 3)) == pytest.approx(25 / 31)


def test_near_dedup_settings_are_checked():
    with pytest.raises(ValueError, match="threshold"):
        NearDuplicates(threshold=0)
    with pytest.raises(ConfigError, match="near_dedup_ngram"):
        from_dict(ExperimentConfig, {"name": "x", "sft": {"dataset": {"path": "d.json", "near_dedup_ngram": 0}}})


def _with_copies(tmp_path):
    """The 8 real English demo rows, an exact copy of row 1, and row 6 with its last word changed (8 -> 9)."""
    rows = json.loads((TEST_DATA / "alpaca_en_demo.json").read_text())
    near = {**rows[5], "input": rows[5]["input"].replace("Side 3 = 8", "Side 3 = 9")}
    path = tmp_path / "copies.json"
    path.write_text(json.dumps(rows + [rows[0], near]))
    return path, rows


def test_loader_counts_exact_and_near_duplicates_apart(tmp_path):
    path, rows = _with_copies(tmp_path)
    # row 6's prompt: "given the parameters of a triangle find out its perimeter side 1 4 side 2 6 side 3 8",
    # 19 words, 18 distinct bigrams; "3 8" -> "3 9": 17 shared of 19, Jaccard 0.895 on the prompt alone
    a, b = rows[5], {**rows[5], "input": rows[5]["input"].replace("8", "9")}
    assert jaccard(shingles(f"{a['instruction']}\n{a['input']}"), shingles(f"{b['instruction']}\n{b['input']}")) \
        == pytest.approx(17 / 19)
    # with its answer (read the same way) the row shares more: near-dedup reads instruction, input and output
    loaded = load_sft(DatasetSpec(path=str(path)))
    whole = jaccard(shingles(row_text(loaded.rows[5])), shingles(row_text(loaded.rows[9])))
    assert 17 / 19 < whole < 1
    both = load_sft(DatasetSpec(path=str(path), dedup=True, near_dedup=True))
    assert (len(both), both.deduplicated, both.near_duplicates) == (8, 1, 1)
    assert [r["meta"]["instruction"] for r in both.rows] == [r["instruction"] for r in rows]  # first kept, in order
    exact_only = load_sft(DatasetSpec(path=str(path), dedup=True))
    assert (len(exact_only), exact_only.deduplicated, exact_only.near_duplicates) == (9, 1, 0)
    near_only = load_sft(DatasetSpec(path=str(path), near_dedup=True))  # an exact copy is also a near one
    assert (len(near_only), near_only.deduplicated, near_only.near_duplicates) == (8, 0, 2)
    assert near_only.stats()["near_duplicates"] == 2


def test_clean_rows_near_dedup_and_languages():
    rows = [{"prompt": SENTENCE, "completion": "ok"},
            {"prompt": SENTENCE.replace("library", "museum"), "completion": "ok"},  # 28 of 32 bigrams shared
            {"prompt": "三原色是什么？", "completion": "红色、蓝色和黄色。"},
            {"prompt": "What are the three primary colors?", "completion": "Red, blue and yellow."}]
    out, stats = clean_rows(rows, near_dedup=True, languages=["en"])
    assert [r["completion"] for r in out] == ["ok", "Red, blue and yellow."]
    assert (stats["near_duplicates"], stats["other_language"], stats["rows_out"]) == (1, 1, 2)
    out, stats = clean_rows(rows, near_dedup=True, near_dedup_threshold=0.9)
    assert stats["near_duplicates"] == 0 and len(out) == 4
    # the answers count: the same question answered differently is not a near duplicate of the first
    other = [rows[0], {**rows[1], "completion": "closed on Sundays, said the mayor"}]
    assert clean_rows(other, near_dedup=True)[1]["near_duplicates"] == 0


ABSTRACT = ("Abstract: Fine-tuning continuous prompts for target tasks has recently emerged as a compact "
            "alternative to full model fine-tuning. Motivated by these promising results, we investigate the "
            "feasibility of extracting a discrete (textual) interpretation of continuous prompts that is faithful"
            " to the problem they solve. In practice, we observe a \"wayward\" behavior between the task solved by "
            "continuous prompts and their nearest neighbor discrete projections: We can find continuous prompts "
            "that solve a task while being projected to an arbitrary text (e.g., definition of a different or "
            "even a contradictory task), while being within a very small (2%) margin of the best continuous "
            "prompt of the same size for the task. We provide intuitions behind this odd and surprising behavior,"
            " as well as extensive empirical analyses quantifying the effect of various parameters. For instance,"
            " for larger model sizes we observe higher waywardness, i.e, we can find prompts that more closely "
            "map to any arbitrary text with a smaller drop in accuracy. These findings have important "
            "implications relating to the difficulty of faithfully interpreting continuous prompts and their "
            "generalization across models and tasks, providing guidance for future progress in prompting language"
            " models.")


SUMMARY = ("This paper presents an exploration of the \u201cwayward\u201d behavior of discrete (textual) "
           "interpretations of continuous prompts that are typically used to fine-tune tasks. Through "
           "empirical analysis the authors analyze how this waywardness is affected by various parameters "
           "such as model size. The research shows that the waywardness increases with model size and "
           "provides guidance on faithfully interpreting continuous prompts and furthering research on "
           "prompting language models in general.")
LABEL = ("This paper belongs to the label of natural language processing, specifically relating to the "
         "task of interpreting continuous prompts.")


def test_same_input_other_task_is_kept():
    """Two rows of Alpaca's 52K: one long input, two different instructions and outputs. Their prompts alone are
    near duplicates (Jaccard 0.92); with the outputs the rows are not (0.69), so both stay."""
    rows = [{"prompt": "p", "completion": SUMMARY,
             "meta": {"instruction": "Write a summary for the paper given in the input.", "input": ABSTRACT}},
            {"prompt": "p", "completion": LABEL,
             "meta": {"instruction": "Classify the abstract under a label.", "input": ABSTRACT}}]
    assert jaccard(shingles(prompt_text(rows[0])), shingles(prompt_text(rows[1]))) == pytest.approx(0.921, abs=1e-3)
    assert jaccard(shingles(row_text(rows[0])), shingles(row_text(rows[1]))) == pytest.approx(0.691, abs=1e-3)
    out, stats = clean_rows(rows, near_dedup=True)
    assert len(out) == 2 and stats["near_duplicates"] == 0


def test_language_of_real_rows():
    en = load_sft(DatasetSpec(path=str(TEST_DATA / "alpaca_en_demo.json")))
    zh = load_sft(DatasetSpec(path=str(TEST_DATA / "alpaca_chinese_part_0.json"), field_prefix="zh_"))
    zh_pairs = load_preferences(DatasetSpec(path=str(TEST_DATA / "dpo_zh_demo.json")), "chat")
    assert [detect_language(prompt_text(r)) for r in en.rows] == ["en"] * 8
    assert [detect_language(prompt_text(r)) for r in zh.rows] == ["zh"] * 6
    assert [detect_language(prompt_text(r)) for r in zh_pairs.rows] == ["zh"] * 3


def test_chinese_varieties_count_as_zh():
    """A real alpaca-chinese zh_ row (Mandarin) that py3langid calls Wu ("wuu"): kept by `languages: [zh]`."""
    text = "从摄氏度转换为华氏度。\n摄氏温度：15"
    assert detect_language(text) == "wuu"
    assert in_languages(text, ["zh"]) and in_languages(text, ["wuu"]) and not in_languages(text, ["en"])


def test_language_filter_on_a_mixed_file(tmp_path):
    """8 English demo rows followed by the 6 Chinese rows of the bilingual Alpaca slice (zh_ fields as plain ones)."""
    en = json.loads((TEST_DATA / "alpaca_en_demo.json").read_text())
    zh = [{k[3:]: v for k, v in r.items() if k.startswith("zh_")}
          for r in json.loads((TEST_DATA / "alpaca_chinese_part_0.json").read_text())]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(en + zh, ensure_ascii=False))
    only_en = load_sft(DatasetSpec(path=str(path), languages=["en"]))
    assert (len(only_en), only_en.language_filtered) == (8, 6)
    assert [r["meta"]["instruction"] for r in only_en.rows] == [r["instruction"] for r in en]
    only_zh = load_sft(DatasetSpec(path=str(path), languages=["zh"]))
    assert (len(only_zh), only_zh.language_filtered) == (6, 8)
    assert only_zh.rows[1]["meta"]["instruction"] == "三原色是什么？"
    assert len(load_sft(DatasetSpec(path=str(path), languages=["en", "zh"]))) == 14
    with pytest.raises(DataError, match=r"no usable rows \(0 skipped, 6 not in \['en'\]\)"):
        load_sft(DatasetSpec(path=str(TEST_DATA / "alpaca_chinese_part_0.json"), field_prefix="zh_", languages=["en"]))


def test_languages_through_a_stage_config():
    cfg = from_dict(ExperimentConfig, {"name": "x", "sft": {"dataset": {"path": "d.json", "languages": ["zh"],
                                                                        "near_dedup": True}}})
    assert cfg.sft.dataset.languages == ["zh"] and cfg.sft.dataset.near_dedup is True
    with pytest.raises(ConfigError, match=r"sft.dataset.languages.*unknown language code\(s\) \['english'\]"):
        from_dict(ExperimentConfig, {"name": "x", "sft": {"dataset": {"path": "d.json", "languages": ["english"]}}})
    from prefopt.cli import describe_section
    from prefopt.sft.config import SFTStageConfig

    help_text = "\n".join(describe_section(SFTStageConfig, "sft"))
    assert "--sft.dataset.languages=[]" in help_text and "--sft.dataset.near_dedup_threshold=0.8" in help_text
