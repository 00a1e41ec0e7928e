"""Self-instruct: each filter on hand-made tasks, the prompt and its parser, the stage with a scripted model (exact
counts), resume after a kill, unreadable seed rows, and a real tiny Llama end to end through the generation stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TEST_DATA
from prefopt.config import from_dict
from prefopt.data.loaders import load_sft
from prefopt.data.spec import DatasetSpec
from prefopt.experiment import ExperimentConfig
from prefopt.generation.base import Completion, derive_seed
from prefopt.self_instruct import recipe
from prefopt.self_instruct.config import BLACKLIST
from prefopt.self_instruct.filters import (
    SimilarityPool,
    blacklisted_word,
    invalid_output,
    reject_reason,
    starts_non_ascii,
    starts_with_punctuation,
    too_long,
    too_short,
    writes_a_program,
)
from prefopt.self_instruct.prompt import encode_prompt, parse_completion
from prefopt.stage import MARKER, fingerprint, run_stage

SEEDS = TEST_DATA / "seed_tasks.jsonl"

# ------------------------------------------------------------------------------------------------ filters


def test_length_limits():
    assert too_short("Name two primes", 4) and not too_short("Name two prime numbers", 4)  # 3 words out, 4 in
    assert not too_long(" ".join(["word"] * 150), 150) and too_long(" ".join(["word"] * 151), 150)


@pytest.mark.parametrize("instruction, word", [
    ("Draw a cat sitting on a mat.", "draw"),
    ("Describe the trend in this GRAPH.", "graph"),
    ("Summarise the audio transcript of the meeting.", "audio"),
    ("Go to the website and list its products.", "go to"),
    ("Describe what these pictures have in common.", "pictures"),
    ("Write a paragraph about mapping software.", None),  # whole words only: paragraph, mapping
    ("Explain how a profile differs from a resume.", None),  # file inside profile
])
def test_blacklist_matches_whole_words_any_case(instruction, word):
    assert blacklisted_word(instruction, BLACKLIST) == word


def test_start_of_instruction():
    assert writes_a_program("Write a program that adds two numbers.")
    assert not writes_a_program("Write a poem about programs.")
    assert starts_with_punctuation('"Explain" the joke.') and starts_with_punctuation("- list three fruits")
    assert not starts_with_punctuation("Explain the joke.")
    assert starts_non_ascii("Évaluez cette phrase.") and starts_non_ascii("¿Qué hora es?")
    assert not starts_non_ascii("Evaluate this sentence.")


def test_invalid_outputs():
    assert invalid_output("  \n ") == "empty_output"
    assert invalid_output("Hello   world", "Hello world") == "output_repeats_input"  # same words, other spacing
    assert invalid_output("Bonjour le monde", "Hello world") is None
    assert invalid_output("Paris") is None


def test_reject_reason_is_the_first_rule_broken():
    ok = {"instruction": "Name three rivers in Europe.", "input": "", "output": "Danube, Rhine, Elbe."}
    assert reject_reason(ok, blacklist=BLACKLIST) is None
    # too short wins over blacklisted; blacklisted over the empty output
    assert reject_reason({**ok, "instruction": "Draw it."}, blacklist=BLACKLIST) == "too_short"
    assert reject_reason({**ok, "instruction": "Draw three rivers in Europe.", "output": ""},
                         blacklist=BLACKLIST) == "blacklisted"
    assert reject_reason({**ok, "output": ""}, blacklist=BLACKLIST) == "empty_output"
    assert reject_reason({**ok, "instruction": "Write a program to list rivers."}, blacklist=BLACKLIST) == \
        "write_a_program"
    assert reject_reason({**ok, "instruction": "Write a program to list rivers."}, blacklist=BLACKLIST,
                         drop_write_a_program=False) is None


def test_rouge_l_by_hand():
    """"sort the words a b c alphabetically" vs "sort the words d e f alphabetically": 7 tokens each, the longest
    common subsequence is sort-the-words-alphabetically, 4 tokens: P = R = 4/7, F1 = 4/7 = 0.5714."""
    pool = SimilarityPool(["Sort the words a, b, c alphabetically.", "Name a fruit."])
    score, similar = pool.most_similar("sort the words d e f alphabetically")
    assert score == pytest.approx(4 / 7) and similar == "Sort the words a, b, c alphabetically."
    # case and punctuation are not words: the same words score 1
    assert pool.most_similar("NAME A FRUIT!")[0] == pytest.approx(1.0)
    # "name three rivers that flow through europe" vs "... asia": LCS 6 of 7 tokens, F1 = 6/7 = 0.857
    pool.add("Name three rivers that flow through Europe.")
    assert pool.most_similar("Name three rivers that flow through Asia.")[0] == pytest.approx(6 / 7)
    assert SimilarityPool().most_similar("anything at all") == (0.0, None)
    assert pool.most_similar("Completely unrelated wording here") == (0.0, None)


def _brute_force(pool: SimilarityPool, instruction: str) -> tuple[float, str | None]:
    """Alpaca's way: ROUGE-L F1 against every instruction in the pool; the first of equal maxima wins."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    best, best_inst = 0.0, None
    for inst in pool.instructions:
        f = scorer.score(inst, instruction)["rougeL"].fmeasure
        if f > best:
            best, best_inst = f, inst
    return best, best_inst


def test_indexed_pool_equals_brute_force_on_real_instructions():
    """The inverted-index bound only skips work: same maximum and same instruction as scoring the whole pool."""
    insts = [json.loads(line)["instruction"] for line in SEEDS.read_text().splitlines()]
    insts += [r["instruction"] for r in json.loads((TEST_DATA / "alpaca_en_demo.json").read_text())]
    insts += [r["en_instruction"] for r in json.loads((TEST_DATA / "alpaca_chinese_part_0.json").read_text())]
    pool = SimilarityPool(insts + ["Name a fruit.", "Name a colour.", "a fruit name"])  # ties, reordered words
    queries = insts + [i.replace("the", "a").upper() for i in insts] + [" ".join(reversed(i.split())) for i in insts]
    queries += ["Name a vegetable.", "fruit a name", "Describe the structure of a molecule.", "!!!", ""]
    for q in queries:
        assert pool.most_similar(q) == _brute_force(pool, q), q


# ------------------------------------------------------------------------------------------------ prompt / parser


def test_encode_prompt_layout():
    tasks = [{"instruction": "Give three tips\n  for staying healthy:", "input": "", "output": "Eat, sleep, move."},
             {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}]
    prompt = encode_prompt(tasks, list_length=20)
    assert "List of 20 tasks:" in prompt
    assert prompt.endswith("###\n1. Instruction: Give three tips for staying healthy\n1. Input:\n<noinput>\n"
                           "1. Output:\nEat, sleep, move.\n###\n2. Instruction: Translate to French.\n2. Input:\n"
                           "Hello\n2. Output:\nBonjour\n###\n3. Instruction:")


def test_parse_completion_pieces():
    text = (" Name two primes.\n3. Input:\n<noinput>\n3. Output:\n2 and 3.\n###\n"
            "4. Instruction: No input or output here\n###\n"
            "5. Instruction: Sum.\n5. Output:\n3\n5. Input:\n1 2\n###\n"  # out of order
            "6. Instruction: Add the numbers.\n6. Input:\n1 2\n6. Output:\n3\n###\n"
            "7. Instruction: Past the end of the list.")
    pieces = parse_completion(text, num_examples=2, list_length=6)
    assert [p.number for p in pieces] == [3, 4, 5, 6]
    assert [p.reason for p in pieces] == [None, "unparseable", "unparseable", None]
    assert pieces[0].task == {"instruction": "Name two primes.", "input": "", "output": "2 and 3."}
    assert pieces[3].task == {"instruction": "Add the numbers.", "input": "1 2", "output": "3"}
    # cut at max_new_tokens: the last piece may be missing its end, so it is dropped even if it parses
    cut = parse_completion(" Name two primes.\n3. Input:\n<noinput>\n3. Output:\n2 and", 2, 6, finished=False)
    assert [(p.number, p.reason) for p in cut] == [(3, "truncated")]
    assert [p.reason for p in parse_completion("", 2, 6)] == ["unparseable"]


# ------------------------------------------------------------------------------------------------ the stage


def _cfg(tmp_path, model="scripted-model", **sec):
    section = {"model": model, "seed_tasks": {"path": str(SEEDS), "format": "alpaca", "skip_bad_rows": True},
               "prompt_tasks": 2, "prompt_generated": 1, "list_length": 6, "batch_size": 2, "max_batches": 2,
               "num_instructions": 100, **sec}
    return from_dict(ExperimentConfig, {"name": "si", "seed": 3, "output_dir": str(tmp_path),
                                        "stages": ["self_instruct"], "wandb": {"mode": "disabled"},
                                        "self_instruct": section})


BATCH0 = [
    (" Name three rivers that flow through Europe.\n3. Input:\n<noinput>\n3. Output:\nThe Danube, the Rhine and the "
     "Elbe.\n###\n4. Instruction: Draw a picture of a cat sitting on a mat.\n4. Input:\n<noinput>\n4. Output:\n"
     "I cannot.\n###\n5. Instruction: Name three rivers that flow through Asia.\n5. Input:\n<noinput>\n5. Output:\n"
     "The Ganges, the Mekong and the Yangtze.\n###\n6. Instruction: Sort.\n6. Input:\n<noinput>\n6. Output:\nok\n"
     "###\n7. Instruction: Past the end of the list of tasks.", True),
    (" Rewrite the sentence in the passive voice.\n3. Input:\nThe cat chased the mouse.\n3. Output:\nThe mouse was "
     "chased by the cat.\n###\n4. Instruction: Summarize the text in one line\n4. Output:\nNo input field.\n###\n"
     "5. Instruction: Write a program that prints the first ten primes.\n5. Input:\n<noinput>\n5. Output:\n"
     "print(2)\n###\n6. Instruction: Classify the sentiment of this", False),
]
BATCH1 = [
    (' "Explain" why the sky looks blue at noon.\n3. Input:\n<noinput>\n3. Output:\nRayleigh scattering.\n###\n'
     "4. Instruction: Évaluez cette phrase en français.\n4. Input:\n<noinput>\n4. Output:\nBien.\n###\n"
     "5. Instruction: Give an example of a prime number.\n5. Input:\n<noinput>\n5. Output:\n\n###\n"
     "6. Instruction: Repeat the input text back exactly.\n6. Input:\nHello world\n6. Output:\nHello   world", True),
    (" Name three rivers that flow through Europe.\n3. Input:\n<noinput>\n3. Output:\nSeine, Po, Tagus.", True),
]


class ScriptedModel:
    """Stands in for a model: the completion of each prompt of batch k is fixed by the test (found by the batch's
    sampling seed, as the stage derives it); it records the prompts and can die on a given batch."""

    name = "scripted"

    def __init__(self, cfg, die_on_batch: int | None = None):
        self.seeds_of = {derive_seed(cfg.self_instruct.seed, cfg.seed, k, 1): k for k in range(2)}
        self.script = {seed: [BATCH0, BATCH1][k] for seed, k in self.seeds_of.items()}
        self.die_on_batch = die_on_batch
        self.prompts: dict[int, list[str]] = {}

    def generate(self, prompts, sampling, progress=None):
        k = self.seeds_of[sampling.seed]
        if k == self.die_on_batch:
            raise KeyboardInterrupt("killed")
        self.prompts[k] = list(prompts)
        return [[Completion(text=t, finished=f)] for t, f in self.script[sampling.seed][:len(prompts)]]


def _run(cfg, monkeypatch, model):
    monkeypatch.setattr(recipe, "make_generator", lambda *a, **k: model)
    return run_stage(cfg, "self_instruct")


def test_stage_counts_with_a_scripted_model(tmp_path, monkeypatch, capsys):
    cfg = _cfg(tmp_path)
    model = ScriptedModel(cfg)
    s = _run(cfg, monkeypatch, model)
    # batch 0: 4 + 4 pieces (task 7 is past the list), batch 1: 4 + 1
    assert s["candidates"] == 13 and s["accepted"] == 2 and s["batches"] == 2
    assert s["skipped"] == {"blacklisted": 1, "empty_output": 1, "output_repeats_input": 1, "starts_non_ascii": 1,
                            "starts_with_punctuation": 1, "too_short": 1, "too_similar": 2, "truncated": 1,
                            "unparseable": 1, "write_a_program": 1}
    assert s["accepted"] + sum(s["skipped"].values()) == s["candidates"]
    # Asia is 6/7 like Europe, accepted a moment before in the same batch; batch 1 repeats Europe exactly
    assert [e["rouge_l"] for e in s["skip_examples"]["too_similar"]] == [pytest.approx(6 / 7, abs=1e-4), 1.0]
    assert s["skip_examples"]["blacklisted"][0]["instruction"] == "Draw a picture of a cat sitting on a mat."
    assert s["seed_tasks"] == {"rows": 5, "skipped": 0, "skip_examples": []}
    rows = json.loads((tmp_path / "si" / "self_instruct" / "data.json").read_text())
    assert rows == [
        {"instruction": "Name three rivers that flow through Europe.", "input": "",
         "output": "The Danube, the Rhine and the Elbe."},
        {"instruction": "Rewrite the sentence in the passive voice.", "input": "The cat chased the mouse.",
         "output": "The mouse was chased by the cat."},
    ]
    loaded = load_sft(DatasetSpec(path=str(tmp_path / "si" / "self_instruct" / "data.json")))
    assert len(loaded) == 2 and loaded.rows[1]["completion"] == "The mouse was chased by the cat."
    # batch 0 shows 2 seed examples; batch 1 shows one of the 2 accepted tasks beside one seed
    assert all(p.count("Instruction:") == 3 for p in model.prompts[0] + model.prompts[1])
    generated = [r["instruction"] for r in rows]
    assert all(sum(g in p for g in generated) == 1 for p in model.prompts[1])
    assert not any(g in p for g in generated for p in model.prompts[0])
    out = capsys.readouterr().out
    assert "2 tasks accepted of 13 parsed pieces" in out and "too_similar" in out and "Draw a picture" in out


def test_stage_stops_at_num_instructions(tmp_path, monkeypatch):
    s = _run(_cfg(tmp_path, num_instructions=2), monkeypatch, ScriptedModel(_cfg(tmp_path)))
    assert s["batches"] == 1 and s["accepted"] == 2 and s["reached_target"] is True


def test_a_writer_with_no_task_accepted_stops_the_stage_naming_why(tmp_path, monkeypatch):
    """An untrained writer emits only noise: an empty data.json would fail the next stage with `no usable rows`;
    the stage itself stops, naming the writer and the reasons, and is not marked done."""
    from prefopt.data.errors import DataError

    cfg = _cfg(tmp_path, max_batches=1)
    model = ScriptedModel(cfg)
    model.script = {seed: [(" \u0007 noise", False), ("", True)] for seed in model.script}
    with pytest.raises(DataError) as e:
        _run(cfg, monkeypatch, model)
    assert str(e.value) == ("self_instruct.model scripted-model: no task accepted from the 2 pieces it wrote in 1 "
                            "batches (1 truncated, 1 unparseable; an example of each reason is in the stage's log); "
                            "try a stronger writer or more self_instruct.max_batches")
    assert not (tmp_path / "si" / "self_instruct" / "_DONE.json").exists()


def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tmp_path, monkeypatch):
    whole = _cfg(tmp_path / "whole")
    _run(whole, monkeypatch, ScriptedModel(whole))
    cfg = _cfg(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        _run(cfg, monkeypatch, ScriptedModel(cfg, die_on_batch=1))
    d = tmp_path / "killed" / "si" / "self_instruct"
    assert not (d / MARKER).exists() and not (d / "data.json").exists()
    assert [json.loads(line)["batch"] for line in (d / "batches.jsonl").read_text().splitlines()] == [0]
    with open(d / "batches.jsonl", "ab") as f:  # and a kill in the middle of writing batch 1's line
        f.write(b'{"batch": 1, "accepted": [{"instr')
    model = ScriptedModel(cfg)
    s = _run(cfg, monkeypatch, model)
    assert s["resumed_batches"] == 1 and list(model.prompts) == [1]  # batch 0 was not asked for again
    assert (d / "data.json").read_text() == (tmp_path / "whole" / "si" / "self_instruct" / "data.json").read_text()
    assert (d / "batches.jsonl").read_bytes() == \
        (tmp_path / "whole" / "si" / "self_instruct" / "batches.jsonl").read_bytes()
    assert s["candidates"] == 13 and s["accepted"] == 2  # nothing counted twice


def test_unreadable_seed_rows_are_counted_with_examples(tmp_path, monkeypatch):
    seeds = tmp_path / "seeds.jsonl"
    good = SEEDS.read_text().splitlines()
    seeds.write_text("\n".join([good[0], '{"id": "x", "instruction": "No instances here"}', good[1], "{not json",
                                json.dumps({"instruction": "Empty output", "instances": [{"input": "", "output": ""}]}),
                                good[2]]) + "\n")
    cfg = _cfg(tmp_path, max_batches=1, seed_tasks={"path": str(seeds), "format": "alpaca", "skip_bad_rows": True})
    s = _run(cfg, monkeypatch, ScriptedModel(_cfg(tmp_path)))
    rep = s["seed_tasks"]
    assert rep["rows"] == 3 and rep["skipped"] == 3 and len(rep["skip_examples"]) == 3
    assert "row 2" in rep["skip_examples"][0] and "row 4" in rep["skip_examples"][1] and "invalid JSON" in \
        rep["skip_examples"][1]
    assert "row 5" in rep["skip_examples"][2] and "instances[0].output" in rep["skip_examples"][2]


def test_model_is_required_and_seeds_must_fill_a_prompt(tmp_path, monkeypatch):
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match="self_instruct.model"):
        run_stage(_cfg(tmp_path, model=""), "self_instruct")
    with pytest.raises(ConfigError, match="only 5 usable seed tasks"):
        _run(_cfg(tmp_path, prompt_tasks=6, list_length=10), monkeypatch, ScriptedModel(_cfg(tmp_path)))


@pytest.mark.parametrize("bad, message", [
    ({"list_length": 3}, r"self_instruct.list_length: must be > 3"),  # the model must have tasks left to write
    ({"prompt_generated": 4}, r"self_instruct.prompt_generated: must be >= 0 and <= 3"),
    ({"similarity_threshold": 0}, r"self_instruct.similarity_threshold: must be > 0 and <= 1"),
    ({"min_words": 10, "max_words": 5}, r"self_instruct.max_words: must be >= 10"),
])
def test_config_refuses_inconsistent_settings(bad, message):
    from prefopt.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, {"name": "x", "self_instruct": bad})


def test_stage_is_opt_in_and_leaves_other_fingerprints_alone(tmp_path):
    default = from_dict(ExperimentConfig, {"name": "x", "output_dir": str(tmp_path)})
    assert "self_instruct" not in default.stages
    other = from_dict(ExperimentConfig, {"name": "x", "output_dir": str(tmp_path),
                                         "self_instruct": {"model": "/models/llama", "num_instructions": 52000}})
    for stage in default.stages:
        assert fingerprint(default, stage) == fingerprint(other, stage)
    # an SFT on the generated data reads the stage: its fingerprint follows self_instruct's
    reads = {"sft": {"dataset": {"path": "stage:self_instruct/data.json"}}}
    a = from_dict(ExperimentConfig, {"name": "x", "stages": ["self_instruct", "sft"], **reads})
    b = from_dict(ExperimentConfig, {"name": "x", "stages": ["self_instruct", "sft"], **reads,
                                     "self_instruct": {"num_instructions": 7}})
    assert a.stages == ["self_instruct", "sft"] and fingerprint(a, "sft") != fingerprint(b, "sft")


# ------------------------------------------------------------------------------------------------ a real model


@pytest.fixture(scope="module")
def long_context_tiny_model(tmp_path_factory) -> Path:
    """A random tiny Llama whose positions reach past the ~1,500-token self-instruct prompt."""
    from conftest import TINY_TEXTS
    from prefopt.models.loading import build_tiny_llama, build_tokenizer, save_model
    from prefopt.self_instruct.prompt import BRIEF
    from prefopt.dist.process import seed_everything

    seed_everything(0)
    tok = build_tokenizer(TINY_TEXTS + [BRIEF, SEEDS.read_text()], vocab_size=600)
    model = build_tiny_llama(tok, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                             intermediate_size=64, max_position_embeddings=4096)
    out = tmp_path_factory.mktemp("tiny-long") / "model"
    save_model(model, tok, out)
    return out


def test_tiny_model_end_to_end_and_resume(tmp_path, monkeypatch, long_context_tiny_model):
    """The real generation stack (transformers backend, left padding, EOS handling) on real seed tasks: a random
    model writes no parseable task, but every piece is accounted for, the resumed run is identical, and the file
    (seeds included here, so it is not empty) loads for SFT."""
    sec = dict(model=str(long_context_tiny_model), max_new_tokens=24, backend="transformers", max_batches=2,
               include_seed_tasks=True)
    whole = run_stage(_cfg(tmp_path / "whole", **sec), "self_instruct")
    assert whole["batches"] == 2 and whole["prompts"] == 4 and whole["generator"]["backend"] == "transformers"
    assert whole["candidates"] >= 4  # at least one piece per completion
    assert whole["accepted"] + sum(whole["skipped"].values()) == whole["candidates"]
    assert set(whole["skipped"]) <= {"unparseable", "truncated"} and whole["accepted"] == 0
    data = tmp_path / "whole" / "si" / "self_instruct" / "data.json"
    loaded = load_sft(DatasetSpec(path=str(data)))
    assert len(loaded) == 5 + whole["accepted"]

    real = recipe.make_generator
    calls = []

    def dies_on_second_batch(*a, **k):
        gen = real(*a, **k)
        inner = gen.generate

        def generate(prompts, sampling, progress=None):
            calls.append(sampling.seed)
            if len(calls) == 2:
                raise KeyboardInterrupt("killed")
            return inner(prompts, sampling, progress)

        gen.generate = generate
        return gen

    cfg = _cfg(tmp_path / "killed", **sec)
    monkeypatch.setattr(recipe, "make_generator", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_stage(cfg, "self_instruct")
    monkeypatch.setattr(recipe, "make_generator", real)
    resumed = run_stage(cfg, "self_instruct")
    assert resumed["resumed_batches"] == 1
    for key in ("candidates", "accepted", "skipped", "skip_examples"):
        assert resumed[key] == whole[key]
    assert (tmp_path / "killed" / "si" / "self_instruct" / "batches.jsonl").read_text() == \
        (tmp_path / "whole" / "si" / "self_instruct" / "batches.jsonl").read_text()
