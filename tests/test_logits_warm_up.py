"""Start-up runs the LM head once for every number of rows a step can sample (1 to max_num_seqs), so that no
step waits for a product shape's first use (on CUDA: loading its cuBLAS kernel)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from workers.model_runner import warm_up_logits


class RecordingHead:
    def __init__(self, hidden_size: int) -> None:
        self.args = SimpleNamespace(hidden_size=hidden_size)
        self.shapes: list[tuple[int, ...]] = []

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(hidden.shape))
        return hidden.new_zeros(hidden.shape[0], 11)


def test_every_row_count_up_to_max_num_seqs_once():
    head = RecordingHead(hidden_size=24)
    warm_up_logits(head, 37, torch.float32, torch.device("cpu"))
    assert head.shapes == [(rows, 24) for rows in range(1, 38)]


def test_one_row():
    head = RecordingHead(hidden_size=8)
    warm_up_logits(head, 1, torch.bfloat16, torch.device("cpu"))
    assert head.shapes == [(1, 8)]
