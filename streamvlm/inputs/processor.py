"""Turns user prompts into token ids and checks them against the model's limits."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from streamvlm.contract.config import EngineConfig, check_resolved
from streamvlm.inputs.chat import (ChatEncoder, check_role, check_template_kwargs, check_tool_fields,
                                   check_tools, encode_bounded, field_texts, message_texts, other_texts,
                                   template_tool_calls)
from streamvlm.inputs.chat_template import load_chat_template
from streamvlm.inputs.multimodal import ImageRef, MultiModalPreparer, image_ref, is_media_part, parse_media_part
from streamvlm.contract.model_source import ModelSource
from streamvlm.contract.protocol import MultiModalItem
from streamvlm.contract.sampling import MAX_BAD_WORD_TOKENS, SamplingParams

TOKENIZER_CACHE = os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "streamvlm", "tokenizers")

Prompt = str | dict[str, Any]
Message = dict[str, Any]


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None) -> Any:
    from transformers import AutoTokenizer

    if tokenizer_path:
        return AutoTokenizer.from_pretrained(tokenizer_path)
    if source.kind == "hf":
        return AutoTokenizer.from_pretrained(source.path)
    # Building a tokenizer from GGUF metadata takes seconds; keep the result as tokenizer.json.
    stat = os.stat(source.path)
    cache = os.path.join(TOKENIZER_CACHE, f"{os.path.basename(source.path)}-{stat.st_size}-"
                                          f"{int(stat.st_mtime)}")
    if os.path.exists(os.path.join(cache, "tokenizer_config.json")):
        return AutoTokenizer.from_pretrained(cache)
    tokenizer = AutoTokenizer.from_pretrained(source.folder,
                                              gguf_file=os.path.basename(source.path))
    try:
        tokenizer.save_pretrained(cache)
    except OSError:
        pass  # a read-only home only costs the next start a few seconds
    return tokenizer


@dataclass
class PreparedPrompt:
    """A prompt ready for a worker: token ids with image placeholders expanded, and the
    items that fill them. ``engine.stream`` accepts one as its prompt."""

    prompt_token_ids: list[int]
    mm_items: list[MultiModalItem] = field(default_factory=list)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


class InputProcessor:
    def __init__(self, config: EngineConfig, source: ModelSource) -> None:
        self.tokenizer = (None if config.model.skip_tokenizer_init
                          else load_tokenizer(source, config.model.tokenizer))
        if config.model.chat_template is not None:
            if self.tokenizer is None:
                raise ValueError("chat_template needs a tokenizer (skip_tokenizer_init is set)")
            # Everything that renders chats reads the tokenizer's template, so it is replaced there.
            self.tokenizer.chat_template = load_chat_template(config.model.chat_template)
        hf_config = source.text_config
        self.vocab_size = int(hf_config["vocab_size"])
        check_resolved(config)
        self.max_model_len: int = config.model.max_model_len
        self.multimodal = MultiModalPreparer(config, source, self.max_model_len)
        self.chat = (None if self.tokenizer is None
                     else ChatEncoder(self.tokenizer, config.limits.allow_special_tokens_in_content))
        self.max_prompt_bytes: int = config.limits.max_prompt_bytes
        self.max_stop_strings = config.limits.max_stop_strings
        self.max_stop_length = config.limits.max_stop_length
        eos: list[int] = []
        for value in (source.generation_config().get("eos_token_id"),
                      hf_config.get("eos_token_id"),
                      self.tokenizer.eos_token_id if self.tokenizer else None):
            eos.extend(t for t in _as_id_list(value) if t not in eos)
        self.eos_token_ids = eos

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        ids, refs = self.split_prompt(prompt)
        if refs:
            raise ValueError("this prompt has images: use the engine's prepare_prompt")
        return ids

    def split_prompt(self, prompt: Prompt | Sequence[Message],
                     chat_template_kwargs: dict[str, Any] | None = None,
                     tools: list[dict[str, Any]] | None = None
                     ) -> tuple[list[int], list[ImageRef]]:
        """Token ids (placeholders not yet expanded) and the images, in prompt order."""
        if isinstance(prompt, (list, tuple)):
            return self.render_chat(prompt, chat_template_kwargs, tools)
        if chat_template_kwargs or tools:
            raise ValueError("chat_template_kwargs and tools apply to chat messages only")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            self._need_tokenizer()
            self._check_prompt_bytes([prompt], "prompt")
            return encode_bounded(self.tokenizer.encode, prompt, self.max_model_len), []
        if not isinstance(prompt, dict):
            raise ValueError("a prompt is a string, a list of chat messages, {'prompt': str} or "
                             "{'prompt_token_ids': [...]}, optionally with 'images'")
        images = prompt.get("images") or []
        if not isinstance(images, (list, tuple)):
            raise ValueError("'images' must be a list")
        refs = [image_ref(value) for value in images]
        self.multimodal.check_count(refs)
        if "prompt_token_ids" in prompt:
            ids = prompt["prompt_token_ids"]
            if not isinstance(ids, list):
                raise ValueError("prompt_token_ids must be a list of integers")
            self._check_context(len(ids))
            if not all(isinstance(t, int) for t in ids):
                raise ValueError("prompt_token_ids must be a list of integers")
            return list(ids), refs
        if "prompt" in prompt and isinstance(prompt["prompt"], str):
            ids, _ = self.split_prompt(prompt["prompt"])
            return ids, refs
        raise ValueError("a prompt is a string, a list of chat messages, {'prompt': str} or "
                         "{'prompt_token_ids': [...]}, optionally with 'images'")

    def render_chat(self, messages: Sequence[Message],
                    chat_template_kwargs: dict[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None
                    ) -> tuple[list[int], list[ImageRef]]:
        messages, refs, kwargs = self._chat_input(messages, chat_template_kwargs, tools)
        return self.chat.encode(messages, self.max_model_len, kwargs), refs

    def chat_text(self, messages: Sequence[Message],
                  chat_template_kwargs: dict[str, Any] | None = None,
                  tools: list[dict[str, Any]] | None = None) -> str:
        """The conversation as the chat template writes it (images as their placeholder text)."""
        messages, _, kwargs = self._chat_input(messages, chat_template_kwargs, tools)
        return self.chat.render(messages, kwargs)

    def _chat_input(self, messages: Sequence[Message], chat_template_kwargs: dict[str, Any] | None,
                    tools: list[dict[str, Any]] | None = None
                    ) -> tuple[list[Message], list[ImageRef], dict[str, Any]]:
        """The messages as the template takes them, their images, and the checked kwargs (with
        ``tools``, when given, as the template's ``tools`` variable)."""
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValueError("a conversation is a non-empty list of messages")
        kwargs = check_template_kwargs(chat_template_kwargs) if chat_template_kwargs else {}
        if tools:
            kwargs = {**kwargs, "tools": check_tools(tools)}
        refs: list[ImageRef] = []
        messages = [self._template_message(m, i, refs) for i, m in enumerate(messages)]
        self.multimodal.check_count(refs)
        self._need_tokenizer()
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template")
        self._check_prompt_bytes([t for m in messages for t in (*message_texts(m), *other_texts(m))]
                                 + field_texts(kwargs.get("tools")), "message text")
        return messages, refs, kwargs

    @staticmethod
    def _template_message(message: Message, index: int, refs: list[ImageRef]) -> Message:
        """The message as the chat template takes it: text parts joined into one string, or,
        with images, Hugging Face parts ({"type": "text"} / {"type": "image"}); the images go
        to refs in order. Other fields (tool_calls, tool_call_id, name) pass through."""
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError("each message needs a 'role' and 'content'")
        if "content" not in message:
            if "tool_calls" not in message:
                raise ValueError("each message needs a 'role' and 'content'")
            message = {**message, "content": None}
        check_role(message, index)
        check_tool_fields(message, index)
        if message.get("tool_calls"):
            message = {**message, "tool_calls": template_tool_calls(message["tool_calls"])}
        content = message["content"]
        if content is None or isinstance(content, str):
            return message
        if not isinstance(content, list):
            raise ValueError(f"messages[{index}].content must be a string or a list of content "
                             f"parts, got a value of type {type(content).__name__}")
        parts: list[dict[str, str]] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif is_media_part(part):
                refs.append(parse_media_part(part))
                parts.append({"type": "image"})
            else:
                shown = repr(kind[:40]) if isinstance(kind, str) else type(kind).__name__
                raise ValueError(f"unsupported content part {shown}: expected 'text', "
                                 f"'image_url', 'image', 'image_embeds' or 'image_features'")
        if all(p["type"] == "text" for p in parts):
            return {**message, "content": "".join(p["text"] for p in parts)}
        return {**message, "content": parts}

    def _need_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError("skip_tokenizer_init is set: pass {'prompt_token_ids': [...]}")

    def _check_prompt_bytes(self, texts: list[str], what: str) -> None:
        """Refuses text that cannot fit the context before it is tokenized: tokenizing megabytes
        takes seconds and gigabytes."""
        # Characters bound bytes from below, so that huge text is refused without encoding it.
        size = sum(len(t) for t in texts)
        if size <= self.max_prompt_bytes:
            size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
        if size > self.max_prompt_bytes:
            raise ValueError(f"{what} is over {self.max_prompt_bytes} bytes (max_prompt_bytes), "
                             f"more than max_model_len={self.max_model_len} tokens can hold")

    def _check_context(self, num_tokens: int) -> None:
        if num_tokens >= self.max_model_len:
            raise ValueError(f"prompt has {num_tokens} tokens; max_model_len="
                             f"{self.max_model_len} leaves no room to generate")

    def validate_params(self, params: SamplingParams) -> None:
        """The checks of ``validate`` that need no prompt: cheap, so callers may run them before
        preparing the prompt."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if self.tokenizer is None and params.stop:
            raise ValueError("stop strings need a tokenizer (skip_tokenizer_init is set)")
        if len(params.stop) > self.max_stop_strings:
            raise ValueError(f"stop has {len(params.stop)} strings; max_stop_strings is "
                             f"{self.max_stop_strings}")
        longest = max(map(len, params.stop), default=0)
        if longest > self.max_stop_length:
            raise ValueError(f"a stop string has {longest} characters; max_stop_length is "
                             f"{self.max_stop_length}")
        bad = [t for t in params.logit_bias if t >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        bad = [t for ids in params.bad_words_token_ids for t in ids if t >= self.vocab_size]
        if bad:
            raise ValueError(f"bad_words_token_ids token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        if self.tokenizer is None and params.bad_words:
            raise ValueError("bad_words need a tokenizer (skip_tokenizer_init is set)")

    def resolve_bad_words(self, params: SamplingParams) -> SamplingParams:
        """``params`` with its bad_words as token-id sequences (each word as it tokenizes alone
        and after a space, the two ways it can appear in text), for the worker's sampler."""
        if not params.bad_words:
            return params
        sequences = [list(ids) for ids in params.bad_words_token_ids]
        for word in params.bad_words:
            for text in (word, " " + word):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in sequences:
                    sequences.append(ids[-MAX_BAD_WORD_TOKENS:])
        return msgspec.structs.replace(params, bad_words=[], bad_words_token_ids=sequences)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.validate_params(params)
        if not prompt_token_ids:
            raise ValueError("prompt is empty")
        self._check_context(len(prompt_token_ids))
        bad = [t for t in prompt_token_ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
