"""Per-GPU memory estimates for `prefopt check`, from each model's config.json alone (no weights are read).

A model's size is counted from its config (`count_params`): the embedding (V x h), per layer the attention
projections with grouped-query heads (q and o: h x a*d, k and v: h x kv*d, Qwen2's q/k/v biases), the gated MLP
(3 x h x I), the norms, the final norm, and the lm_head unless the embeddings are tied (a sequence classifier has a
num_labels x h head instead). The config comes from a local folder, the local Hugging Face cache, or, for the hub
ids the recipes name, a built-in table of their public config.json fields (`KNOWN`); any other id is "size
unknown" and its stages are left out of the plan.

Per GPU, for a model of P parameters of which T train, over n processes (`launch_processes`):

  weights      DeepSpeed: 2P (bf16; ZeRO-3: /n). Elsewhere 4P: prefopt loads fp32 weights and bf16 is autocast,
               so the fp32 weights are the masters (FSDP / FSDP2 full shard: /n).
  gradients    as the weights' dtype, of T (ZeRO-2/3, FSDP: /n).
  optimizer    AdamW: 2 fp32 states = 8T, + an fp32 master copy 4T when DeepSpeed holds bf16 weights (ZeRO: /n;
               offload_optimizer_device cpu: 0 on the GPU).
  gathered     ZeRO-3 / FSDP: the largest unit a forward gathers whole (the embedding) plus one layer, in bf16.
  activations  Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", Sec. 4.1):
               per layer s*b*h*(34 + 5*a*s/h) bytes with 16-bit activations, for b rows of s tokens; the 5*a*s^2*b
               attention-score term only for eager attention (Gemma-2), SDPA / flash do not keep the scores. With
               gradient checkpointing each layer keeps only its input, 2*s*b*h, and one layer is recomputed whole.
               Doubled for fp32 activations.
  logits       tokens x vocab x 4 bytes (float32), x2 in training (the logits and their gradient); a stage that
               projects `logps_chunk_size` tokens at a time holds one chunk's.
  frozen       a loaded DPO reference: 4P, whole (loop.py moves it to every device); precomputed: none during
               training. PPO: the reference (4P) and the reward model (bf16 on GPU), sharded under FSDP2 when
               ppo.shard_reference / shard_reward_model say so; the value model trains like the policy.
  vLLM         the engine takes gpu_memory_utilization x the GPU's memory (its weights and KV cache inside it).
  scoring      the reward model whole in bf16 and one batch's forward, per GPU: `score.data_parallel` workers each
               hold their own copy on their own GPU, so the figure does not change with their number.

Tokens per micro-batch: sft b*s; a preference pair stage 2*b*s (chosen and rejected; packed layouts carry at most
that many), in rows of s (padded, packed, prefix_tree) or of 2s (shared_prompt: prompt, chosen and rejected in one row);
PPO mini_batch_size/n responses of max_new_tokens in a step, forward_batch_size per process in a rollout pass
(prompt tokens are not bounded by the config, so not counted).
Not counted: CUDA context and allocator fragmentation (a few GB), the attention masks of the packed layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GB = 1e9

# The config.json fields of the hub models the recipes name (public files on the hub), so `prefopt check` can size
# them without a download. Only the fields count_params reads.
KNOWN: dict[str, dict] = {
    "google/gemma-2-9b-it": dict(model_type="gemma2", max_position_embeddings=8192, vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                                 num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                 tie_word_embeddings=True, architectures=["Gemma2ForCausalLM"]),
    "meta-llama/Meta-Llama-3-8B-Instruct": dict(model_type="llama", max_position_embeddings=8192, vocab_size=128256, hidden_size=4096,
                                                intermediate_size=14336, num_hidden_layers=32,
                                                num_attention_heads=32, num_key_value_heads=8,
                                                tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    # Llama-3-8B backbone with a 19-objective regression head and a gating network (the gating MLP's ~6M
    # parameters are left out: under 0.1% of the model).
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": dict(model_type="llama", max_position_embeddings=8192, vocab_size=128256, hidden_size=4096,
                                          intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                          num_key_value_heads=8, num_labels=19,
                                          architectures=["LlamaForRewardModelWithGating"]),
    "Qwen/Qwen2.5-7B-Instruct": dict(model_type="qwen2", max_position_embeddings=32768, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                     num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                                     tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
    "mistralai/Mistral-7B-Instruct-v0.2": dict(model_type="mistral", max_position_embeddings=32768, vocab_size=32000, hidden_size=4096,
                                               intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                               num_key_value_heads=8, tie_word_embeddings=False,
                                               architectures=["MistralForCausalLM"]),
    # the Alpaca recipes' LLaMA-1 checkpoints (huggyllama's copies of the original release)
    "huggyllama/llama-7b": dict(model_type="llama", max_position_embeddings=2048, vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                num_hidden_layers=32, num_attention_heads=32, tie_word_embeddings=False,
                                architectures=["LlamaForCausalLM"]),
    "huggyllama/llama-13b": dict(model_type="llama", max_position_embeddings=2048, vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                                 num_hidden_layers=40, num_attention_heads=40, tie_word_embeddings=False,
                                 architectures=["LlamaForCausalLM"]),
}
for _base, _alias in (("google/gemma-2-9b-it", "google/gemma-2-9b"),
                      ("meta-llama/Meta-Llama-3-8B-Instruct", "meta-llama/Meta-Llama-3-8B"),
                      ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B"),
                      ("mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-Instruct-v0.1"),
                      ("mistralai/Mistral-7B-Instruct-v0.2", "mistralai/Mistral-7B-v0.1")):
    KNOWN[_alias] = KNOWN[_base]

# Defaults of the config classes for fields a config.json may leave out.
TIED_BY_DEFAULT = {"gemma", "gemma2", "gemma3", "gemma3_text"}
NORMS_PER_LAYER = {"gemma2": 4, "gemma3": 4, "gemma3_text": 4}  # input, post-attention, pre- and post-feedforward
QKV_BIAS = {"qwen2"}  # Qwen2's q/k/v projections carry biases (no attention_bias field in its config)
EAGER_ONLY = {"gemma2"}  # attention scores materialised (the model runs eager attention)


@dataclass
class ModelSize:
    name: str
    source: str
    params: int
    layer_params: int
    embed_params: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate: int = 0
    max_positions: int = 0
    saved_bytes: int = 2  # bytes per parameter of the saved checkpoint (config.json's dtype; bf16 when unstated)
    classifier: bool = False
    eager: bool = False


def count_params(c: dict) -> tuple[int, int, int]:
    """(total, per-layer, embedding) parameters of a decoder-only model from its config.json fields."""
    V, h, L = c["vocab_size"], c["hidden_size"], c["num_hidden_layers"]
    a = c["num_attention_heads"]
    kv = c.get("num_key_value_heads") or a
    d = c.get("head_dim") or h // a
    inter = c["intermediate_size"]
    mtype = c.get("model_type", "llama")
    attn = h * a * d * 2 + h * kv * d * 2  # q, o; k, v
    if mtype in QKV_BIAS or c.get("attention_bias"):
        attn += a * d + 2 * kv * d + (h if c.get("attention_bias") else 0)
    if c.get("qk_norm") or mtype in ("qwen3", "gemma3", "gemma3_text"):
        attn += 2 * d
    mlp = 3 * h * inter + (2 * inter + h if c.get("mlp_bias") else 0)
    layer = attn + mlp + NORMS_PER_LAYER.get(mtype, 2) * h
    embed = V * h
    total = embed + L * layer + h  # + final norm
    if is_classifier(c):
        total += h * int(c.get("num_labels") or len(c.get("id2label") or {}) or 1)
    elif not c.get("tie_word_embeddings", mtype in TIED_BY_DEFAULT):
        total += V * h
    return total, layer, embed


def is_classifier(c: dict) -> bool:
    return any(a.endswith("ForSequenceClassification") or "RewardModel" in a for a in c.get("architectures") or [])


def hub_cached_config(repo_id: str) -> str | None:
    """The config.json of a hub id in the local Hugging Face cache, or None (nothing is downloaded)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id that is not a valid repo name
        return None
    return path if isinstance(path, str) else None


def model_config(ref: str) -> tuple[dict, str] | None:
    """(config fields, where they came from) for a local folder or hub id, or None when the size is unknown."""
    folder = Path(ref).expanduser()
    if (folder / "config.json").is_file():
        return json.loads((folder / "config.json").read_text()), f"{folder / 'config.json'}"
    if folder.exists() or ref.startswith((".", "/")):
        return None
    cached = hub_cached_config(ref)
    if cached:
        return json.loads(Path(cached).read_text()), "the local Hugging Face cache"
    if ref in KNOWN:
        return KNOWN[ref], "built-in table of its public config.json (prefopt.memory_plan.KNOWN)"
    return None


def size_from_config(c: dict, name: str, source: str) -> ModelSize | None:
    """A ModelSize from config.json fields (a multimodal config's `text_config`), or None when fields are missing."""
    c = c if "vocab_size" in c else c.get("text_config", c)
    try:
        total, layer, embed = count_params(c)
    except (KeyError, TypeError):
        return None
    a = c["num_attention_heads"]
    return ModelSize(name=name, source=source, params=total, layer_params=layer, embed_params=embed,
                     layers=c["num_hidden_layers"], hidden=c["hidden_size"], heads=a,
                     kv_heads=c.get("num_key_value_heads") or a, head_dim=c.get("head_dim") or c["hidden_size"] // a,
                     vocab=c["vocab_size"], intermediate=c["intermediate_size"],
                     max_positions=int(c.get("max_position_embeddings") or 0),
                     saved_bytes=4 if (c.get("dtype") or c.get("torch_dtype")) == "float32" else 2,
                     classifier=is_classifier(c),
                     eager=c.get("model_type") in EAGER_ONLY or c.get("_attn_implementation") == "eager")


def model_size(ref: str) -> ModelSize | None:
    """The size of a local folder or hub id, or None when it is unknown."""
    found = model_config(ref)
    return size_from_config(found[0], ref, found[1]) if found else None


# ----------------------------------------------------------------------------------------------- the launch


@dataclass
class Backend:
    """How the launch divides a model over n processes."""

    kind: str = "ddp"  # ddp | zero | fsdp
    n: int = 1
    zero_stage: int = 0
    shard_weights: bool = False
    shard_grads: bool = False
    shard_optimizer: bool = False
    offload_optimizer: bool = False
    offload_params: bool = False
    bf16: bool = False

    def describe(self) -> str:
        if self.kind == "ddp" and self.n == 1:
            return "one process"
        name = {"ddp": "DDP", "zero": f"DeepSpeed ZeRO-{self.zero_stage}", "fsdp": "FSDP"}[self.kind]
        return f"{name} over {self.n} processes"


def backend_of(conf: dict, n: int, num_machines: int = 1) -> Backend:
    """The Backend an accelerate config file (as a dict) describes, for n processes in all."""
    kind = str(conf.get("distributed_type", "NO")).upper()
    bf16 = str(conf.get("mixed_precision", "no")).lower() in ("bf16", "fp16")
    if kind == "DEEPSPEED":
        ds = conf.get("deepspeed_config") or {}
        z = int(ds.get("zero_stage", 0) or 0)
        return Backend("zero", n, z, shard_weights=z >= 3, shard_grads=z >= 2, shard_optimizer=z >= 1,
                       offload_optimizer=str(ds.get("offload_optimizer_device", "none")) == "cpu",
                       offload_params=str(ds.get("offload_param_device", "none")) == "cpu", bf16=bf16)
    if kind == "FSDP":
        f = conf.get("fsdp_config") or {}
        if int(f.get("fsdp_version", 1)) == 2:
            whole = not f.get("fsdp_reshard_after_forward", True)
            strategy = "SHARD_GRAD_OP" if whole else "FULL_SHARD"
        else:
            strategy = str(f.get("fsdp_sharding_strategy", "FULL_SHARD")).upper()
        if strategy == "NO_SHARD":
            return Backend("ddp", n, bf16=bf16)
        per = n // max(num_machines, 1) if strategy.startswith("HYBRID") else n
        return Backend("fsdp", per, shard_weights=strategy != "SHARD_GRAD_OP", shard_grads=True,
                       shard_optimizer=True, offload_params=bool(f.get("fsdp_offload_params")), bf16=bf16)
    return Backend("ddp", n, bf16=bf16)


# ------------------------------------------------------------------------------------------------ the items


def activation_bytes(m: ModelSize, rows: int, seq: int, checkpointing: bool, fp32: bool) -> float:
    """Korthikanti et al. 2022, Sec. 4.1: s*b*h*(34 + 5*a*s/h) bytes per layer (16-bit), the attention-score term
    only when scores are materialised (eager); with checkpointing, 2*s*b*h per layer plus one layer recomputed."""
    sbh = seq * rows * m.hidden
    scores = 5 * m.heads * seq * seq * rows if m.eager else 0
    layer = 34 * sbh + scores
    total = (m.layers * 2 * sbh + layer) if checkpointing else m.layers * layer
    return total * (2 if fp32 else 1)


def training_items(m: ModelSize, b: Backend, trainable: int, load_bytes: int = 4) -> list[tuple[str, float]]:
    """Weights, gradients, optimizer states and the gathered buffer of one trained model, per GPU. `load_bytes`:
    the dtype the stage loads the weights in (4: fp32 masters with bf16 autocast; 2: the checkpoint's bf16, whose
    AdamW states are then bf16 too). DeepSpeed with bf16 holds bf16 weights and an fp32 master in its optimizer."""
    n = max(b.n, 1)
    half = b.kind == "zero" and b.bf16
    wbytes = 2 if half else load_bytes
    weights = 0 if b.offload_params else m.params * wbytes / (n if b.shard_weights else 1)
    grads = trainable * wbytes / (n if b.shard_grads else 1)
    states = 12 if half else 2 * load_bytes
    opt = 0 if b.offload_optimizer else trainable * states / (n if b.shard_optimizer else 1)
    dt = {2: "bf16", 4: "fp32"}[wbytes]
    items = [(f"weights ({dt}{', sharded' if b.shard_weights else ''}{', on CPU' if b.offload_params else ''})",
              weights),
             (f"gradients ({dt}{', sharded' if b.shard_grads else ''})", grads),
             (f"AdamW states (2 x {'fp32 + fp32 master' if half else dt}{', sharded' if b.shard_optimizer else ''}"
              f"{', on CPU' if b.offload_optimizer else ''})", opt)]
    if b.shard_weights and n > 1:
        items.append(("gathered for compute (embedding + 1 layer, bf16)", 2 * (m.embed_params + m.layer_params)))
    return items


def lora_params(m: ModelSize, lora) -> int:
    """Trainable LoRA parameters: r x (in + out) for each targeted projection of every layer."""
    h, q, kv = m.hidden, m.heads * m.head_dim, m.kv_heads * m.head_dim
    inter = (m.layer_params - 2 * h * q - 2 * h * kv) // 3 // h if m.layer_params > 2 * h * (q + kv) else 0
    shapes = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    targets = shapes if list(lora.target_modules) == ["all-linear"] else lora.target_modules
    return m.layers * sum(lora.r * sum(shapes[t]) for t in targets if t in shapes)


@dataclass
class Phase:
    """One step of a stage whose memory peaks together (a training step; a generation engine)."""

    name: str
    items: list[tuple[str, float]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(v for _, v in self.items)


@dataclass
class StagePlan:
    stage: str
    phases: list[Phase] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)  # model references whose size is unknown

    @property
    def peak(self) -> float:
        return max((p.total for p in self.phases), default=0.0)


def fmt(x: float) -> str:
    return f"{x / GB:.1f} GB" if x >= 0.05 * GB else f"{x / 1e6:.1f} MB"


# ------------------------------------------------------------------------------------------- the experiment


def _config_of(cfg, ref: str, depth: int = 0) -> tuple[dict, str] | None:
    """(config fields, source) of a model reference in an experiment: a `stage:` reference is the stage's saved
    model when it exists, else the model that stage starts from (a classifier head for a classifier reward model)."""
    from prefopt.experiment import MODEL_SUBDIR, ref_stage, stage_dir

    if not ref or depth > 8:
        return None
    if not ref.startswith("stage:"):
        return model_config(ref)
    name = ref_stage(ref)
    saved = stage_dir(cfg, name) / MODEL_SUBDIR.get(name, "model")
    if (saved / "config.json").is_file():
        return model_config(str(saved))
    if name == "base" and not cfg.base.model:
        b = cfg.base
        return (dict(model_type="llama", vocab_size=b.vocab_size, hidden_size=b.hidden_size,
                     intermediate_size=b.intermediate_size, num_hidden_layers=b.num_hidden_layers,
                     num_attention_heads=b.num_attention_heads, num_key_value_heads=b.num_key_value_heads,
                     max_position_embeddings=b.max_position_embeddings, tie_word_embeddings=False, dtype="float32"), "the base section (a tiny Llama built by the base stage)")
    start = {"base": cfg.base.model, "sft": cfg.sft.model, "dpo": cfg.dpo.model, "simpo": cfg.simpo.model,
             "ppo": cfg.ppo.policy, "reward": cfg.reward.model}.get(name)
    found = _config_of(cfg, start, depth + 1) if start else None
    if found and name == "reward" and cfg.reward.kind == "classifier":
        c, source = found
        found = ({**c, "architectures": ["ForSequenceClassification"], "num_labels": 1},
                 f"{source}, with a 1-label classifier head (reward.kind: classifier)")
    return found


def _start_ref(cfg, ref: str) -> str:
    """The model a `stage:` reference starts from, followed back to a folder or hub id (for messages)."""
    from prefopt.experiment import ref_stage

    for _ in range(8):
        if not ref or not ref.startswith("stage:"):
            break
        name = ref_stage(ref)
        ref = {"base": cfg.base.model, "sft": cfg.sft.model, "dpo": cfg.dpo.model, "simpo": cfg.simpo.model,
               "ppo": cfg.ppo.policy, "reward": cfg.reward.model}.get(name) or ""
    return ref


def _size(cfg, ref: str, plan: StagePlan) -> ModelSize | None:
    found = _config_of(cfg, ref)
    m = size_from_config(found[0], ref, found[1]) if found else None
    if m is None:
        start = _start_ref(cfg, ref)
        plan.unknown.append(f"{ref} (from {start})" if start and start != ref else ref)
    return m


def _describe(m: ModelSize) -> str:
    count = f"{m.params / 1e9:.2f}B" if m.params >= 1e8 else f"{m.params / 1e6:.2f}M"
    return f"{m.name}: {count} parameters (from {m.source})"


def _train_phase(m: ModelSize, b: Backend, sec, rows: int, seq: int, tokens: int, lm_tokens: int,
                 fp32_compute: bool = False, name: str = "training step", load_bytes: int = 4) -> Phase:
    lora = getattr(sec, "lora", None)
    trainable = lora_params(m, lora) if lora is not None and lora.enabled else m.params
    if fp32_compute:  # PPO: fp32 whatever the launch config's mixed precision
        b = Backend(**{**b.__dict__, "bf16": False})
    ph = Phase(name, training_items(m, b, trainable, load_bytes))
    bf16 = getattr(sec, "bf16", False) and not fp32_compute
    ckpt = getattr(sec, "gradient_checkpointing", False)
    ph.items.append((f"activations ({rows} x {seq} tokens, {'checkpointed' if ckpt else 'no checkpointing'}"
                     f"{', eager attention scores' if m.eager else ''})",
                     activation_bytes(m, rows, seq, ckpt, fp32=not bf16)))
    if not m.classifier and lm_tokens:
        ph.items.append((f"logits ({lm_tokens} tokens x {m.vocab} x 4 B, x2 with their gradient)",
                         lm_tokens * m.vocab * 4 * 2))
    ph.notes.append(_describe(m) + (f"; {trainable / 1e6:.1f}M trained (LoRA)" if trainable != m.params else ""))
    return ph


def _pair_shape(sec) -> tuple[int, int, int, int]:
    """(rows, row length, tokens, tokens projected at once) of a preference micro-batch."""
    b, s = sec.per_device_train_batch_size, sec.max_length
    layout = getattr(sec, "layout", "padded")
    rows, seq = (b, 2 * s) if layout == "shared_prompt" else (2 * b, s)
    tokens = 2 * b * s
    chunk = getattr(sec, "logps_chunk_size", 0)
    return rows, seq, tokens, min(chunk, tokens) if chunk else tokens


def forward_bytes(m: ModelSize, rows: int, seq: int, nbytes: int) -> float:
    """Peak activations of a no-grad forward: one layer's tensors live at once, s*b*(4h + 3I) values (residual,
    normed input, q/k/v/o; the MLP's gate, up and product), plus eager attention's scores and their fp32 softmax,
    a*s^2*b*(nbytes + 4)."""
    scores = m.heads * seq * seq * rows * (nbytes + 4) if m.eager else 0
    return seq * rows * (4 * m.hidden + 3 * m.intermediate) * nbytes + scores


def _inference_phase(name: str, m: ModelSize, nbytes: int, rows: int, seq: int, logits_tokens: int = 0) -> Phase:
    ph = Phase(name, [(f"weights ({'bf16' if nbytes == 2 else 'fp32'})", m.params * nbytes),
                      (f"forward activations (at most {rows} x {seq} tokens{', eager attention scores' if m.eager else ''})",
                       forward_bytes(m, rows, seq, nbytes))])
    if logits_tokens and not m.classifier:
        ph.items.append((f"logits ({logits_tokens} tokens x {m.vocab} x 4 B)", logits_tokens * m.vocab * 4))
    ph.notes.append(_describe(m))
    return ph


def _vllm_phase(name: str, m: ModelSize, utilization: float, gpu_gb: float, tp: int = 1) -> Phase:
    budget = utilization * gpu_gb * GB
    weights = m.params * 2 / max(tp, 1)
    ph = Phase(name, [(f"vLLM engine (gpu_memory_utilization {utilization:g} x {gpu_gb:g} GB: weights "
                       f"{fmt(weights)} bf16{f' / tp {tp}' if tp > 1 else ''}, KV cache {fmt(budget - weights)})",
                       budget)])
    ph.notes.append(_describe(m))
    if weights > budget:
        ph.notes.append(f"the engine's share ({fmt(budget)}) is smaller than its weights ({fmt(weights)}): raise "
                        "gpu_memory_utilization or tensor_parallel_size")
    return ph


def stage_plan(cfg, stage: str, b: Backend, gpu_gb: float) -> StagePlan | None:
    """The memory plan of one stage (None for stages that load no model)."""
    sec = getattr(cfg, stage)
    plan = StagePlan(stage)
    if stage == "sft":
        m = _size(cfg, sec.model, plan)
        if m:
            bsz, s = sec.per_device_train_batch_size, sec.max_length
            # TRL's SFTTrainer: the checkpoint's dtype, full (tokens x vocab) logits
            plan.phases.append(_train_phase(m, b, sec, bsz, s, bsz * s, bsz * s, load_bytes=m.saved_bytes))
    elif stage in ("dpo", "simpo") or (stage == "reward" and sec.kind == "likelihood"):
        m = _size(cfg, sec.model, plan)
        if m:
            rows, seq, tokens, lm = _pair_shape(sec)
            ph = _train_phase(m, b, sec, rows, seq, tokens, tokens if b.kind == "fsdp" else lm)
            if stage == "dpo" and sec.reference == "loaded":
                ref = _size(cfg, sec.ref_model or sec.model, plan)
                if ref:
                    ph.items.append(("reference model (fp32, whole on every process)", ref.params * 4))
            elif stage == "dpo" and sec.reference == "precomputed":
                ph.notes.append("reference: precomputed (a no-grad pass before training; nothing during it)")
            plan.phases.append(ph)
    elif stage == "reward":  # classifier head on the base model
        m = _size(cfg, "stage:reward", plan)
        if m:
            bsz, s = sec.per_device_train_batch_size, sec.max_length
            plan.phases.append(_train_phase(m, b, sec, 2 * bsz, s, 2 * bsz * s, 0, load_bytes=m.saved_bytes))
    elif stage == "ppo":
        _ppo(cfg, sec, b, gpu_gb, plan)
    elif stage == "generate":
        m = _size(cfg, sec.model, plan)
        if m:
            plan.phases.append(_generation_phase(sec, m, gpu_gb))
    elif stage == "score":
        if sec.reward_fn:
            return None
        m = _size(cfg, sec.reward_model, plan)
        if m:  # max_length 0: the reward model's own limit
            ph = _inference_phase("scoring batch", m, 2, sec.batch_size, sec.max_length or m.max_positions)
            # data parallel: a whole reward model per worker process, one worker per GPU; nothing is divided
            dp = sec.data_parallel
            ph.notes.append(f"score.data_parallel {dp}: " + ("one process on one GPU" if dp == 1 else
                            f"{'one process per visible GPU' if dp == 0 else f'{dp} processes'}, each a whole "
                            "reward model on its own GPU (the figure is per GPU)"))
            plan.phases.append(ph)
    elif stage == "evaluate":
        sizes = [m for ref in sec.policies.values() if (m := _size(cfg, ref, plan))]
        if sizes:
            big = max(sizes, key=lambda m: m.params)
            plan.phases.append(_generation_phase(sec, big, gpu_gb, "generation (largest policy)"))
            # response log-probs project 512 tokens at a time (training.logps.response_logps); a row is the prompt
            # and the response, counted as max_new_tokens (the prompt's length is not bounded by the config)
            plan.phases.append(_inference_phase("log-probs (largest policy)", big, 2, sec.batch_size,
                                                sec.max_new_tokens, min(512, sec.batch_size * sec.max_new_tokens)))
        if not sec.reward_fn and sec.reward_model:
            rm = _size(cfg, sec.reward_model, plan)
            if rm:
                plan.phases.append(_inference_phase("reward model", rm, 2, sec.batch_size,
                                                    sec.rm_max_length or rm.max_positions))
    else:
        return None
    return plan


def _generation_phase(sec, m: ModelSize, gpu_gb: float, name: str = "generation") -> Phase:
    backend = "transformers" if sec.backend == "transformers" else "vllm"  # `auto` picks vLLM on a GPU machine
    if backend == "vllm":
        tp = getattr(sec, "tensor_parallel_size", 1)
        return _vllm_phase(name, m, getattr(sec, "gpu_memory_utilization", 0.9), gpu_gb, tp)
    nbytes = 4 if sec.dtype == "float32" else 2
    n = sec.batch_size * (getattr(sec, "n", 1) if not getattr(sec, "seeds", None) else 1)
    kv = n * sec.max_new_tokens * m.layers * 2 * m.kv_heads * m.head_dim * nbytes
    ph = Phase(name, [(f"weights ({'fp32' if nbytes == 4 else 'bf16'})", m.params * nbytes),
                      (f"KV cache ({n} sequences x {sec.max_new_tokens} new tokens)", kv)])
    ph.notes.append(_describe(m) + "; prompt tokens are not bounded by the config: their KV cache is not counted")
    return ph


def _ppo(cfg, sec, b: Backend, gpu_gb: float, plan: StagePlan) -> None:
    policy = _size(cfg, sec.policy, plan)
    if policy is None:
        return
    n = max(b.n, 1)
    rows = max(sec.mini_batch_size // n, 1)
    ph = _train_phase(policy, b, sec, rows, sec.max_new_tokens, rows * sec.max_new_tokens,
                      rows * sec.max_new_tokens, fp32_compute=True, name="PPO step (policy trains in fp32)")
    fsdp = b.kind == "fsdp"
    ph.items.append((f"reference (fp32{', sharded' if fsdp and sec.shard_reference else ', whole'})",
                     policy.params * 4 / (n if fsdp and sec.shard_reference else 1)))
    rm = None if sec.reward_fn else _size(cfg, sec.reward_model, plan)
    if rm is not None:
        shard = fsdp and sec.shard_reward_model
        ph.items.append((f"reward model (bf16{', sharded' if shard else ', whole'})", rm.params * 2 / (n if shard else 1)))
    value_src = rm if sec.value_init == "reward" and rm is not None else policy
    value = ModelSize(**{**value_src.__dict__, "name": f"value model (from {value_src.name})", "classifier": True})
    for label, v in training_items(value, b, value.params):
        ph.items.append((f"value model {label}", v))
    if sec.backend == "vllm":
        ph.items.append((f"vLLM engine (vllm_gpu_memory_utilization {sec.vllm_gpu_memory_utilization:g} x "
                         f"{gpu_gb:g} GB{', asleep between rollouts' if sec.vllm_sleep else ''})",
                         sec.vllm_gpu_memory_utilization * gpu_gb * GB))
    plan.phases.append(ph)
    # The rollout's no-grad passes, the same models resident: forward_batch_size responses per process at once, and
    # the policy pass's float logits with their log-softmax and the entropy's product (3 x tokens x vocab).
    fwd, tokens = sec.forward_batch_size, sec.forward_batch_size * sec.max_new_tokens
    roll = Phase("PPO rollout pass", [it for it in ph.items if not it[0].startswith(("activations", "logits"))])
    roll.items.append((f"forward activations ({fwd} x {sec.max_new_tokens} tokens, fp32)",
                       forward_bytes(policy, fwd, sec.max_new_tokens, 4)))
    if not policy.classifier:
        roll.items.append((f"logits ({tokens} tokens x {policy.vocab} x 4 B, x3 with log-softmax and entropy)",
                           tokens * policy.vocab * 4 * 3))
    roll.notes = list(ph.notes)
    plan.phases.append(roll)


def experiment_plans(cfg, n: int, conf: dict, gpu_gb: float) -> tuple[Backend, list[StagePlan]]:
    """The plan of every stage of the experiment that loads a model, under the launch's backend."""
    b = backend_of(conf, n, cfg.launch.num_machines)
    plans = []
    from prefopt.experiment import STAGES

    for stage in cfg.stages:
        # stages that run in `prefopt run`'s own process hold whole models on one GPU
        backend = b if STAGES[stage][1] else Backend("ddp", 1)
        p = stage_plan(cfg, stage, backend, gpu_gb)
        if p is not None:
            plans.append(p)
    return b, plans


def format_plans(b: Backend, plans: list[StagePlan], gpu_gb: float) -> tuple[list[str], list[str]]:
    """(printed lines, problems): every stage's items per GPU, and each phase over `gpu_gb`."""
    lines = [f"memory per GPU (estimate; launch.gpu_memory_gb {gpu_gb:g}; training stages: {b.describe()}):"]
    over = []
    for p in plans:
        for ref in p.unknown:
            lines.append(f"  {p.stage:<9} {ref}: size unknown (no config.json here, not in the local Hugging Face "
                         "cache nor in prefopt.memory_plan.KNOWN)")
        for ph in p.phases:
            flag = "fits" if ph.total <= gpu_gb * GB else "DOES NOT FIT"
            lines.append(f"  {p.stage:<9} {ph.name}: {fmt(ph.total)} of {gpu_gb:g} GB, {flag}")
            for label, v in ph.items:
                lines.append(f"      {fmt(v):>9}  {label}")
            for note in ph.notes:
                lines.append(f"      {note}")
            if ph.total > gpu_gb * GB:
                over.append(f"{p.stage}: {ph.name} needs about {fmt(ph.total)} per GPU, more than "
                            f"launch.gpu_memory_gb {gpu_gb:g} (the items are listed above)")
    return lines, over
