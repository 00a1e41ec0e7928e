"""Memory at real sizes (issue 22, item 5), checked on tiny models by where tensors and weights are, not by bytes:

- evaluation's response log-probs go through the preference loop's chunked vocabulary projection: the numbers of a
  plain `log_softmax(model(ids).logits)`, and no tensor of (tokens x vocabulary) larger than one chunk;
- the reward model reads as many tokens as it can take (its own limit) unless the config says fewer, and a config
  asking for more is a config error naming the key;
- PPO loads its trained models on the CPU in float32 and its frozen ones in the run's precision, and hands them to
  accelerate's `prepare` that way (never whole on the GPU first); the rollout engine is built after `prepare`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prefopt.evaluate import metrics as M


from prefopt.training import logps as L
V = 97  # a vocabulary size no other dimension of these models has


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor any torch operation returns while active."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out

    def logits_rows(self, hidden: int) -> int:
        """The most vocabulary-sized rows any one tensor held (the lm_head weight's transpose, (hidden, V), is a
        weight, not logits)."""
        rows = [int(torch.Size(s).numel()) // V for s in self.shapes if s and s[-1] == V and s != (hidden, V)]
        return max(rows, default=0)


def llama(vocab: int = V):
    from transformers import LlamaConfig, LlamaForCausalLM, set_seed

    set_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, pad_token_id=0)).eval()


def gemma2(softcap: float = 0.5, window: int = 4096):
    """Gemma-2 with a final-logit soft-cap small enough to matter at random init (the real one is 30)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM, set_seed

    set_seed(0)
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                          final_logit_softcapping=softcap, sliding_window=window)).eval()


PROMPTS = [[1, 5, 6], [1, 7], [1, 8, 9, 10, 11]]
RESPONSES = [[12, 13, 14, 2], [15, 16, 17, 18, 19, 2], [20]]  # 11 response tokens in all
CHUNK = 4  # fewer than the batch's response tokens: the projection runs in 3 chunks


@torch.no_grad()
def plain_logps(model, temperature: float = 1.0) -> list[float]:
    """log p(response | prompt) from the model's own forward, one unpadded sequence at a time: the reference."""
    out = []
    for p, r in zip(PROMPTS, RESPONSES):
        logits = model(input_ids=torch.tensor([p + r])).logits[0].float() / temperature  # (T, V)
        logp = torch.log_softmax(logits, -1)
        out.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(r)))
    return out


def test_the_shape_recorder_sees_the_full_logits_of_a_plain_forward():
    """What the tests below rule out: the old path (`completion_logps`) makes (B, T, V) logits."""
    from prefopt.training.logps import completion_logps

    model = llama()
    batch = L.response_batch(PROMPTS, RESPONSES)
    comp = torch.zeros_like(batch["input_ids"]).flatten()
    comp[batch["source_index"] + 1] = 1
    with Shapes() as rec, torch.no_grad():
        completion_logps(model, batch["input_ids"], batch["attention_mask"], comp.view_as(batch["input_ids"]))
    B, T = batch["input_ids"].shape
    assert rec.logits_rows(hidden=32) >= B * (T - 1) > CHUNK


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluation_logps_are_exact_and_chunked(temperature):
    """Llama: every response's summed log-prob equals the plain forward's within 1e-5 (fp32), and no tensor ever
    held more than CHUNK tokens' vocabulary rows (the decoder's forward projects none)."""
    model = llama()
    with Shapes() as rec:
        got = L.response_logps(model, PROMPTS, RESPONSES, temperature=temperature, batch_size=3, chunk_size=CHUNK)
    assert got == pytest.approx(plain_logps(model, temperature), abs=1e-5)
    assert 0 < rec.logits_rows(hidden=32) <= CHUNK


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_evaluation_logps_of_a_soft_capped_model(temperature):
    """Gemma-2 caps its logits after the lm_head: at T = 1 the chunked projection applies the cap; at T != 1 each row
    goes through the model's own forward with only its response positions projected, so the largest vocabulary
    tensor is one response's (6 tokens here), never the batch's (3 x 9)."""
    model = gemma2()
    want = plain_logps(model, temperature)
    assert max(abs(a - b) for a, b in zip(want, plain_logps(gemma2(softcap=None), temperature))) > 1e-2  # it bites
    with Shapes() as rec:
        got = L.response_logps(model, PROMPTS, RESPONSES, temperature=temperature, batch_size=3, chunk_size=CHUNK)
    assert got == pytest.approx(want, abs=1e-5)
    assert 0 < rec.logits_rows(hidden=32) <= max(CHUNK, max(len(r) for r in RESPONSES))


def test_response_batch_layout():
    """The padded layout pair_logps reads: right padding, and the flat index r*T + t of the position predicting
    each response token."""
    b = L.response_batch([[1, 5], [1]], [[7, 8], [9]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 7, 8], [1, 9, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["source_index"].tolist() == [1, 2, 4]  # row 0 positions 1, 2; row 1 position 0 (4 * 1 + 0)
    assert b["target_ids"].tolist() == [7, 8, 9]
    assert b["seq_index"].tolist() == [0, 0, 1] and int(b["num_sequences"]) == 2


# ------------------------------------------------------------------------------------------ reward-model length


@pytest.fixture(scope="module")
def rm_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny classifier reward model (the tiny Llama's backbone, a seeded head): max_position_embeddings 256, a
    tokenizer with no length of its own (model_max_length 1e30)."""
    from prefopt.models.loading import load_reward_model, load_tokenizer, save_model
    from prefopt.dist.process import seed_everything

    seed_everything(1)
    out = tmp_path_factory.mktemp("rm") / "rm"
    save_model(load_reward_model(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir)), out)
    return out


def test_scoring_length_is_the_reward_models_own_limit(rm_dir, tmp_path):
    from prefopt.config import ConfigError
    from prefopt.models.loading import load_tokenizer
    from prefopt.scoring.scorer import scoring_length

    assert scoring_length(str(rm_dir), 0, "score.max_length") == 256  # the config's; the tokenizer's is no limit
    assert scoring_length(str(rm_dir), 100, "score.max_length") == 100  # fewer, as the config says
    with pytest.raises(ConfigError, match=r"^score.max_length: 512 tokens, but the reward model .* reads at most 256 "
                                          r"\(max_position_embeddings\)"):
        scoring_length(str(rm_dir), 512, "score.max_length")
    # a tokenizer that states a smaller limit than the positions: the smaller one
    import shutil

    shutil.copytree(rm_dir, tmp_path / "rm")
    tok = load_tokenizer(str(tmp_path / "rm"))
    tok.model_max_length = 64
    tok.save_pretrained(tmp_path / "rm")
    assert scoring_length(str(tmp_path / "rm"), 0, "ppo.rm_max_length") == 64
    with pytest.raises(ConfigError, match=r"^ppo.rm_max_length: 100 tokens, .* at most 64 \(model_max_length\)"):
        scoring_length(str(tmp_path / "rm"), 100, "ppo.rm_max_length")


def test_evaluate_scores_at_the_reward_models_limit(rm_dir, monkeypatch):
    """`evaluate` leaves rm_max_length unset: the reward model reads up to its own 256 tokens (not 512 it has no
    positions for, nor a fixed cut); a configured 1000 stops the stage before anything is sampled, naming the key."""
    from types import SimpleNamespace

    from prefopt.config import ConfigError
    from prefopt.evaluate.config import EvaluateConfig
    from prefopt.evaluate.scorers import proxy_scorer
    from prefopt.generation.base import Completion
    from prefopt.scoring import scorer as score

    seen = []
    monkeypatch.setattr(score, "score_texts", lambda model, tok, texts, bs, max_length, progress=None:
                        seen.append(max_length) or [0.0] * len(texts))
    ctx = SimpleNamespace(cfg=SimpleNamespace(stages=["evaluate"], task="none"), resolve=lambda p, model=True: p)
    rows = [{"prompt_id": "a", "prompt": "Sort 3 1 2"}]
    assert EvaluateConfig().rm_max_length == 0
    _, score_fn, _ = proxy_scorer(ctx, EvaluateConfig(reward_model=str(rm_dir), rm_format="policy"), rows)
    score_fn({"rendered": ["Sort 3 1 2\n"], "completions": [[Completion("1 2 3")]]}, rows)
    assert seen == [256]
    with pytest.raises(ConfigError, match=r"^evaluate.rm_max_length: 1000 tokens, .* at most 256"):
        proxy_scorer(ctx, EvaluateConfig(reward_model=str(rm_dir), rm_format="policy", rm_max_length=1000), rows)


# ------------------------------------------------------------------------------------------ PPO's placement


def write_ppo_config(tmp_path: Path, tiny_model_dir, rm_dir, **ppo) -> Path:
    import yaml

    tmp_path.mkdir(parents=True, exist_ok=True)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Sort {i} {i + 2} {i + 1}."}) + "\n" for i in range(8)))
    section = {"policy": str(tiny_model_dir), "reward_model": str(rm_dir), "prompts": {"path": str(prompts)},
               "total_episodes": 4, "rollout_batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1,
               "max_new_tokens": 4, "save_every": 1, **ppo}
    cfg = {"name": "mem", "output_dir": str(tmp_path), "wandb": {"mode": "disabled"}, "stages": ["ppo"],
           "ppo": section}
    path = tmp_path / "mem.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def placements(model) -> set[tuple[str, torch.dtype]]:
    return {(p.device.type, p.dtype) for p in model.parameters()}


class Stop(Exception):
    pass


def record_ppo(monkeypatch, device: str | None = None, stop: bool = False) -> dict:
    """Patches the ppo recipe to record, at each `accelerator.prepare` call, where every model's weights are, and
    the order of prepare calls and rollout-engine construction. `device`: what the accelerator says its device is
    (a device other than the CPU tells a model `prepare` moved from one moved before it)."""
    from accelerate import Accelerator

    from prefopt.ppo import recipe
    from prefopt.scoring import scorer as score

    seen: dict = {"events": [], "at_prepare": []}

    class Recording(Accelerator):
        def prepare(self, *args, **kwargs):
            seen["events"].append("prepare")
            seen["at_prepare"].append({name: placements(m) for name, m in seen["models"].items()})
            if stop:
                raise Stop
            return super().prepare(*args, **kwargs)

    if device is not None:
        Recording.device = property(lambda self: torch.device(device))

    def make_accelerator():
        acc = real_make()
        acc.__class__ = Recording
        return acc

    def load_models(ctx, cfg):
        policy, ref, value, tok = real_load(ctx, cfg)
        seen["models"].update(policy=policy, ref=ref, value=value)
        return policy, ref, value, tok

    def load_scorer(*args, **kwargs):
        scorer = real_scorer(*args, **kwargs)
        seen["scorer"], seen["scorer_load"] = scorer, kwargs
        return scorer

    def rollout_generator(*args, **kwargs):
        seen["events"].append("generator")
        return real_generator(*args, **kwargs)

    seen["models"] = {}
    real_make, real_load, real_generator = recipe.make_accelerator, recipe.load_models, recipe.rollout_generator
    real_scorer = score.load_scorer
    monkeypatch.setattr(recipe, "make_accelerator", make_accelerator)
    monkeypatch.setattr(recipe, "load_models", load_models)
    monkeypatch.setattr(recipe, "rollout_generator", rollout_generator)
    monkeypatch.setattr(score, "load_scorer", load_scorer)
    return seen


def test_ppo_models_before_prepare(tmp_path, tiny_model_dir, rm_dir, monkeypatch):
    """One process, frozen models in bf16, an accelerator whose device is not the CPU: when `prepare` is first
    called, the policy and the value model are still on the CPU in float32 (prepare moves them; the old code had
    moved them whole already), the reference is on the CPU in bfloat16 (placed after the trained models), the reward
    model in bfloat16, and no rollout engine has been built yet."""
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage

    seen = record_ppo(monkeypatch, device="meta", stop=True)
    with pytest.raises(Stop):
        run_stage(load_config(write_ppo_config(tmp_path, tiny_model_dir, rm_dir, frozen_dtype="bfloat16")), "ppo")
    assert seen["events"] == ["prepare"]  # the engine comes after the models are placed
    first = seen["at_prepare"][0]
    assert first["policy"] == first["value"] == {("cpu", torch.float32)}
    assert first["ref"] == {("cpu", torch.bfloat16)}
    assert placements(seen["scorer"].model) == {("meta", torch.bfloat16)}  # frozen: a full copy on this device
    # loaded on the CPU in its run dtype, then placed (or sharded): never whole on the GPU before sharding
    assert seen["scorer_load"]["device"] == "cpu" and seen["scorer_load"]["dtype"] == torch.bfloat16


def test_ppo_runs_with_frozen_models_in_the_launchs_bf16(tmp_path, tiny_model_dir, rm_dir, monkeypatch):
    """`frozen_dtype: auto` under a launch in bf16 mixed precision: the reference and the reward model in bfloat16,
    the policy and the value model trained in float32; the engine is built after both prepare calls; the run's KL
    at step 1 is bf16 rounding: not 0, small. With `frozen_dtype: float32` it is 0."""
    from prefopt.experiment import load_config
    from prefopt.stage import run_stage
    from prefopt.runtime.tracking import read_metrics

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch` passes on from its config
    seen = record_ppo(monkeypatch)
    cfg = load_config(write_ppo_config(tmp_path, tiny_model_dir, rm_dir))
    run_stage(cfg, "ppo")
    assert seen["events"] == ["prepare", "prepare", "generator"]
    assert placements(seen["models"]["ref"]) == placements(seen["scorer"].model) == {("cpu", torch.bfloat16)}
    assert placements(seen["models"]["policy"]) == placements(seen["models"]["value"]) == {("cpu", torch.float32)}
    kl = read_metrics(cfg.root / "ppo")[0]["kl"]
    assert kl != 0 and abs(kl) < 1e-3  # measured: -6e-6

    # the stage's own float32 wins over the launch: an exact reference, KL 0 at step 1
    seen = record_ppo(monkeypatch)
    cfg = load_config(write_ppo_config(tmp_path / "fp32", tiny_model_dir, rm_dir, frozen_dtype="float32"))
    run_stage(cfg, "ppo")
    assert placements(seen["models"]["ref"]) == placements(seen["scorer"].model) == {("cpu", torch.float32)}
    assert read_metrics(cfg.root / "ppo")[0]["kl"] == 0


def test_frozen_dtype_follows_the_launch(monkeypatch):
    from prefopt.ppo.config import PPOConfig
    from prefopt.ppo.setup import frozen_dtype

    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert frozen_dtype(PPOConfig()) is None  # fp32 reference, reward model as loaded
    for launch, want in (("no", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launch)
        assert frozen_dtype(PPOConfig()) == want
        assert frozen_dtype(PPOConfig(frozen_dtype="float32")) == torch.float32  # the stage's own setting wins


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_a_prompt_sampled_n_times_is_computed_once(family):
    """Evaluation scores n samples of each prompt: read as a prefix tree, the batch computes the shared template
    head once, each prompt once, and each sample's own tokens, with every sample's log-prob that of its own
    unpadded forward (Gemma-2: soft-capped logits, and a sliding window of 4 that a 12-token prompt reaches). The
    model's attention is switched for the call only."""
    from prefopt.training.throughput import Meter

    model = llama() if family == "llama" else gemma2(window=4)
    impl = model.config._attn_implementation
    head = [1, 30, 31, 32]  # a template's start, in every prompt
    prompts = [head + [40 + i, 41 + i, 42, 43, 44, 45, 46, 47] for i in range(2) for _ in range(4)]
    responses = [[50 + k, 60 + i, 2][: 1 + (k + i) % 3] for i in range(2) for k in range(4)]
    want = []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            logp = torch.log_softmax(model(input_ids=torch.tensor([p + r])).logits[0].float(), -1)
            want.append(sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(r)))
    meter = Meter(1.0)
    got = L.response_logps(model, prompts, responses, batch_size=8, meter=meter)
    assert got == pytest.approx(want, abs=1e-5)
    assert model.config._attn_implementation == impl
    # the head once, each prompt's own 8 tokens once, every response token (no two share a first token): 35 of 111
    assert meter.phases["forward"].tokens == len(head) + 2 * 8 + sum(map(len, responses)) == 35
    assert sum(len(p) + len(r) for p, r in zip(prompts, responses)) == 111


def test_response_tree_batch_layout():
    """The prefix-tree form of the same lists: one row, each shared prefix once, each target read where its
    predicting token was computed; a response with an empty prompt loses its first token's target (nothing predicts
    it), as in the padded form."""
    b = L.response_tree_batch([[1, 5], [1, 5], [], [1]], [[7, 8], [7, 9], [3], [9]])
    # sorted: 1 5 7 8 | 1 5 7 9 (9 at position 3) | 1 9 (9 at position 1) | 3 (a new tree: position 0)
    assert b["input_ids"].tolist() == [[1, 5, 7, 8, 9, 9, 3]] and b["position_ids"].tolist() == [[0, 1, 2, 3, 3, 1, 0]]
    assert int(b["num_tokens"]) == 7 and int(b["num_sequences"]) == 4
    got = list(zip(*(b[k].tolist() for k in ("seq_index", "source_index", "target_ids"))))
    assert got == [(0, 1, 7), (0, 2, 8), (1, 1, 7), (1, 2, 9), (3, 0, 9)]  # sequence 2's one token has no predictor
