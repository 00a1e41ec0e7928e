from prefopt.models import load_causal_lm, load_tokenizer


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
