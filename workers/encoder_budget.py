"""The vision encoder's share of one step: how many image placeholder tokens the step may encode.

A burst of image requests would otherwise put every new image into one step, and every decoding
stream waits for that step. Items count whole (an item is encoded in one go, however its
placeholders are chunked), like vLLM's max_num_encoder_input_tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from workers.multimodal import MultiModalInput
    from workers.sequence import Sequence


def nothing_encoded(item_hash: str) -> bool:
    """For a scheduler without an encoder cache: no item is encoded before its step."""
    return False


class EncoderBudget:
    """One step's allowance of encoder tokens. An item costs nothing when its sequence holds its
    output, the encoder cache holds it (``is_encoded``) or an earlier chunk of this step encodes
    it. The step's first item always fits, however large, so that no image waits forever."""

    def __init__(self, num_tokens: int, is_encoded: Callable[[str], bool]) -> None:
        self.num_tokens_left = num_tokens
        self.is_encoded = is_encoded
        self.encoded_hashes: set[str] = set()

    def fit(self, seq: Sequence, start: int, num_tokens: int) -> tuple[int, list[MultiModalInput]]:
        """How many of the tokens [start, start + num_tokens) of seq may run this step: all, or
        those before the first item that does not fit. Also the items they make the step encode
        (spend them once the chunk is scheduled)."""
        end = start + num_tokens
        left = self.num_tokens_left
        new_items: list[MultiModalInput] = []
        for item in seq.mm_items:   # by offset
            if item.offset >= end:
                break
            if item.end <= start or not self._costs(seq, item, new_items):
                continue
            if item.num_tokens > left and (self.encoded_hashes or new_items):
                return max(item.offset - start, 0), new_items
            new_items.append(item)
            left -= item.num_tokens
        return num_tokens, new_items

    def spend(self, items: list[MultiModalInput]) -> None:
        for item in items:
            if item.hash not in self.encoded_hashes:
                self.encoded_hashes.add(item.hash)
                self.num_tokens_left -= item.num_tokens

    def _costs(self, seq: Sequence, item: MultiModalInput, new_items: list[MultiModalInput]) -> bool:
        return not (item.hash in seq.encoder_outputs or item.hash in self.encoded_hashes
                    or any(item.hash == other.hash for other in new_items)
                    or self.is_encoded(item.hash))
