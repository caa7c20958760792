"""A request's state inside a worker: its tokens, its progress and its KV blocks."""

from __future__ import annotations

import enum

import numpy as np

from typing import TYPE_CHECKING

from streamvlm.contract.protocol import PromptLogprobs, TokenLogprobs
from streamvlm.contract.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from workers.multimodal import MultiModalInput
    from workers.request_timing import WorkerTimeline
    from workers.structured_output import RequestGrammar


# Async scheduling: the token a step in flight is still sampling; the next step reads it on the device.
PLACEHOLDER_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()
    # Disaggregated prefill/decode: a prefill group holds a computed prompt's blocks until the
    # decode group has them; a decode group holds reserved blocks until they arrive.
    HANDOFF = enum.auto()
    # Async scheduling: its last token is in flight and ends it (max_tokens, max_model_len, or a
    # hand-off), so it is no longer scheduled; it keeps its blocks until the token arrives.
    FINISHING = enum.auto()


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: list[int], arrival_index: int) -> None:
        self.request_id = request_id
        self.params = params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.arrival_index = arrival_index
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.status = SequenceStatus.WAITING
        # Tokens whose KV is in the cache; the rest are computed by upcoming steps.
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Blocks of block_table whose hash is registered with the prefix cache.
        self.num_registered_blocks = 0
        # Chained hashes of this sequence's full token blocks, a pure function of token_ids.
        self.block_hashes: list[bytes] = []
        self.num_preemptions = 0
        # New since the last step output was sent.
        self.pending_token_ids: list[int] = []
        self.pending_logprobs: list[TokenLogprobs] = []
        # Images (or precomputed embeddings) filling placeholder runs of the prompt, by offset.
        self.mm_items: list[MultiModalInput] = []
        # Encoder outputs of items whose placeholders are not all computed yet, by item hash.
        self.encoder_outputs: dict[str, torch.Tensor] = {}
        # M-RoPE models: the prompt's [3, P] positions; token i >= P sits at i + mrope_delta.
        self.mrope_positions: torch.Tensor | None = None
        self.mrope_delta = 0
        # "prefill": hand the KV to decode group kv_peer after the first token; "decode": the
        # prompt's KV arrives from a prefill group.
        self.kv_role = "mixed"
        self.kv_peer = -1
        self.kv_received_bytes = 0
        # Async scheduling: where the latest placeholder token sits, and its row among the sampled
        # tokens of the step that computes it.
        self.placeholder_position = -1
        self.placeholder_source = -1
        # Requests that collect timings: their moments until the first token.
        self.timeline: WorkerTimeline | None = None
        # Prompt logprobs (params.prompt_logprobs): the prompt positions whose logits have been
        # taken, and the values not yet sent (they go with the first token).
        self.prompt_logprobs_end = 0
        self.pending_prompt_logprobs: PromptLogprobs | None = None
        self.prompt_logprobs_sent = False
        # Structured output: the matcher that masks this request's logits (None: unconstrained).
        self.grammar: RequestGrammar | None = None
        # block_table as an int32 array, for step plans; remade when the table grows or is replaced.
        self._table_array: tuple[list[int], int, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def block_table_array(self) -> np.ndarray:
        cached = self._table_array
        table = self.block_table
        if cached is None or cached[0] is not table or cached[1] != len(table):
            cached = self._table_array = (table, len(table), np.array(table, dtype=np.int32))
        return cached[2]

    def block_extra_keys(self, start: int, end: int) -> tuple:
        """Keys besides token ids that identify the content of tokens [start, end): the hashes
        of the images whose placeholder tokens fall there (none for text)."""
        return tuple(item.hash for item in self.mm_items if item.offset < end and item.end > start)

    def release_encoder_outputs(self) -> None:
        """Drop encoder outputs whose placeholder tokens are all in the KV cache now."""
        for item in self.mm_items:
            if item.end <= self.num_computed_tokens:
                self.encoder_outputs.pop(item.hash, None)

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.token_ids.append(token_id)
        self.pending_token_ids.append(token_id)
        if logprobs is not None:
            self.pending_logprobs.append(logprobs)

    def append_placeholder(self, source_row: int) -> int:
        """Stand in for a token still being sampled (row source_row of its step); returns its position."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        self.placeholder_position = len(self.token_ids) - 1
        self.placeholder_source = source_row
        return self.placeholder_position

    def fill_placeholder(self, position: int, token_id: int, logprobs: TokenLogprobs | None) -> None:
        self.token_ids[position] = token_id
        self.pending_token_ids.append(token_id)
        if logprobs is not None:
            self.pending_logprobs.append(logprobs)

    @property
    def needs_whole_prompt(self) -> bool:
        """It asked for prompt logprobs not all taken yet: its prompt is computed, not taken
        from the prefix cache."""
        return (self.params.prompt_logprobs is not None
                and self.prompt_logprobs_end < self.num_prompt_tokens - 1)

    def skip_prompt_logprobs(self) -> None:
        """Another group reports this request's prompt logprobs (a decode group's request)."""
        self.prompt_logprobs_end = max(self.num_prompt_tokens - 1, 0)
        self.prompt_logprobs_sent = True

    def add_prompt_logprobs(self, values: PromptLogprobs) -> None:
        if self.pending_prompt_logprobs is None:
            self.pending_prompt_logprobs = values
        else:
            self.pending_prompt_logprobs.extend(values)

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        """The whole prompt's logprobs, once, when they are all taken (an empty set for a prompt
        of one token); None before and after."""
        if self.params.prompt_logprobs is None or self.prompt_logprobs_sent or self.needs_whole_prompt:
            return None
        self.prompt_logprobs_sent = True
        values, self.pending_prompt_logprobs = self.pending_prompt_logprobs, None
        return values if values is not None else PromptLogprobs()

    def take_pending(self) -> tuple[list[int], list[TokenLogprobs] | None]:
        token_ids, self.pending_token_ids = self.pending_token_ids, []
        logprobs, self.pending_logprobs = self.pending_logprobs, []
        return token_ids, (logprobs if self.params.logprobs else None)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={self.block_table})")
