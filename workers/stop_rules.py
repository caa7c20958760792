"""When a sequence ends: its stop and end-of-sequence tokens, and its length limits."""

from __future__ import annotations

from workers.sequence import Sequence


def finish_reason(seq: Sequence, token: int, num_tokens: int, max_model_len: int) -> str | None:
    """Why seq ends with `token` as its token number num_tokens (None: it goes on)."""
    p = seq.params
    num_output_tokens = num_tokens - seq.num_prompt_tokens
    if num_output_tokens >= p.min_tokens:
        if token in seq.stop_token_ids or (token in seq.eos_token_ids and not p.ignore_eos):
            return "stop"
    if seq.grammar is not None and seq.grammar.is_complete(seq.token_ids, seq.num_prompt_tokens, seq.eos_token_ids):
        return "stop"
    if ends_by_length(seq, num_tokens, max_model_len):
        return "length"
    return None


def ends_by_length(seq: Sequence, num_tokens: int, max_model_len: int) -> bool:
    """seq reaches max_tokens or max_model_len with num_tokens tokens."""
    return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= max_model_len
