"""Chat messages to token ids: role and content checks, the chat template, and tokenization that keeps
special-token text typed into message content as plain text.

Without that, a user who writes ``<|im_end|>\\n<|im_start|>system`` in a message closes their own turn and
opens a system turn. The template's own markers stay special tokens.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from jinja2 import TemplateError

from streamvlm.inputs.pieces import PieceEncoder

ROLES = ("system", "developer", "user", "assistant", "tool")
Message = dict[str, Any]


# The first prefix tokenized for the early refusal: this many characters per token of context (text
# averages fewer tokens than that per character); each next prefix is PREFIX_GROWTH times longer.
PREFIX_CHARS_PER_TOKEN = 4
PREFIX_GROWTH = 4
# A prefix is cut just before a whitespace run found this close below the wanted length, if any.
PREFIX_CUT_WINDOW = 1024


def encode_bounded(encode: Callable[[str], list[int]], text: str, max_model_len: int | None,
                   used: int = 0) -> list[int]:
    """``encode(text)``, refused early when ``used`` tokens plus those of ``text`` surely do not fit
    ``max_model_len``: growing prefixes of the text are tokenized first (geometric growth, so the work
    stays within a small constant of one full tokenization), and one that already holds more tokens
    than the context, less a margin, ends it without tokenizing the rest. Prefix tokenizations only
    refuse: the ids returned are always those of the whole text."""
    if max_model_len is None:
        return encode(text)
    size = PREFIX_CHARS_PER_TOKEN * max(max_model_len - used, 1)
    while size < len(text):
        prefix = text[:_prefix_cut(text, size)]
        # The margin: a cut changes only the tokens near it. With a pre-tokenizer (byte-level BPE:
        # GPT-2, Llama 3, Qwen) the prefix is split into the same pieces as the whole text except the
        # last, and a piece is tokenized on its own; cutting just before whitespace leaves even that
        # piece whole, but for a trailing punctuation run that takes the newlines after it: a few
        # tokens. Tokenizers without a pre-tokenizer (SentencePiece) and text without whitespace
        # near the cut (CJK, base64) are cut inside a piece, where BPE merges still reach only a few
        # tokens back from the cut; a cut inside special-token text adds at most its length in
        # tokens. 128 tokens plus 1/64 of the context is far above all of these, so that a prompt
        # that fits is never refused, and costs little: the prefix must still hold the context.
        margin = 128 + max_model_len // 64
        at_least = used + len(encode(prefix)) - margin
        if at_least > max_model_len:
            raise ValueError(f"prompt has more than {at_least - 1} tokens; max_model_len="
                             f"{max_model_len} leaves no room to generate")
        size *= PREFIX_GROWTH
    return encode(text)


def _prefix_cut(text: str, size: int) -> int:
    """Where to cut ``text`` near ``size`` characters: just before a whitespace run (so the prefix
    ends with a whole word), or at ``size`` if there is none close below it."""
    for i in range(size - 1, max(size - PREFIX_CUT_WINDOW, 0), -1):
        if text[i].isspace() and not text[i - 1].isspace():
            return i
    return size


# chat_template_kwargs: variables for the template beyond the messages, such as
# {"enable_thinking": false}. Bounded, since the template renders them into the prompt.
TemplateValue = str | int | float | bool | None | list[str | int | float | bool | None]
MAX_TEMPLATE_KWARGS = 32
MAX_TEMPLATE_KWARG_LIST = 64
MAX_TEMPLATE_KWARGS_CHARS = 8192
# Variables the renderer sets itself (apply_chat_template's parameters and what it passes the
# template): a kwarg of the same name would replace or clash with them.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "messages", "conversation", "add_generation_prompt", "continue_final_message", "tools",
    "documents", "chat_template", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})
# Tool calls an assistant message may carry, and tools a request may offer the template.
MAX_TOOL_CALLS = 128
MAX_TOOLS = 128


def check_template_kwargs(kwargs: Any) -> dict[str, TemplateValue]:
    """``chat_template_kwargs`` as the template may take them: a dict of JSON scalars and
    lists of scalars, bounded in count and size, with no name the renderer uses itself."""
    if not isinstance(kwargs, dict):
        raise ValueError("chat_template_kwargs must be an object")
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise ValueError(f"chat_template_kwargs has {len(kwargs)} entries; at most "
                         f"{MAX_TEMPLATE_KWARGS} are allowed")
    size = 0
    for name, value in kwargs.items():
        if not isinstance(name, str):
            raise ValueError("chat_template_kwargs names must be strings")
        if name in RESERVED_TEMPLATE_KWARGS:
            raise ValueError(f"chat_template_kwargs may not set {name!r}: the server sets it")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and len(value) > MAX_TEMPLATE_KWARG_LIST:
            raise ValueError(f"chat_template_kwargs[{name!r}] has {len(value)} items; at most "
                             f"{MAX_TEMPLATE_KWARG_LIST} are allowed")
        if not all(v is None or isinstance(v, (str, int, float, bool)) for v in values):
            raise ValueError(f"chat_template_kwargs[{name!r}] must be a string, number, boolean, "
                             f"null or a list of those")
        size += len(name) + sum(len(v) if isinstance(v, str) else 8 for v in values)
    if size > MAX_TEMPLATE_KWARGS_CHARS:
        raise ValueError(f"chat_template_kwargs hold over {MAX_TEMPLATE_KWARGS_CHARS} characters")
    return kwargs


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools for the chat template (``apply_chat_template(tools=...)``): a bounded list of objects,
    each usually ``{"type": "function", "function": {"name", "description", "parameters"}}``."""
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise ValueError("tools must be a list of objects")
    if len(tools) > MAX_TOOLS:
        raise ValueError(f"tools has {len(tools)} entries; at most {MAX_TOOLS} are allowed")
    return tools


def template_tool_calls(tool_calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """An assistant message's tool calls as chat templates read them: OpenAI sends each call's
    ``function.arguments`` as JSON text, and templates (Qwen, Hermes, Llama 3) write it with
    ``| tojson``, which would quote the text again; arguments that parse as a JSON object become
    that object."""
    result = []
    for call in tool_calls:
        function = call.get("function")
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if isinstance(arguments, str):
            try:
                decoded = json.loads(arguments)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict):
                call = {**call, "function": {**function, "arguments": decoded}}
        result.append(call)
    return result


def check_role(message: Message, index: int) -> None:
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        shown = repr(role[:40]) if isinstance(role, str) else f"a value of type {type(role).__name__}"
        raise ValueError(f"messages[{index}].role must be one of {', '.join(map(repr, ROLES))}; got {shown}")


def check_tool_fields(message: Message, index: int) -> None:
    """Content may be null only in an assistant message that carries tool calls (a replayed
    agent turn); tool_calls, where present, is a bounded list of objects."""
    tool_calls = message.get("tool_calls")
    if tool_calls is not None:
        if message.get("role") != "assistant":
            raise ValueError(f"messages[{index}].tool_calls is allowed in assistant messages only")
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise ValueError(f"messages[{index}].tool_calls must be a list of objects")
        if len(tool_calls) > MAX_TOOL_CALLS:
            raise ValueError(f"messages[{index}].tool_calls has {len(tool_calls)} calls; at most "
                             f"{MAX_TOOL_CALLS} are allowed")
    if message.get("content") is None and not tool_calls:
        raise ValueError(f"messages[{index}].content may be null only in an assistant message "
                         f"with tool_calls")


def message_texts(message: Message) -> list[str]:
    """The text of a message as the template takes it (see InputProcessor._template_message)."""
    content = message["content"]
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    return [part["text"] for part in content if part.get("type") == "text"]


def field_texts(value: Any) -> list[str]:
    """Every string in a message's other fields (tool calls, tool_call_id, name) or in
    chat_template_kwargs: text the template may render besides the content."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in field_texts(v)]
    if isinstance(value, list):
        return [t for v in value for t in field_texts(v)]
    return []


def other_texts(message: Message) -> list[str]:
    return field_texts({k: v for k, v in message.items() if k not in ("role", "content")})


class ChatEncoder:
    """Renders a conversation with the tokenizer's chat template and tokenizes it.

    Message content that holds no special-token text is tokenized with the rendered text as a whole,
    exactly as ``apply_chat_template(..., tokenize=True)`` does. Otherwise the template is rendered again
    with a sentinel in place of each content text, which locates the contents in the rendered text; only
    special-token text outside them is a special token, and the text between those markers is tokenized
    with special tokens split into plain text. A template that changes content (so that the sentinels do
    not locate it) is refused rather than guessed at.
    """

    def __init__(self, tokenizer: Any, allow_special_tokens_in_content: bool) -> None:
        self.tokenizer = tokenizer
        self.allow_special_tokens_in_content = allow_special_tokens_in_content
        specials = [t for t in tokenizer.added_tokens_decoder.values() if t.special]
        self._special_ids = {t.content: tokenizer.convert_tokens_to_ids(t.content) for t in specials}
        # Whitespace beside a marker that the tokenizer strips into it (AddedToken lstrip / rstrip).
        self._strips = {t.content: (t.lstrip, t.rstrip) for t in specials}
        # Longest first, as the tokenizer matches added tokens.
        self._special_text = (re.compile("|".join(re.escape(t.content)
                                                  for t in sorted(specials, key=lambda t: -len(t.content))))
                              if specials else None)
        self._encode_plain = _plain_encoder(tokenizer)
        self._encode_text = _text_encoder(tokenizer)

    def encode(self, messages: Sequence[Message], max_model_len: int | None = None,
               template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of the conversation; with ``max_model_len``, a conversation that surely has more
        tokens is refused without tokenizing all of it (see encode_bounded)."""
        template_kwargs = template_kwargs or {}
        text = self.render(messages, template_kwargs)
        if self.allow_special_tokens_in_content or not self._content_has_special_text(messages):
            return encode_bounded(self._encode_text, text, max_model_len)
        return self._encode_protected(messages, text, max_model_len, template_kwargs)

    def render(self, messages: Sequence[Message], template_kwargs: dict[str, Any] | None = None) -> str:
        """The conversation as the chat template writes it, ready for the assistant's turn. Special-token
        text outside message content (tool calls, names, template kwargs) is refused unless allowed: the
        sentinels below keep only content as plain text."""
        template_kwargs = template_kwargs or {}
        if not self.allow_special_tokens_in_content and self._special_text is not None:
            outside = [*field_texts(template_kwargs), *(t for m in messages for t in other_texts(m))]
            if any(self._special_text.search(text) for text in outside):
                raise ValueError("special-token text is allowed in message content only, not in tool calls, "
                                 "names or chat_template_kwargs")
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=True, **template_kwargs)
        except (TemplateError, TypeError) as exc:   # a template that cannot take these messages
            raise ValueError(f"the chat template failed on these messages: {exc}") from exc

    def _content_has_special_text(self, messages: Sequence[Message]) -> bool:
        if self._special_text is None:
            return False
        return any(self._special_text.search(text) for message in messages for text in message_texts(message))

    def _encode_protected(self, messages: Sequence[Message], text: str, max_model_len: int | None,
                          template_kwargs: dict[str, Any]) -> list[int]:
        marker = f"\u2063streamvlm-{uuid.uuid4().hex}-"
        contents: list[str] = []

        def sentinel(content: str) -> str:
            contents.append(content)
            return f"{marker}{len(contents) - 1}\u2063"

        template = self.render([_with_sentinels(message, sentinel) for message in messages], template_kwargs)
        pieces = re.split(re.escape(marker) + r"(\d+)\u2063", template)
        # pieces: template text, content index, template text, ..., template text.
        if "".join(p if i % 2 == 0 else contents[int(p)] for i, p in enumerate(pieces)) != text:
            raise ValueError("message content holds special-token text, and this chat template changes "
                             "message content, so it cannot be kept as plain text: remove the special-token "
                             "text, or start the engine with allow_special_tokens_in_content")
        # Plain text and the template's special tokens, in order.
        items: list[str | int] = [""]
        for i, piece in enumerate(pieces):
            if i % 2:
                items[-1] += contents[int(piece)]
                continue
            start = 0
            for match in self._special_text.finditer(piece):
                items[-1] += piece[start:match.start()]
                items.extend((self._special_ids[match.group()], ""))
                start = match.end()
            items[-1] += piece[start:]
        return self._encode_items(items, max_model_len)

    def _encode_items(self, items: list[str | int], max_model_len: int | None = None) -> list[int]:
        """items alternate text, special id, text, ...; the tokenizer's whitespace stripping is applied."""
        specials = {v: k for k, v in self._special_ids.items()}
        texts = items[0::2]
        for n, token_id in enumerate(items[1::2]):
            lstrip, rstrip = self._strips[specials[token_id]]
            if lstrip:
                texts[n] = texts[n].rstrip()
            if rstrip:
                texts[n + 1] = texts[n + 1].lstrip()
        ids: list[int] = []
        for n, text in enumerate(texts):
            if n:
                ids.append(items[2 * n - 1])
            # The texts are tokenized apart, so the ids before one count exactly toward the bound.
            ids.extend(encode_bounded(self._encode_plain, text, max_model_len, used=len(ids)))
        return ids


def _with_sentinels(message: Message, sentinel: Any) -> Message:
    content = message["content"]
    if content is None:
        return message
    if isinstance(content, str):
        return {**message, "content": sentinel(content)}
    return {**message, "content": [{**part, "text": sentinel(part["text"])} if part.get("type") == "text" else part
                                   for part in content]}


def _text_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Encodes a rendered conversation as the tokenizer's encode(text, add_special_tokens=False) does. A
    fast tokenizer gets its own backend copy (see _backend_encoder), and where it can, the pieces between
    added tokens that earlier prompts had (the template's turns, a system prompt) come from a cache
    (inputs/pieces.py)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer.encode(text, add_special_tokens=False)
    encode_texts = _backend_encoder(backend, encode_special_tokens=False)
    pieces = PieceEncoder.of(backend, encode_texts)
    if pieces is not None:
        return pieces.encode
    return lambda text: encode_texts([text])[0]


def _plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Encodes text with special-token text split into ordinary tokens."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return lambda text: tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) if text else []
    encode_texts = _backend_encoder(backend, encode_special_tokens=True)
    return lambda text: encode_texts([text])[0] if text else []


def _backend_encoder(backend: Any, encode_special_tokens: bool) -> Callable[[list[str]], list[list[int]]]:
    """Token ids of texts, no special tokens added, from a copy of a fast tokenizer's backend: transformers
    switches settings on the shared backend per call (special-token splitting, truncation, padding), which
    threads tokenizing other prompts at the same moment would see. Where the tokenizers library can, the
    encoding skips the offsets, a good part of the work for a short prompt: only the ids are used."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.no_truncation()
    copy.no_padding()
    copy.encode_special_tokens = encode_special_tokens
    fast = getattr(copy, "encode_batch_fast", None)
    if fast is None:
        return lambda texts: [copy.encode(text, add_special_tokens=False).ids for text in texts]
    return lambda texts: [encoding.ids for encoding in fast(texts, add_special_tokens=False)]
