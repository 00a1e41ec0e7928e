"""Chat rows against the family's own chat template: a conversation the template refuses (Gemma-2's and
Mistral-v0.1's have no system role) is a bad row naming the file, row and field, skippable, or read with its
system message merged into the first user turn (`system_message: merge`) or dropped."""

from __future__ import annotations

import json

import pytest

from conftest import TEST_DATA
from families import FAMILIES, build_tokenizer
from prefopt.data.errors import DataError
from prefopt.data.loaders import load_preferences, load_prompts, load_sft
from prefopt.data.spec import DatasetSpec
from prefopt.data.templates import render_prompt, system_message

DPO_DEMO = str(TEST_DATA / "dpo_en_demo.json")  # row 2 opens with a system turn, the others with a user turn
SYSTEM, USER = (t["value"] for t in json.loads((TEST_DATA / "dpo_en_demo.json").read_text())[1]["conversations"])


@pytest.fixture(scope="module")
def toks():
    return {name: build_tokenizer(FAMILIES[name]) for name in ("gemma2", "mistral", "qwen2.5")}


@pytest.mark.parametrize("family,reason", [("gemma2", "System role not supported"),
                                           ("mistral", "Conversation roles must alternate")])
def test_a_system_turn_the_template_refuses_names_the_row_field_and_the_way_past_it(toks, family, reason):
    with pytest.raises(DataError) as e:
        load_preferences(DatasetSpec(path=DPO_DEMO), "chat", tokenizer=toks[family])
    err = e.value
    assert (err.path, err.row, err.field) == (DPO_DEMO, 2, "conversations")
    assert reason in err.problem and "(system/user)" in err.problem
    assert "`system_message: merge`" in err.problem and "skip_bad_rows" in err.hint
    # skipped as a bad row: the other four read, and the count says why
    got = load_preferences(DatasetSpec(path=DPO_DEMO, skip_bad_rows=True), "chat", tokenizer=toks[family])
    assert len(got.rows) == 4 and got.skipped == 1 and reason in got.skipped_reasons[0]


def test_merge_puts_the_system_text_at_the_head_of_the_first_user_turn(toks):
    rows = load_preferences(DatasetSpec(path=DPO_DEMO, system_message="merge"), "chat", tokenizer=toks["gemma2"]).rows
    first = rows[1]["prompt"]
    assert first == [{"role": "user", "content": SYSTEM + "\n\n" + USER}]
    text = render_prompt(first, toks["gemma2"])
    assert text.startswith("<bos><start_of_turn>user\n" + SYSTEM + "\n\n") and text.endswith("<start_of_turn>model\n")
    # the rows without a system turn are as `keep` reads them
    kept = load_preferences(DatasetSpec(path=DPO_DEMO, skip_bad_rows=True), "chat", tokenizer=toks["gemma2"]).rows
    assert [r for i, r in enumerate(rows) if i != 1] == kept
    dropped = load_preferences(DatasetSpec(path=DPO_DEMO, system_message="drop"), "chat", tokenizer=toks["mistral"])
    assert dropped.rows[1]["prompt"] == [{"role": "user", "content": USER}]


def test_a_template_with_a_system_role_keeps_it_and_alpaca_ignores_the_key(toks):
    rows = load_preferences(DatasetSpec(path=DPO_DEMO), "chat", tokenizer=toks["qwen2.5"]).rows
    assert rows[1]["prompt"][0] == {"role": "system", "content": SYSTEM}
    assert "<|im_start|>system\n" + SYSTEM in render_prompt(rows[1]["prompt"], toks["qwen2.5"])
    alpaca = load_preferences(DatasetSpec(path=DPO_DEMO, system_message="drop"), "alpaca").rows
    assert alpaca[1]["prompt"].startswith(SYSTEM)  # Alpaca text always carries it at the head


def test_system_message_by_hand():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    assert system_message(msgs, "keep") is msgs
    assert system_message(msgs, "merge") == [{"role": "user", "content": "Be brief.\n\nHi"}, *msgs[2:]]
    assert system_message(msgs, "drop") == msgs[1:]
    assert system_message([{"role": "system", "content": "S"}], "merge") == [{"role": "user", "content": "S"}]


def test_turns_out_of_order_are_named_for_sft_and_prompts(tmp_path, toks):
    f = tmp_path / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "again"},
                          {"role": "assistant", "content": "b"}]}]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for load in (load_sft, load_prompts):
        with pytest.raises(DataError) as e:
            load(DatasetSpec(path=str(f)), "chat", tokenizer=toks["mistral"])
        assert (e.value.row, e.value.field) == (2, "messages") and "(user/user" in e.value.problem
        assert "system_message" not in e.value.problem  # no system turn: no advice about one
    assert len(load_sft(DatasetSpec(path=str(f)), "chat", tokenizer=toks["qwen2.5"]).rows) == 2


def test_chat_rows_for_a_tokenizer_without_a_chat_template(tmp_path, toks):
    tok = build_tokenizer(FAMILIES["mistral"])
    tok.chat_template = None
    with pytest.raises(DataError) as e:
        load_sft(DatasetSpec(path=str(TEST_DATA / "dpo_en_demo.json")), "chat", tokenizer=tok)
    assert e.value.row is None and "has no chat template" in str(e.value) and "template: alpaca" in str(e.value)
