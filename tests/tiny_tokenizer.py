"""A tiny byte-level BPE tokenizer with a ChatML template, built offline for tests.

It stands in for a real (Qwen-like) tokenizer beside tiny random checkpoints, whose vocab_size
is 512, so ``len(tokenizer)`` stays below that.
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
VOCAB_SIZE = 448  # 3 special + 256 byte tokens + 189 merges

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def vlm_chat_template(image_placeholder: str) -> str:
    """ChatML that writes ``image_placeholder`` for every image part (HF or OpenAI form), as
    the Qwen-VL and LLaVA templates do; the engine expands it to the image's token count."""
    return (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string %}{{- message['content'] }}"
        "{%- else %}{%- for part in message['content'] %}"
        "{%- if part['type'] == 'text' %}{{- part['text'] }}"
        "{%- elif part['type'] in ('image', 'image_url') %}{{- '" + image_placeholder + "' }}"
        "{%- endif %}"
        "{%- endfor %}{%- endif %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a small test of the tokenizer, and it should be fast.",
    "A language model reads tokens and writes tokens, one at a time, until it stops.",
    "What is the capital of France? The capital of France is Paris.",
    "There are many things in the world that we do not understand yet.",
    "She said that the weather would be nice tomorrow, so they went for a walk.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 appear in text too.",
    "Please describe the image in detail. The image shows a cat sitting on a red chair.",
    "You are a helpful assistant. Answer the question as well as you can.",
    "The engine schedules requests, runs the model, and streams the output text.",
    "def main():\n    print('hello, world')\n    return 0\n",
    "Punctuation: commas, periods; colons - dashes (and) [brackets] {braces}.",
    "héllo wörld, café, naïve, déjà vu, Ärger, Straße, smörgåsbord, façade",
    "日本語のテキストも少し含まれています。東京は日本の首都です。",
    "中文文本也在这里。你好，世界！",
    "Русский текст: привет, мир. Ελληνικά: γεια σου κόσμε.",
    "emoji 🙂 🙃 😀 🎉 👍 ❤️ 🚀 — and symbols like € £ ¥ © ™ → ≤ ≥ ∞",
]


def build_tiny_tokenizer(save_dir: str | os.PathLike, extra_special_tokens: list[str] = (),
                         chat_template: str = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Train the tokenizer on the built-in corpus, save it to ``save_dir`` and return it.

    ``extra_special_tokens`` (e.g. a VLM's ``<|image_pad|>``) get ids from VOCAB_SIZE on."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeating the corpus gives the frequent English merges clear counts over the rest.
    tokenizer.train_from_iterator(_CORPUS * 4, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", *extra_special_tokens],
        chat_template=chat_template,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    wrapped.save_pretrained(str(save_dir))
    return wrapped
