"""Logprobs in the shapes of the OpenAI API: chat's ``content`` list, completions' columns
(``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``, where echo puts the prompt's
first), and vLLM's ``prompt_logprobs`` (one entry per prompt token, null for the first)."""

from __future__ import annotations

from typing import Any

from streamvlm.contract.protocol import PromptLogprobs, TokenLogprobs


def token_text(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id]) if tokenizer is not None else str(token_id)


def chat_logprobs(tokenizer: Any, token_ids: list[int],
                  logprobs: list[TokenLogprobs] | None) -> dict[str, Any] | None:
    if logprobs is None:
        return None
    content = []
    for token_id, lp in zip(token_ids, logprobs):
        text = token_text(tokenizer, token_id)
        content.append({
            "token": text, "logprob": lp.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": (t := token_text(tokenizer, i)), "logprob": v,
                              "bytes": list(t.encode())}
                             for i, v in zip(lp.top_token_ids, lp.top_logprobs)],
        })
    return {"content": content}


def completion_logprobs(tokenizer: Any, token_ids: list[int],
                        logprobs: list[TokenLogprobs] | None, offset: int,
                        echoed: CompletionLogprobs | None = None) -> dict[str, Any] | None:
    """Completions' logprobs of the output tokens, text offsets counted from ``offset``, after
    the ``echoed`` prompt's (echo with logprobs)."""
    if logprobs is None:
        return None
    columns = echoed.copy() if echoed is not None else CompletionLogprobs()
    columns.add_output(tokenizer, token_ids, logprobs, offset)
    return columns.as_json()


class CompletionLogprobs:
    """Completions' logprob columns, built token by token."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def copy(self) -> CompletionLogprobs:
        out = CompletionLogprobs()
        out.tokens, out.token_logprobs = list(self.tokens), list(self.token_logprobs)
        out.top_logprobs, out.text_offset = list(self.top_logprobs), list(self.text_offset)
        return out

    def _add(self, text: str, logprob: float | None, top: dict[str, float] | None, offset: int) -> None:
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(top)
        self.text_offset.append(offset)

    def add_output(self, tokenizer: Any, token_ids: list[int], logprobs: list[TokenLogprobs],
                   offset: int) -> None:
        for token_id, lp in zip(token_ids, logprobs):
            text = token_text(tokenizer, token_id)
            self._add(text, lp.logprob, {token_text(tokenizer, i): v
                                         for i, v in zip(lp.top_token_ids, lp.top_logprobs)}, offset)
            offset += len(text)

    @classmethod
    def of_prompt(cls, tokenizer: Any, prompt_token_ids: list[int],
                  prompt_logprobs: PromptLogprobs | None) -> CompletionLogprobs:
        """The echoed prompt's columns: its first token has no logprob (null)."""
        out, offset = cls(), 0
        for position, token_id in enumerate(prompt_token_ids):
            text = token_text(tokenizer, token_id)
            i = position - (prompt_logprobs.first_position if prompt_logprobs is not None else 1)
            if prompt_logprobs is None or not 0 <= i < len(prompt_logprobs):
                out._add(text, None, None, offset)
            else:
                out._add(text, prompt_logprobs.token_logprobs[i],
                         {token_text(tokenizer, t): v for t, v in
                          zip(prompt_logprobs.top_token_ids[i], prompt_logprobs.top_logprobs[i])},
                         offset)
            offset += len(text)
        return out

    def as_json(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}


def vllm_prompt_logprobs(tokenizer: Any, prompt_token_ids: list[int],
                         prompt_logprobs: PromptLogprobs) -> list[dict[str, Any] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token, null for the first, else a map from token id
    to ``{"logprob", "rank", "decoded_token"}`` holding the prompt token and its top alternatives
    (ranks 1, 2, ... by logprob)."""
    out: list[dict[str, Any] | None] = [None] * prompt_logprobs.first_position
    for i in range(len(prompt_logprobs)):
        token_id = prompt_token_ids[prompt_logprobs.first_position + i]
        entry = {str(t): {"logprob": v, "rank": rank, "decoded_token": token_text(tokenizer, t)}
                 for rank, (t, v) in enumerate(zip(prompt_logprobs.top_token_ids[i],
                                                   prompt_logprobs.top_logprobs[i]), start=1)}
        entry[str(token_id)] = {"logprob": prompt_logprobs.token_logprobs[i],
                                "rank": prompt_logprobs.ranks[i],
                                "decoded_token": token_text(tokenizer, token_id)}
        out.append(entry)
    return out
