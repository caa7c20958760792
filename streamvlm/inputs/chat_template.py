"""``chat_template``: a Jinja chat template in place of the tokenizer's, given as a file or as
the template text itself (vLLM's ``--chat-template`` takes both)."""

from __future__ import annotations

import os

# Real chat templates are a few KiB; a larger file is almost surely the wrong one.
MAX_CHAT_TEMPLATE_BYTES = 1 << 20


def load_chat_template(value: str) -> str:
    """The template text: ``value`` itself when it holds Jinja (``{{`` or ``{%``), else the
    content of the file it names; ValueError when that file is missing, unreadable, too large
    or not UTF-8."""
    if "{{" in value or "{%" in value:
        return value
    path = os.path.expanduser(value)
    if not os.path.isfile(path):
        raise ValueError(f"chat_template {value!r}: no such file (and not a Jinja template)")
    size = os.path.getsize(path)
    if size > MAX_CHAT_TEMPLATE_BYTES:
        raise ValueError(f"chat_template {value!r}: {size} bytes, more than the "
                         f"{MAX_CHAT_TEMPLATE_BYTES} a chat template may have")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ValueError(f"chat_template {value!r}: cannot read it: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ValueError(f"chat_template {value!r}: not UTF-8 text") from exc
    if not text.strip():
        raise ValueError(f"chat_template {value!r}: the file is empty")
    return text
