"""The sampling settings vLLM runs as asked, as pure checks: config modules validate temperatures here without
importing the vLLM backend (runtime code) or vllm."""

from __future__ import annotations

# vLLM's SamplingParams (0.31): temperature < 1e-5 is greedy (and then n must be 1), a temperature in (0, 0.01) is
# silently raised to 0.01, and one above 2 is rejected. Configs accept only what vLLM runs as asked.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 2.0


def temperature_problem(temperature: float, samples: int = 1, samples_key: str = "n") -> str | None:
    """Why vLLM would not sample `samples` answers per prompt at `temperature` as asked, or None when it would.
    `samples_key` names the config key that asked for the samples, for the message.

    The transformers backend could, but `backend: auto` picks vLLM on a GPU machine, so a config must suit both."""
    if temperature == 0:
        if samples > 1:
            return (f"0 is greedy decoding, one answer per prompt, but {samples_key} asks for {samples} samples "
                    f"(copies of it; vLLM refuses n > 1 when greedy): ask for 1 or set a temperature in "
                    f"[{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}]")
        return None
    if not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        return (f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}] (vLLM raises a smaller "
                f"positive temperature to {MIN_TEMPERATURE:g} and rejects one above {MAX_TEMPERATURE:g}), "
                f"got {temperature}")
    return None
