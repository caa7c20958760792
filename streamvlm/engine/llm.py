"""The offline API: LLM.generate / LLM.chat run a worker in this process and wait for results."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from streamvlm.config import DEFAULT_MODEL, EngineConfig
from streamvlm.engine.request_state import RequestState
from streamvlm.inputs.processor import InputProcessor, Message, Prompt
from streamvlm.model_source import resolve_model
from streamvlm.outputs import RequestOutput
from streamvlm.protocol import AddRequest
from streamvlm.sampling import SamplingParams

_PROGRESS_BAR_MIN_PROMPTS = 16


class LLM:
    """``LLM(model=None, **engine_config_fields)``: with no model, the embedded SmolLM2."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        from workers.worker import Worker

        self.config = EngineConfig.from_kwargs(model=model or DEFAULT_MODEL, **kwargs)
        source = resolve_model(self.config.model)
        self.processor = InputProcessor(self.config, source)
        self.tokenizer = self.processor.tokenizer
        self.worker = Worker(self.config, source, self.processor.max_model_len)
        self._ids = itertools.count()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        token_ids = [self.processor.tokenize_prompt(p) for p in prompts]
        return self._run(token_ids, params, use_tqdm)

    def chat(self, conversations: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        token_ids = [self.processor.render_chat(c) for c in conversations]
        return self._run(token_ids, params, use_tqdm)

    def _run(self, prompts: list[list[int]],
             params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        for ids, p in zip(prompts, per_prompt):
            self.processor.validate(ids, p)

        states: dict[str, RequestState] = {}
        for ids, p in zip(prompts, per_prompt):
            request_id = str(next(self._ids))
            states[request_id] = RequestState(request_id, ids, p, self.tokenizer)
            self.worker.add_request(AddRequest(request_id=request_id, prompt_token_ids=ids,
                                               params=p,
                                               eos_token_ids=self.processor.eos_token_ids))
        progress = self._progress_bar(len(prompts), use_tqdm)
        remaining = len(states)
        try:
            while remaining:
                step = self.worker.step()
                for delta in step.deltas:
                    state = states.get(delta.request_id)
                    if state is None or state.apply(delta) is None:
                        continue
                    if state.finished:
                        remaining -= 1
                        if progress is not None:
                            progress.update(1)
                        if state.stopped_by_string and delta.finish_reason is None:
                            self.worker.abort([delta.request_id])
        except BaseException:
            self.worker.abort([i for i, s in states.items() if not s.finished])
            raise
        finally:
            if progress is not None:
                progress.close()
        return [s.output for s in states.values()]

    @staticmethod
    def _progress_bar(total: int, use_tqdm: bool) -> Any:
        if not use_tqdm or total < _PROGRESS_BAR_MIN_PROMPTS:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, desc="Generating", unit="req")

    def shutdown(self) -> None:
        """Release the model and the KV pool (GPU memory too)."""
        if self.worker is None:
            return
        device = self.worker.runner.device
        self.worker = None
        import gc
        gc.collect()
        if device.type == "cuda":
            import torch
            torch.cuda.empty_cache()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
