"""Throughput and efficiency of a stage's model passes: tokens/s, padding, model FLOPs and MFU, one set of names.

Every stage that runs a model feeds a `Meter` and reports its `summary()` under the same keys:

    perf/tokens_per_s         token positions the model computed per second (padding included), all processes
    perf/useful_tokens_per_s  the non-padding ones per second
    perf/padding_fraction     1 - useful / computed
    perf/tflops               model FLOPs per second achieved, all processes, in TFLOP/s
    perf/mfu                  model FLOPs utilisation: perf/tflops / (perf/peak_tflops x processes)
    perf/mfu_with_attention   the same with attention's score and value products counted too (PaLM's convention)
    perf/peak_tflops          the peak of one device the MFU is measured against (`probe_peak_tflops` or config)
    perf/seconds              the time the passes took (the denominator of every rate above)
    perf/<phase>/...          the same per phase: `train`, `forward` (reference pass, reward scoring, evaluation's
                              log-probs), `generate` (sampling)

Every training stage's metrics rows (the preference loop's, the Trainer stages', PPO's) carry tokens/s (computed
and useful) and both MFUs of each logging window (`Meter.window`): the same names and meanings over the rows' span,
so W&B charts throughput as it goes and its run summary holds the whole stage's.

Model FLOPs (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", sec. 2.1: C ~ 6 N per training token,
2 N per forward token):

    forward-only token   2 N
    training token       2 N (forward) + 2 N (gradient w.r.t. activations) + 2 N_trainable (w.r.t. weights)
                         = 6 N with every weight trained; 4 N + 2 N_trainable with LoRA / frozen parts

N is the non-embedding parameter count, as in Kaplan et al.: every parameter but the input embedding table and the
output projection (lm_head, tied or not). Why not all parameters: the input embedding is a lookup (no
multiply-adds), and how many positions reach the lm_head depends on the stage (the preference loop projects only
completion positions, in chunks; the Trainer stages and generation project every position), so counting
2 x d x V per token would credit the loop with work it skips; without it every stage's figure is the same lower
bound. "Model" FLOPs, as in PaLM's MFU: activation recomputation (gradient checkpointing, the chunked projection's
backward) is not counted, so MFU says how much of the hardware went into the model's own arithmetic. They are
counted on the useful (non-padding) positions only: a padded position is waste the padding fraction reports, so MFU
is the share of the peak spent on real tokens.

Attention's score and value products (Kaplan's context term) are not in `perf/mfu`, the figure issue 24 set the
targets in; `perf/mfu_with_attention` adds them, as PaLM (Chowdhery et al. 2022, appendix B), Megatron and
torchtitan count MFU. Counted exactly rather than as PaLM's 12 x layers x width x T a token (every token attending
to all T): a token at position p of its sequence attends to min(p + 1, window) keys in each layer, and each key costs
2 x width for q.k and 2 x width for the weighted sum of values (width = query heads x head dim), so

    forward      4 x width x sum over layers and real tokens of min(p + 1, window)
    training     3 x that (the backward's four products: d scores, d values, d queries, d keys)

A position's keys follow from its position in its own sequence, so every layout of the same sequences (padded,
packed, shared prompt, prefix tree) gives the same count per computed token; flash attention's recomputation in
backward is, again, not counted.

The peak is measured, not taken from a datasheet: `probe_peak_tflops` times square matrix products on the device in
the run's dtype with the process's thread count (about 0.2 s) and keeps the fastest burst; `peak_tflops` in the
training fields sets it instead (0: probe). On a shared CPU the probe sees what the other processes leave, as the
stage does.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from typing import NamedTuple

from prefopt.models.loading import unwrapped

PHASES = ("train", "forward", "generate")
_PEAKS: dict[tuple, float] = {}  # (device, dtype, threads) -> TFLOP/s: one probe per process


def param_counts(model) -> tuple[int, int]:
    """(N, N_trainable): non-embedding parameters (module docstring), each tensor counted once (tied weights)."""
    inner = unwrapped(model)
    import torch

    # every embedding table (a wrapper such as PPO's value model has no get_input_embeddings of its own)
    skip = {id(p) for m in inner.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    for get in ("get_input_embeddings", "get_output_embeddings"):
        try:
            emb = getattr(inner, get)()
        except (AttributeError, NotImplementedError):
            emb = None
        if emb is not None:
            skip |= {id(p) for p in emb.parameters()}
    seen, n, trainable = set(), 0, 0
    for p in inner.parameters():
        if id(p) in seen or id(p) in skip:
            continue
        seen.add(id(p))
        n += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return n, trainable


def train_flops(n: int, n_trainable: int, tokens: int) -> float:
    """Model FLOPs of training on `tokens` positions: (4 N + 2 N_trainable) per token (6 N when all are trained)."""
    return float(4 * n + 2 * n_trainable) * tokens


def forward_flops(n: int, tokens: int) -> float:
    """Model FLOPs of a forward pass over `tokens` positions: 2 N per token."""
    return 2.0 * n * tokens


class AttentionShape(NamedTuple):
    """What attention's products cost in a model: `width` = query heads x head dim, `windows` = each layer's sliding
    window (None: the whole prefix)."""
    width: int
    windows: tuple


def attention_shape(model) -> AttentionShape | None:
    """The model's AttentionShape from its (text) config; None where the config names no attention heads. A wrapper
    without a config of its own (PPO's value model) is read through its `model`."""
    from prefopt.training.forward import layer_windows

    inner = unwrapped(model)
    config = getattr(inner, "config", None) or getattr(getattr(inner, "model", None), "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads, layers = getattr(config, "num_attention_heads", None), getattr(config, "num_hidden_layers", None)
    if not heads or not layers:
        return None
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return AttentionShape(heads * head_dim, layer_windows(config))


def attention_keys(batch: dict, windows: tuple) -> int:
    """Keys the batch's real tokens attend to, summed over layers: sum of min(p + 1, window) over real positions p
    (module docstring). Positions are the batch's `position_ids`, or counted along a 2D attention mask (left or
    right padding); a padding position of a layout without a 2D mask sits at position 0 (`collate`), one key,
    taken off per layer with the batch's `num_tokens`."""
    import torch

    ids, mask = batch["input_ids"], batch.get("attention_mask")
    pos = batch.get("position_ids")
    real = mask.bool() if mask is not None and mask.dim() == 2 else None
    if pos is None:
        pos = ((mask.long().cumsum(-1) - 1).clamp(min=0) if real is not None
               else torch.arange(ids.shape[-1], device=ids.device).expand_as(ids))
    padding = 0
    if real is None:  # padding sits at position 0: one key a position, taken off below
        computed, useful = batch_tokens(batch)
        padding = computed - useful
    keys = 0
    for window, layers in Counter(windows).items():
        k = pos + 1 if window is None else (pos + 1).clamp(max=window)
        n = int(k[real].sum()) if real is not None else int(k.sum()) - padding
        keys += layers * n
    return keys


def attention_flops(shape: AttentionShape | None, keys: int, train: bool = False) -> float:
    """FLOPs of attention's products over `keys` (attention_keys): 4 x width a key forward, 3 x that to train."""
    if shape is None:
        return 0.0
    return (12.0 if train else 4.0) * shape.width * keys


def mfu(flops: float, seconds: float, peak_tflops: float, devices: int = 1) -> float:
    """Achieved FLOP/s over the peak of `devices` devices (0 when nothing was timed)."""
    if seconds <= 0 or peak_tflops <= 0:
        return 0.0
    return flops / seconds / (peak_tflops * 1e12 * devices)


def probe_peak_tflops(device=None, dtype=None, seconds: float = 0.2) -> float:
    """The fastest square-matrix-product rate of this device in `dtype` (fp32 by default), in TFLOP/s.

    Products of n x n matrices (512 on CPU, 4096 on a GPU: big enough to reach the BLAS kernels' rate, small enough
    to repeat) in bursts of a few, for about `seconds` after one warm-up; the best burst is the peak. Cached per
    (device, dtype, threads) for the process."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    dtype = dtype or torch.float32
    key = (str(device), str(dtype), torch.get_num_threads())
    if key in _PEAKS:
        return _PEAKS[key]
    cuda = device.type == "cuda"
    n = 4096 if cuda else 512
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    reps = 8 if cuda else 2
    torch.mm(a, b)
    sync()
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync()
        best = max(best, 2.0 * n ** 3 * reps / (time.perf_counter() - t0))
    _PEAKS[key] = best / 1e12
    return _PEAKS[key]


class _Phase:
    __slots__ = ("tokens", "useful", "flops", "attention", "seconds")

    def __init__(self):
        self.tokens, self.useful, self.flops, self.attention, self.seconds = 0, 0, 0.0, 0.0, 0.0

    def totals(self) -> list[float]:
        return [self.tokens, self.useful, self.flops, self.attention, self.seconds]


FIELDS = len(_Phase.__slots__)  # totals() per phase; seconds last
WINDOW_FIGURES = ("tokens_per_s", "useful_tokens_per_s", "mfu", "mfu_with_attention")  # Meter.window's, per row


class Meter:
    """Tokens, model FLOPs and time of a stage's passes, per phase; `summary()` gives the perf/* figures.

        meter = Meter(peak_tflops)                         # a probe's or the config's figure
        with meter.timed("train"):
            ... one optimizer step ...
        meter.count("train", batch, n, n_trainable, meter.attention(model))   # or meter.add(phase, ...)

    Counts are this process's; `summary(totals)` takes the phase totals summed over processes when a launch has
    several (`totals()` gives what to sum), and divides by the slowest process's seconds."""

    def __init__(self, peak_tflops: float, processes: int = 1, sync=None):
        self.peak_tflops = float(peak_tflops)
        self.processes = processes
        self.sync = sync  # a device synchronise, so a GPU's queued work lands in the timed span
        self.phases: dict[str, _Phase] = {}
        self._params: dict[int, tuple[int, int]] = {}
        self._attention: dict[int, AttentionShape | None] = {}
        self._mark: list[float] = []  # totals() at the last window()

    def params(self, model) -> tuple[int, int]:
        """`param_counts(model)`, counted once per model. A meter made with peak 0 probes the peak here, on the
        first model's device and in its dtype (a stage that loads its models later, like evaluate)."""
        if id(model) not in self._params:
            self._params[id(model)] = param_counts(model)
            if self.peak_tflops <= 0:
                import torch

                p = next(model.parameters())
                self.peak_tflops = probe_peak_tflops(p.device, p.dtype if p.is_floating_point() else None)
                if p.device.type == "cuda":
                    self.sync = lambda: torch.cuda.synchronize(p.device)
        return self._params[id(model)]

    def attention(self, model) -> AttentionShape | None:
        """`attention_shape(model)`, read once per model."""
        if id(model) not in self._attention:
            self._attention[id(model)] = attention_shape(model)
        return self._attention[id(model)]

    def _phase(self, name: str) -> _Phase:
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {', '.join(PHASES)}")
        return self.phases.setdefault(name, _Phase())

    @contextmanager
    def timed(self, phase: str):
        p = self._phase(phase)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            p.seconds += time.perf_counter() - t0

    def add(self, phase: str, tokens: int, useful: int, flops: float, attention: float = 0.0) -> None:
        """Add positions, model FLOPs and attention's FLOPs (`attention_flops`) to a phase."""
        p = self._phase(phase)
        p.tokens += int(tokens)
        p.useful += int(useful)
        p.flops += float(flops)
        p.attention += float(attention)

    def count(self, phase: str, batch: dict, n: int, n_trainable: int = 0,
              attention: AttentionShape | list | None = None) -> None:
        """Add a model batch (`batch_tokens`) run through a model of `n` non-embedding parameters (`n_trainable` of
        them trained, for phase `train`) and attention shaped `attention` (`Meter.attention`; a list: several
        models over the same batch, as PPO's policy and value model; None: not counted). Model FLOPs are counted on
        the useful positions: padding is waste, which the padding fraction reports, not work the model needed."""
        computed, useful = batch_tokens(batch)
        train = phase == "train"
        flops = train_flops(n, n_trainable, useful) if train else forward_flops(n, useful)
        shapes = [attention] if isinstance(attention, AttentionShape) else [s for s in attention or () if s]
        attn = sum(attention_flops(s, attention_keys(batch, s.windows), train) for s in shapes)
        self.add(phase, computed, useful, flops, attn)

    def count_flops(self, phase: str, batch: dict, model) -> None:
        """Another forward pass over `batch` in `phase`'s time (a live reference model's): its FLOPs, attention's
        included, but not its positions, which the phase's own passes count."""
        shape = self.attention(model)
        attention = attention_flops(shape, attention_keys(batch, shape.windows)) if shape else 0.0
        self.add(phase, 0, 0, forward_flops(self.params(model)[0], batch_tokens(batch)[1]), attention)

    def totals(self) -> list[float]:
        """[tokens, useful, flops, attention, seconds] per phase in PHASES order (FIELDS each): what a launch sums
        (seconds: max) over ranks."""
        return [x for name in PHASES for x in self.phases.get(name, _Phase()).totals()]

    @staticmethod
    def seconds_of(totals: list[float]) -> list[float]:
        """Each phase's seconds out of a totals() list."""
        return list(totals[FIELDS - 1::FIELDS])

    def summary(self, totals: list[float] | None = None, seconds_max: list[float] | None = None) -> dict:
        """perf/* figures (module docstring). `totals`: `totals()` summed over processes; `seconds_max`: each
        phase's seconds, the slowest process's (defaults: this process's own)."""
        t = totals if totals is not None else self.totals()
        out: dict[str, float] = {}
        seconds = seconds_max if seconds_max is not None else self.seconds_of(self.totals())
        every = [0.0] * FIELDS
        for i, name in enumerate(PHASES):
            phase = [*t[FIELDS * i: FIELDS * (i + 1) - 1], seconds[i]]
            if phase[0] == 0:
                continue
            out.update(_figures(f"perf/{name}/", *phase, self.peak_tflops, self.processes))
            every = [a + b for a, b in zip(every, phase)]
        if every[0]:
            out.update(_figures("perf/", *every, self.peak_tflops, self.processes))
        out["perf/peak_tflops"] = round(self.peak_tflops, 6)
        return out

    def mark(self) -> None:
        """Start the next `window` here (what was counted before, such as a reference pass, is not in it)."""
        self._mark = self.totals()

    def window(self, gather=None) -> dict[str, float]:
        """A metrics row's live figures: perf/tokens_per_s, perf/useful_tokens_per_s, perf/mfu and
        perf/mfu_with_attention over what the meter counted since the last call (every phase), where `summary()`
        gives the whole stage's under the same names. `gather` (`accelerator_gather`, or the Trainer callback's,
        with several processes): every process's counts summed and the slowest one's seconds, as
        `gathered_summary`; a collective, so every process calls it."""
        import torch

        before = self._mark or [0.0] * len(self.totals())
        self.mark()
        delta = [a - b for a, b in zip(self._mark, before)]
        fields = [sum(delta[i::FIELDS]) for i in range(FIELDS)]  # the phases together; seconds last
        if gather is not None:
            every = gather(torch.tensor([fields], dtype=torch.float64))
            fields = [*every[:, :-1].sum(0).tolist(), float(every[:, -1].max())]
        figures = _figures("perf/", *fields, self.peak_tflops, self.processes)
        return {f"perf/{k}": figures[f"perf/{k}"] for k in WINDOW_FIGURES}

    def gathered_summary(self, gather=None) -> dict:
        """summary() with every process's counts summed and the slowest process's seconds. `gather` as `window`'s
        (None for one process); a collective, so every process calls it."""
        import torch

        if gather is None:
            return self.summary()
        every = gather(torch.tensor([self.totals()], dtype=torch.float64))
        return self.summary(every.sum(0).tolist(), self.seconds_of(every.max(0).values.tolist()))


def accelerator_gather(accelerator):
    """`Meter.window`'s and `gathered_summary`'s gather for an accelerate launch: every process's row (on the
    device its backend needs); None for one process."""
    if accelerator.num_processes == 1:
        return None
    return lambda t: accelerator.gather(t.to(accelerator.device)).cpu()


def _figures(prefix: str, tokens: float, useful: float, flops: float, attention: float, seconds: float,
             peak: float, processes: int) -> dict:
    rate = (lambda x: x / seconds) if seconds > 0 else (lambda x: 0.0)
    return {f"{prefix}tokens": int(tokens), f"{prefix}seconds": round(seconds, 3),
            f"{prefix}tokens_per_s": round(rate(tokens), 1), f"{prefix}useful_tokens_per_s": round(rate(useful), 1),
            f"{prefix}padding_fraction": round(1 - useful / tokens, 4) if tokens else 0.0,
            f"{prefix}tflops": round(rate(flops) / 1e12, 6),
            f"{prefix}mfu": round(mfu(flops, seconds, peak, processes), 6),
            f"{prefix}mfu_with_attention": round(mfu(flops + attention, seconds, peak, processes), 6)}


def describe(figures: dict) -> str:
    """The one line a stage prints at its end."""
    if "perf/tokens" not in figures:
        return "no model passes timed"
    parts = [f"{figures['perf/tokens_per_s']:,.0f} tokens/s ({figures['perf/useful_tokens_per_s']:,.0f} useful, "
             f"padding {figures['perf/padding_fraction']:.1%})",
             f"{figures['perf/tflops'] * 1e3:.2f} GFLOP/s = MFU {figures['perf/mfu']:.1%} of "
             f"{figures['perf/peak_tflops'] * 1e3:.1f} GFLOP/s peak"
             + (f" ({figures['perf/mfu_with_attention']:.1%} with attention's products)"
                if figures.get("perf/mfu_with_attention", 0) > figures["perf/mfu"] else "")]
    phases = [f"{name} {figures[f'perf/{name}/mfu']:.1%} over {figures[f'perf/{name}/seconds']:.1f} s"
              for name in PHASES if f"perf/{name}/mfu" in figures]
    over = [k for k in figures if k.rsplit("/", 1)[-1].startswith("mfu") and figures[k] > 1.0]
    warn = ("; MFU above 100% means the peak probe at the stage's start ran slower than the stage (a busy machine): "
            "set peak_tflops to the machine's figure" if over else "")
    return "; ".join(parts) + (f" (MFU by phase: {', '.join(phases)})" if phases else "") + warn


def start(peak_tflops: float = 0.0, device=None, dtype=None, processes: int = 1) -> Meter:
    """A stage's meter: the configured peak (`peak_tflops` > 0) or a probe of `device` in `dtype`."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    peak = peak_tflops if peak_tflops > 0 else probe_peak_tflops(device, dtype)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return Meter(peak, processes, sync)


def batch_tokens(batch: dict) -> tuple[int, int]:
    """(computed, useful) token positions of a model batch: every position of `input_ids`, and those that are not
    padding: the batch's `num_tokens` (the packed layouts' count) or the sum of a 2D attention mask."""
    ids = batch["input_ids"]
    if "num_tokens" in batch:
        return ids.numel(), int(batch["num_tokens"])
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return ids.numel(), int(mask.sum())
    return ids.numel(), ids.numel()
