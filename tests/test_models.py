from prefopt.models.loading import load_causal_lm, load_tokenizer


def test_tiny_model_roundtrip(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    ids = tok("Sort 3 1 2")["input_ids"]
    assert ids[0] == tok.bos_token_id
    # digits are one token each: "3 1 2" must not merge into one token
    digits = [t for t in tok.convert_ids_to_tokens(ids) if any(c.isdigit() for c in t)]
    assert all(sum(c.isdigit() for c in t) == 1 for t in digits) and len(digits) == 3
    assert tok.decode(ids, skip_special_tokens=True) == "Sort 3 1 2"
    out = model(input_ids=__import__("torch").tensor([ids]))
    assert out.logits.shape == (1, len(ids), len(tok))
    assert tok.pad_token_id != tok.eos_token_id
    assert "assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                  add_generation_prompt=True)


def test_extend_vocabulary_adds_tokens_with_mean_embeddings(tiny_model_dir):
    import torch

    from prefopt.models.vocab import extend_vocabulary

    tok = load_tokenizer(str(tiny_model_dir))
    model = load_causal_lm(str(tiny_model_dir))
    n0 = len(tok)
    before = model.get_input_embeddings().weight[:n0].detach().clone()
    assert extend_vocabulary(tok, model, ["排序", "ascending"]) == 2
    assert len(tok) == n0 + 2 and model.get_input_embeddings().weight.shape[0] == n0 + 2
    assert tok("排序", add_special_tokens=False)["input_ids"] == [n0]  # one token now, not bytes
    w = model.get_input_embeddings().weight
    torch.testing.assert_close(w[:n0], before)  # old rows untouched
    torch.testing.assert_close(w[n0], before.mean(0))
    assert extend_vocabulary(tok, model, ["排序"]) == 0  # already there


def test_pack_blocks_and_pretraining_lowers_loss(tmp_path):
    from prefopt.base.recipe import pack_blocks

    # documents joined with EOS (9), cut into full blocks; the remainder is dropped
    assert pack_blocks([[1, 2, 3], [4, 5]], block_size=3, eos_id=9) == [[1, 2, 3], [9, 4, 5]]
    assert pack_blocks([[1]], block_size=3, eos_id=9) == []

    import json

    from conftest import tiny_experiment
    from prefopt.config import from_dict
    from prefopt.experiment import ExperimentConfig
    from prefopt.stage import run_stage

    cfg = from_dict(ExperimentConfig, tiny_experiment(tmp_path, stages=["task", "base"],
                                                     base={"pretrain_steps": 30, "pretrain_block_size": 64,
                                                           "pretrain_learning_rate": 3e-3}))
    run_stage(cfg, "task")
    summary = run_stage(cfg, "base")
    losses = [json.loads(x)["loss"] for x in (tmp_path / "runs" / "tiny" / "base" / "metrics.jsonl").read_text().splitlines()]
    assert summary["pretrain_blocks"] > 10 and losses[-1] < losses[0] - 1.0
