"""The transformers backend's KV cache: DynamicCache's layers, filled in place instead of grown by concatenation.

transformers' `DynamicLayer.update` appends each decoding step's keys and values with `torch.cat`, copying the whole
cache every step (0.46 s of a 2.4 s `generate` on the quickstart model, docs/performance.md). `PreallocatedLayer`
writes them into a buffer sized for the prompt and every new token, and returns views of its filled part: the same
values in the same order as the concatenation, so attention reads the same numbers and the samples are identical
to the bit (tests/test_generation.py). Sliding-window layers keep transformers' own class."""

from __future__ import annotations


def preallocated_cache(model, capacity: int):
    """A DynamicCache for `model` whose full-attention layers hold `capacity` positions without copying (None where
    transformers cannot build one from the model's config: `generate` then makes its own)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        def __init__(self):
            super().__init__()
            self._buffers = self._views = None

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.get_seq_length(), key_states.shape[-2]
            if self._views is None or self.keys is not self._views[0] or n + m > self._buffers[0].shape[-2]:
                # first step, or the cache was cropped, reordered or reset by transformers: one copy into a new buffer
                # (doubling past the capacity, so a longer run than planned still copies rarely)
                size = max(capacity, n + m if self._views is None else 2 * (n + m))
                self._buffers = tuple(s.new_empty(*s.shape[:-2], size, s.shape[-1])
                                      for s in (key_states, value_states))
                for buf, old in zip(self._buffers, (self.keys, self.values)):
                    if n:
                        buf[..., :n, :] = old
            for buf, new in zip(self._buffers, (key_states, value_states)):
                buf[..., n:n + m, :] = new
            self.keys, self.values = self._views = tuple(buf[..., :n + m, :] for buf in self._buffers)
            return self.keys, self.values

    try:
        cache = DynamicCache(config=model.config)
    except Exception:  # noqa: BLE001 - a remote-code config transformers cannot lay out: generate's own cache
        return None
    cache.layers = [PreallocatedLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
