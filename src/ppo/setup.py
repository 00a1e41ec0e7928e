"""PPO's setup: the launch it runs under, the four models (loaded on the CPU for `train` to place), the reward (a
reward model or a reward function) and what samples the rollouts."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prefopt.config import ConfigError
from prefopt.models.loading import place_frozen
from prefopt.ppo.rollout import ValueModel, reward_model_scorer


def make_accelerator():
    """The launch's Accelerator, always training in float32."""
    from accelerate import Accelerator

    # cpu=True without CUDA: under `accelerate launch` on a CPU machine accelerate otherwise starts N independent
    # single-process runs instead of one gloo process group. mixed_precision "no" whatever the launch config says:
    # PPO trains in float32, and autocast on the prepared policy but not on the frozen reference would make
    # KL > 0 before any update (fp16's scaler would also unscale twice, once per optimizer).
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")


def check_world(cfg, num_processes: int) -> None:
    """The global rollout and minibatch must split evenly over the processes (each takes an equal share)."""
    for key in ("rollout_batch_size", "mini_batch_size"):
        if getattr(cfg, key) % num_processes:
            raise ConfigError(f"ppo.{key} ({getattr(cfg, key)}) must be a multiple of the number of processes "
                              f"({num_processes}): each process takes an equal share of the global batch")
    local = cfg.rollout_batch_size // num_processes
    if cfg.generation_chunk and local % cfg.generation_chunk:
        raise ConfigError(f"ppo.generation_chunk ({cfg.generation_chunk}) must divide each process's share of "
                          f"ppo.rollout_batch_size ({cfg.rollout_batch_size} / {num_processes} processes = {local})")


def check_distributed_type(accelerator) -> None:
    """PPO trains two models (policy and value) with their own optimizers and generates from the policy between
    updates. It runs on one process, under DDP, and under FSDP2 (sharded policy, value and, as the config says,
    reference and reward model; synced generation). FSDP1 and DeepSpeed are refused before any weights load:
    FSDP1 wraps models in a class whose generate() does not gather the weights, and DeepSpeed wants one engine
    per trained model, which this loop does not build."""
    from accelerate.utils import DistributedType

    dt = accelerator.distributed_type
    if dt in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        return
    if dt == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version == 2:
        return
    what = "FSDP version 1" if dt == DistributedType.FSDP else dt.value
    raise ConfigError(f"ppo runs on one process, under DDP or under FSDP2; this launch is {what} (the "
                      "launch.accelerate_config file): use experiments/accelerate/fsdp2.yaml or ddp.yaml for the "
                      "ppo stage")


def is_sharded(accelerator) -> bool:
    """FSDP: every process holds 1/N of each prepared model's weights; every forward pass is collective."""
    from prefopt.models.loading import sharded_weights

    return sharded_weights(accelerator) == "FSDP"


def check_reward_model_code(ctx, cfg) -> None:
    """A reward model that needs its own code (and no `ppo.trust_remote_code`) is refused before any weights load."""
    from prefopt.scoring.likelihood import read_meta
    from prefopt.scoring.scorer import reward_model_config

    rm_path = ctx.resolve(cfg.reward_model)
    if not (Path(rm_path).is_dir() and read_meta(rm_path)):
        reward_model_config(rm_path, cfg.trust_remote_code, "ppo.trust_remote_code")


def reward_scorer(ctx, cfg, rows: list[dict], rendered: list[str], accelerator):
    """The rollout's ScoreFn: `ppo.reward_fn` when set (a function of the prompt row and the response), else the
    reward model (`rm_score_fn`)."""
    if not cfg.reward_fn:
        return rm_score_fn(ctx, cfg, rows, rendered, accelerator)
    from prefopt.scoring.functions import load_reward_function

    score_fn = function_scorer(load_reward_function(cfg.reward_fn, ctx.cfg.task), rows, rendered)
    accelerator.print(f"[ppo] reward: the function {cfg.reward_fn} (value model from the policy)", flush=True)
    return score_fn


def function_scorer(fn, rows: list[dict], rendered: list[str]):
    """A rollout ScoreFn from a reward function: each rendered prompt is mapped back to its prompt row."""
    by_prompt = {p: {**r, "prompt": p} for r, p in zip(rows, rendered)}

    def score(prompts: list[str], completions) -> torch.Tensor:
        return torch.tensor(fn([by_prompt[p] for p in prompts], [c.text for c in completions]))

    return score


def rm_score_fn(ctx, cfg, rows: list[dict], rendered: list[str], accelerator):
    """The reward model's ScoreFn, given each prompt in its `rm_format` (checked before the model loads). Under
    FSDP the reward model is sharded when `ppo.shard_reward_model` (every process scores the same number of
    equal batches, so its collective forward passes line up)."""
    from prefopt.scoring.scorer import load_scorer, rm_input_format, rm_prompt, scoring_length

    rm_path = ctx.resolve(cfg.reward_model)
    fmt = rm_input_format(cfg.rm_format, rm_path, "ppo.rm_format", cfg.reward_model.startswith("stage:"),
                          trust_remote_code=cfg.trust_remote_code)
    rm_prompts = {p: rm_prompt(r, p, fmt, "ppo.rm_format") for r, p in zip(rows, rendered)}
    length = scoring_length(rm_path, cfg.rm_max_length, "ppo.rm_max_length", cfg.trust_remote_code,
                            "ppo.trust_remote_code")
    with whole_on_every_process():  # on the CPU in its run dtype: place_frozen moves (or shards) it
        scorer = load_scorer(rm_path, cfg.trust_remote_code, key="ppo.trust_remote_code", device="cpu",
                             dtype=frozen_dtype(cfg) or (torch.bfloat16 if torch.cuda.is_available()
                                                         else torch.float32))
    scorer.model = place_frozen(accelerator, scorer.model, cfg.shard_reward_model, "ppo.shard_reward_model")
    where = ""
    if is_sharded(accelerator):
        where = ", sharded (ppo.shard_reward_model)" if cfg.shard_reward_model else ", a full copy on each process"
    accelerator.print(f"[ppo] reward: the reward model {rm_path}, reading the "
                      f"{'policy' if fmt == 'policy' else 'its own chat'} format (ppo.rm_format: {cfg.rm_format})"
                      f"{where}", flush=True)
    return reward_model_scorer(scorer, batch_size=cfg.forward_batch_size, max_length=length, rm_prompts=rm_prompts)


def frozen_dtype(cfg) -> torch.dtype | None:
    """The frozen models' dtype: `ppo.frozen_dtype`, or for `auto` the launch's mixed precision (`accelerate launch`
    passes the config file's `mixed_precision` on as ACCELERATE_MIXED_PRECISION; `make_accelerator` itself trains in
    float32 whatever it says). None when neither names one: the reference is then float32 (exactly the policy's
    log-probs at step 0) and the reward model as `load_scorer` loads it."""
    name = cfg.frozen_dtype
    if name == "auto":
        launch = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
        name = {"bf16": "bfloat16", "fp16": "float16"}.get(launch)
    return getattr(torch, name) if name else None


class whole_on_every_process:
    """Within: `from_pretrained` loads the whole weights on every process, even when the accelerate config's
    fsdp_cpu_ram_efficient_loading has only process 0 load them (the others get empty meta tensors, filled when
    FSDP2 shards the model). For a model that is not prepared by accelerate's FSDP2 (the reward model's scorer)."""

    KEY = "FSDP_CPU_RAM_EFFICIENT_LOADING"

    def __enter__(self):
        self.saved = os.environ.pop(self.KEY, None)

    def __exit__(self, *exc):
        if self.saved is not None:
            os.environ[self.KEY] = self.saved


def load_models(ctx, cfg):
    """(policy, reference, value model, tokenizer) on the CPU, for `train` to place: the policy and the value model
    in float32 for `prepare` to move (each process's device gets only its shard under FSDP2), the reference in the
    run's precision (`frozen_dtype`). Under FSDP2 with fsdp_cpu_ram_efficient_loading, processes other than 0 hold
    empty (meta) weights that sharding fills from process 0. A resumed run starts from these weights too;
    `accelerator.load_state` then puts the checkpoint's in."""
    from prefopt.models.loading import load_causal_lm, load_reward_model, load_tokenizer

    policy_path = ctx.resolve(cfg.policy)
    tok = load_tokenizer(policy_path, padding_side="right")
    # Trained models in float32 (AdamW on bf16 weights loses small updates). A float32 reference computes exactly
    # the policy's log-probs at step 0 (KL 0 before any update); a bf16 one (`frozen_dtype`) halves its memory and
    # gives KL of bf16 rounding there.
    policy = load_causal_lm(policy_path, dtype="float32")
    ref_dtype = str(frozen_dtype(cfg) or torch.float32).removeprefix("torch.")
    if cfg.shard_reference:
        ref = load_causal_lm(policy_path, dtype=ref_dtype)  # a second load of the checkpoint, never a policy copy
    else:
        with whole_on_every_process():
            ref = load_causal_lm(policy_path, dtype=ref_dtype)
    for p in ref.parameters():
        p.requires_grad_(False)
    from_rm = cfg.value_init == "reward" and not cfg.reward_fn
    value_src = ctx.resolve(cfg.reward_model) if from_rm else policy_path
    remote = cfg.trust_remote_code and from_rm  # the setting is about the reward model's code only
    if value_src != policy_path and load_tokenizer(value_src, trust_remote_code=remote).get_vocab() != tok.get_vocab():
        # The value model reads the policy's token ids: another vocabulary would be read as garbage, silently.
        raise ConfigError(f"ppo.value_init: reward, but the reward model {value_src} has another tokenizer than the "
                          f"policy {policy_path}: the value model reads the policy's tokens (use ppo.value_init: "
                          "policy)")
    seq_cls = load_reward_model(value_src, trust_remote_code=remote).float()
    head = getattr(seq_cls, "score", None)
    if not isinstance(head, torch.nn.Linear) or head.out_features != 1:
        # The value model applies the reward head at every position; a hub model with another head (ArmoRM's
        # gated multi-objective regression) has none to apply.
        raise ConfigError(f"ppo.value_init: reward, but the reward model {value_src} ({type(seq_cls).__name__}) has "
                          "no scalar `score` head to read per token (use ppo.value_init: policy)")
    value = ValueModel(seq_cls)
    if value.model.config.vocab_size < len(tok):
        raise ValueError(f"value model from {value_src} has vocab {value.model.config.vocab_size} < the policy "
                         f"tokenizer's {len(tok)}: it must read the policy's tokens (use value_init: policy)")
    return policy, ref, value, tok


def rollout_generator(ctx, cfg, policy, tok, accelerator, prompts: list[str]):
    """What samples the rollouts: transformers `generate` on the policy being trained, or (`ppo.backend: vllm`, GPU
    machines) a vLLM engine beside it on each process, given the policy's weights before every rollout."""
    if cfg.backend == "transformers":
        from prefopt.generation.hf import TransformersGenerator

        # Under FSDP each decoding step is a collective forward pass: synced generation keeps a process whose
        # responses all ended stepping (without sampling) until every process's have.
        return TransformersGenerator(policy, tokenizer=tok, batch_size=cfg.rollout_batch_size,
                                     synced=is_sharded(accelerator))
    from prefopt.generation.vllm_backend import VLLMGenerator

    from prefopt.data.templates import encode

    # The engine starts from the checkpoint (in its saved dtype, as the other backends) and is given the trained
    # policy's weights before every rollout (train() calls load_weights). Its context is cut to the longest prompt
    # plus the response cap, so the KV cache it reserves beside training is no larger than PPO can use.
    longest = max(len(encode(p, tok)) for p in prompts)
    # Always colocated (external_launcher), one process too: only then does vLLM keep the model in this process,
    # where load_weights can reach it (TRL does the same). A lone process gets the launch variables it needs.
    if accelerator.num_processes == 1:
        for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(free_port())}.items():
            os.environ.setdefault(key, value)
    return VLLMGenerator(ctx.resolve(cfg.policy), gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                         seed=ctx.seed, colocate=True, max_model_len=longest + cfg.max_new_tokens,
                         enable_sleep_mode=cfg.vllm_sleep)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
