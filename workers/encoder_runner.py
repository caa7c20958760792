"""The encoder's share of a step: encode the items the step's chunks reach, once each, and lay
their outputs out in the step's token order."""

from __future__ import annotations

from collections import OrderedDict

import torch

from workers.multimodal import MultiModalInput
from workers.scheduler import ScheduledChunk
from workers.sequence import Sequence


class EncoderCache:
    """Encoder outputs by item hash, least recently used first out, bounded in rows."""

    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self.num_tokens = 0
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def holds(self, key: str) -> bool:
        """Whether ``key`` is cached, without counting a hit or a miss or refreshing it."""
        return key in self.entries

    def get(self, key: str) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: torch.Tensor) -> None:
        if key in self.entries or value.shape[0] > self.capacity_tokens:
            return
        self.entries[key] = value
        self.num_tokens += value.shape[0]
        while self.num_tokens > self.capacity_tokens:
            _, evicted = self.entries.popitem(last=False)
            self.num_tokens -= evicted.shape[0]


class EncoderRunner:
    """Runs a vision-language model's encoder (``model.encode``) for the model runner, behind an
    encoder cache keyed by item hash."""

    def __init__(self, model: torch.nn.Module, cache_tokens: int) -> None:
        self.model = model
        self.cache = EncoderCache(cache_tokens)
        self.num_encoded_items = 0

    def encode_pending(self, chunks: list[ScheduledChunk]) -> dict[Sequence, str]:
        """Encode the items this step's chunks reach that neither their sequence nor the
        encoder cache holds, all in one call. A sequence keeps its items' outputs until their
        placeholders are all computed, so chunked prefill slices one encoding.

        Returns the sequences whose items could not be encoded, with the reason; the batch is
        retried item by item first so one bad image fails only its own request."""
        pending: dict[str, tuple[MultiModalInput, list[Sequence]]] = {}
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            for item in seq.mm_items:
                if item.offset >= end or item.end <= start or item.hash in seq.encoder_outputs:
                    continue
                if item.hash in pending:
                    pending[item.hash][1].append(seq)
                    continue
                cached = self.cache.get(item.hash)
                if cached is not None:
                    seq.encoder_outputs[item.hash] = cached
                else:
                    pending[item.hash] = (item, [seq])
        if not pending:
            return {}
        entries = list(pending.values())
        failed: dict[Sequence, str] = {}
        try:
            outputs: list[torch.Tensor | str] = list(self._encode([item for item, _ in entries]))
        except Exception:  # noqa: BLE001 - retried item by item to find the bad one
            outputs = []
            for item, _ in entries:
                try:
                    outputs.extend(self._encode([item]))
                except Exception as exc:  # noqa: BLE001 - fails only this item's requests
                    outputs.append(f"cannot encode image: {exc}")
        for (item, seqs), output in zip(entries, outputs):
            if isinstance(output, str):
                failed.update((seq, output) for seq in seqs)
                continue
            self.cache.put(item.hash, output)
            for seq in seqs:
                seq.encoder_outputs[item.hash] = output
        return failed

    @torch.inference_mode()
    def _encode(self, items: list[MultiModalInput]) -> list[torch.Tensor]:
        outputs = self.model.encode(items)
        self.num_encoded_items += len(items)
        for item, output in zip(items, outputs):
            if output.shape != (item.num_tokens, self.model.embed_width):
                raise ValueError(f"the encoder gave shape {tuple(output.shape)} for an item of "
                                 f"{item.num_tokens} placeholder tokens")
        return outputs

    @staticmethod
    def embeds(chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """Encoder output for every placeholder token the chunks compute, in step order (after
        encode_pending)."""
        parts: list[torch.Tensor] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.start + chunk.num_tokens
            for item in seq.mm_items:
                lo, hi = max(start, item.offset), min(end, item.end)
                if lo < hi:
                    parts.append(seq.encoder_outputs[item.hash][lo - item.offset:hi - item.offset])
        return torch.cat(parts) if parts else None

    def encoded_embeds(self, chunks: list[ScheduledChunk]) -> torch.Tensor | None:
        """encode_pending, then embeds; a ValueError names the first item that failed."""
        failed = self.encode_pending(chunks)
        if failed:
            raise ValueError(next(iter(failed.values())))
        return self.embeds(chunks)
