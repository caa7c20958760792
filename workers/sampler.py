"""Per-request sampling over one batch of logits.

Order: penalties, logit_bias, bad words, banned tokens (min_tokens), then greedy rows take the argmax and the rest go
through temperature, top_k, top_p and min_p before a draw. A seeded request draws with noise seeded from
(seed, output position), so its output does not depend on the batch, on preemption, or on which process
samples it. Logprobs are a log-softmax of the raw logits.

On a GPU with Triton the draw is one kernel over the logits as the model produced them
(workers/kernels/sampling.py: Gumbel-max with the noise made in registers); a batch with nothing to
process or filter never makes a float32 copy of its logits. Elsewhere the same draw runs in torch,
with the noise from torch generators.
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass

import torch

from streamvlm.contract.protocol import TokenLogprobs
from workers.sequence import Sequence
from workers.structured_output import MaskBatch

_SEED_MIX = 0x9E3779B97F4A7C15


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


@dataclass
class PendingSample:
    """Sampled tokens still on their way to the host (launch() returned before the GPU finished)."""
    token_ids: torch.Tensor               # on the device
    host_ids: torch.Tensor | None         # pinned copy being filled (CUDA), None on CPU
    ready: torch.cuda.Event | None
    # Rows that asked for logprobs: the sampled tokens' logprobs [B] and the top alternatives [B, k] (values,
    # ids), on their way to the host with the tokens; None when no row asked.
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class Sampler:
    def __init__(self, device: torch.device, seed: int) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.request_generator = torch.Generator(device=device)
        # The fused draw's noise: a seed per unseeded row per step, from the host (no device round trip).
        self.step_seeds = random.Random(seed)
        self.fused_draw = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self.masks = MaskBatch(device)

    def warm_up(self, vocab: int, dtype: torch.dtype) -> None:
        """Compile the draw's kernels before serving (nothing to do for the torch draw)."""
        if self.fused_draw:
            from workers.kernels.sampling import warm_up
            warm_up(vocab, dtype, self.device)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        return self.finish(self.launch(logits, seqs), seqs)

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, seqs: list[Sequence]) -> PendingSample:
        """Queue the sampling of one token per row; nothing here waits for the device."""
        params = [s.params for s in seqs]
        raw_logprobs = (torch.log_softmax(logits.float(), dim=-1)
                        if any(p.logprobs for p in params) else None)
        if any(self._processes(seq) for seq in seqs):
            logits = logits.float()
            logits = self._apply_penalties(logits, seqs)
            logits = self._apply_logit_bias(logits, seqs)
            logits = self._ban_bad_words(logits, seqs)
            logits = self._ban_stop_tokens_before_min(logits, seqs)
            logits = self._apply_grammars(logits, seqs)
        token_ids = self._draw(logits, seqs)
        logprobs = None
        if raw_logprobs is not None:
            top = raw_logprobs.topk(max(p.top_logprobs for p in params), dim=-1)
            logprobs = (raw_logprobs.gather(1, token_ids[:, None]).squeeze(1), top.values, top.indices)
        if self.device.type != "cuda":
            return PendingSample(token_ids, None, None, logprobs)
        host_ids = self._to_host(token_ids)
        if logprobs is not None:
            logprobs = tuple(self._to_host(t) for t in logprobs)
        ready = torch.cuda.Event()
        ready.record()
        return PendingSample(token_ids, host_ids, ready, logprobs)

    @staticmethod
    def _to_host(values: torch.Tensor) -> torch.Tensor:
        host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        host.copy_(values, non_blocking=True)
        return host

    def finish(self, pending: PendingSample, seqs: list[Sequence]) -> SamplerOutput:
        """The sampled tokens on the host: the step's one wait for the device (and for exactly its own
        work: a step queued behind it keeps running)."""
        if pending.ready is not None:
            pending.ready.synchronize()
            ids = pending.host_ids.tolist()
        else:
            ids = pending.token_ids.tolist()
        return SamplerOutput(ids, self._logprobs(pending.logprobs, seqs))

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        """A small host list on the device without waiting for the device (pinned, non-blocking)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @staticmethod
    def _processes(seq: Sequence) -> bool:
        """Whether any logits processor below changes this row's logits at this step."""
        p = seq.params
        return (p.reads_history or bool(p.logit_bias) or seq.grammar is not None
                or seq.num_output_tokens < p.min_tokens)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            p = seq.params
            if p.repetition_penalty != 1.0:
                seen = self._tensor(sorted(set(seq.token_ids)), torch.int64)
                values = logits[row, seen]
                logits[row, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                                values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                output = self._tensor(seq.output_token_ids, torch.int64)
                counts = torch.bincount(output, minlength=logits.shape[-1]).to(logits.dtype)
                logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
        return logits

    def _apply_grammars(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Structured output: the rows with a grammar keep only the tokens it allows next (rows
        without one are not touched, and a step with none computes nothing)."""
        rows = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if not rows:
            return logits
        grammars = [(seqs[i].grammar, seqs[i].token_ids, seqs[i].num_prompt_tokens, seqs[i].eos_token_ids)
                    for i in rows]
        allowed = self.masks.allowed(grammars, logits.shape[-1])
        index = self._tensor(rows, torch.int64)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits

    def _apply_logit_bias(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            bias = seq.params.logit_bias
            if bias:
                ids = self._tensor(list(bias), torch.int64)
                logits[row, ids] += self._tensor(list(bias.values()), logits.dtype)
        return logits

    def _ban_bad_words(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Ban the last token of each bad word whose earlier tokens end the output so far."""
        for row, seq in enumerate(seqs):
            if not seq.params.bad_words_token_ids:
                continue
            output = seq.output_token_ids
            banned = [ids[-1] for ids in seq.params.bad_words_token_ids
                      if len(ids) - 1 <= len(output)
                      and (len(ids) == 1 or output[len(output) - len(ids) + 1:] == ids[:-1])]
            if banned:
                logits[row, banned] = float("-inf")
        return logits

    def _ban_stop_tokens_before_min(self, logits: torch.Tensor,
                                    seqs: list[Sequence]) -> torch.Tensor:
        for row, seq in enumerate(seqs):
            # A grammar's mask decides when the output may end (it may allow nothing else).
            if seq.num_output_tokens < seq.params.min_tokens and seq.grammar is None:
                banned = set(seq.stop_token_ids)
                if not seq.params.ignore_eos:
                    banned |= seq.eos_token_ids
                banned = [t for t in banned if t < logits.shape[-1]]
                if banned:
                    logits[row, banned] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """One token per row: the argmax for greedy rows, a draw from softmax(logits / temperature),
        after top_k / top_p / min_p, for the others."""
        params = [s.params for s in seqs]
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return self._greedy(logits)
        vocab = logits.shape[-1]
        filtered = [i for i in sampled if 0 < params[i].top_k < vocab or params[i].top_p < 1 or params[i].min_p > 0]
        if filtered:
            logits = logits.float()
            rows = self._tensor(filtered, torch.int64)
            logits[rows] = self._filter(logits[rows], [seqs[i] for i in filtered])
        # Filtered rows already hold logits / temperature; greedy rows are marked by 0.
        inv_temps = [0.0] * len(seqs)
        for i in sampled:
            inv_temps[i] = 1.0 / params[i].temperature
        for i in filtered:
            inv_temps[i] = 1.0
        if self.fused_draw:
            return self._fused_draw(logits, seqs, inv_temps)
        token_ids = logits.argmax(dim=-1) if len(sampled) < len(seqs) else None
        scaled = logits[self._tensor(sampled, torch.int64)] if token_ids is not None else logits.float()
        scaled = scaled * self._tensor([inv_temps[i] for i in sampled], torch.float32)[:, None]
        drawn = self._race(scaled, [seqs[i] for i in sampled])
        if token_ids is None:
            return drawn
        token_ids[self._tensor(sampled, torch.int64)] = drawn
        return token_ids

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        if self.fused_draw:
            from workers.kernels.sampling import gumbel_argmax
            return gumbel_argmax(logits)
        return logits.argmax(dim=-1)

    def _fused_draw(self, logits: torch.Tensor, seqs: list[Sequence], inv_temps: list[float]) -> torch.Tensor:
        from workers.kernels.sampling import gumbel_argmax

        step_seed = self.step_seeds.getrandbits(63)
        seeds = [self._row_seed(seq) if seq.params.seed is not None else (step_seed + row * _SEED_MIX) % (2 ** 63)
                 for row, seq in enumerate(seqs)]
        return gumbel_argmax(logits, self._tensor(inv_temps, torch.float32), self._tensor(seeds, torch.int64))

    @staticmethod
    def _row_seed(seq: Sequence) -> int:
        return (seq.params.seed * _SEED_MIX + seq.num_output_tokens) % (2 ** 63)

    def _filter(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """logits / temperature, with -inf where top_k, top_p or min_p drop a token (float32 rows)."""
        temps = self._tensor([s.params.temperature for s in seqs], torch.float32)
        logits = logits / temps[:, None]
        vocab = logits.shape[-1]
        top_ks = [s.params.top_k if 0 < s.params.top_k < vocab else vocab for s in seqs]
        if any(k < vocab for k in top_ks):
            k = self._tensor(top_ks, torch.int64)
            sorted_desc = logits.sort(dim=-1, descending=True).values
            kth = sorted_desc.gather(1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if any(s.params.top_p < 1 for s in seqs):
            top_ps = self._tensor([s.params.top_p for s in seqs], torch.float32)
            sorted_probs, order = logits.softmax(dim=-1).sort(dim=-1, descending=True)
            mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
            drop_sorted = mass_before >= top_ps[:, None]   # never drops the most likely token
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        if any(s.params.min_p > 0 for s in seqs):
            min_ps = self._tensor([s.params.min_p for s in seqs], torch.float32)
            probs = logits.softmax(dim=-1)
            threshold = min_ps[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < threshold, float("-inf"))
        return logits

    def _race(self, scaled: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """The draw in torch: argmax(scaled - log E), E ~ Exp(1) (the exponential race, which draws
        from softmax(scaled)). Unseeded rows share one draw from the engine's generator; a seeded row
        draws its own."""
        noise = torch.empty_like(scaled).exponential_(generator=self.generator)
        for row, seq in enumerate(seqs):
            if seq.params.seed is not None:
                self.request_generator.manual_seed(self._row_seed(seq))
                noise[row].exponential_(generator=self.request_generator)
        return (scaled - noise.clamp_(min=torch.finfo(noise.dtype).tiny).log()).argmax(dim=-1)

    @staticmethod
    def _logprobs(logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                  seqs: list[Sequence]) -> list[TokenLogprobs | None]:
        if logprobs is None:
            return [None] * len(seqs)
        chosen, top_values, top_ids = (t.tolist() for t in logprobs)
        out: list[TokenLogprobs | None] = []
        for row, seq in enumerate(seqs):
            if not seq.params.logprobs:
                out.append(None)
                continue
            k = seq.params.top_logprobs
            out.append(TokenLogprobs(chosen[row], top_ids[row][:k], top_values[row][:k]) if k
                       else TokenLogprobs(chosen[row]))
        return out
