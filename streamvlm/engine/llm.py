"""The offline API: a synchronous wrapper over the engine core and its worker processes.

An event loop runs in a background thread; LLM.generate / LLM.chat submit every prompt to the
same AsyncEngine that serves streams, and wait for the results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import weakref
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

from streamvlm.contract.config import DEFAULT_MODEL, EngineConfig
from streamvlm.engine.async_engine import AsyncEngine
from streamvlm.engine.loop import new_event_loop
from streamvlm.inputs.processor import Message, PreparedPrompt, Prompt
from streamvlm.outputs import RequestOutput
from streamvlm.contract.sampling import SamplingParams

T = TypeVar("T")
_PROGRESS_BAR_MIN_PROMPTS = 16
_SIGNAL_CHECK_S = 0.1


class LLM:
    """``LLM(model=None, **engine_config_fields)``: with no model, the embedded SmolLM2."""

    def __init__(self, model: str | None = None, **kwargs: Any) -> None:
        self.engine = AsyncEngine(EngineConfig.from_kwargs(model=model or DEFAULT_MODEL, **kwargs))
        self.config = self.engine.config   # resolved
        self.processor = self.engine.processor
        self.tokenizer = self.engine.tokenizer
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="streamvlm-loop",
                                        daemon=True)
        self._thread.start()
        # An LLM dropped without shutdown() still stops its loop thread (the engine's own
        # finalizer takes the worker processes down).
        self._finalizer = weakref.finalize(self, self._loop.call_soon_threadsafe, self._loop.stop)
        try:
            self._call(self.engine.start())
        except BaseException:
            self.shutdown()
            raise

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            # Waited for in slices: Ctrl-C's SIGINT may land on any thread of the process, and
            # a main thread blocked without a timeout would not see it until the call ended.
            while True:
                try:
                    return future.result(timeout=_SIGNAL_CHECK_S)
                except concurrent.futures.TimeoutError:
                    continue
        except BaseException:
            future.cancel()   # e.g. Ctrl-C: cancelling aborts every request still running
            raise

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        return self._run(self._prepare(list(prompts)), params, use_tqdm)

    def chat(self, conversations: Sequence[Message] | Sequence[Sequence[Message]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        return self._run(self._prepare([list(c) for c in conversations]), params, use_tqdm)

    def _prepare(self, prompts: list[Any]) -> list[PreparedPrompt]:
        async def prepare_all() -> list[PreparedPrompt]:
            return list(await asyncio.gather(*(self.engine.prepare_prompt(p) for p in prompts)))
        return self._call(prepare_all())

    def _run(self, prompts: list[PreparedPrompt],
             params: SamplingParams | Sequence[SamplingParams] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        if params is None:
            params = SamplingParams(**self.engine.default_sampling_fields)
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        for prompt, p in zip(prompts, per_prompt):
            self.processor.validate(prompt.prompt_token_ids, p)
        return self._call(self._generate_all(prompts, per_prompt, use_tqdm))

    async def _generate_all(self, prompts: list[PreparedPrompt], params: list[SamplingParams],
                            use_tqdm: bool) -> list[RequestOutput]:
        progress = None
        if use_tqdm and len(prompts) >= _PROGRESS_BAR_MIN_PROMPTS:
            from tqdm.auto import tqdm
            progress = tqdm(total=len(prompts), desc="Generating", unit="req")

        # At most max_pending_requests in the engine at once: the rest wait here, not refused.
        slots = asyncio.Semaphore(self.config.limits.max_pending_requests)

        async def one(prompt: PreparedPrompt, p: SamplingParams) -> RequestOutput:
            async with slots:
                out = await self.engine.generate(prompt, p)
            if progress is not None:
                progress.update(1)
            return out

        tasks = [asyncio.ensure_future(one(prompt, p)) for prompt, p in zip(prompts, params)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if progress is not None:
                progress.close()

    def stats(self) -> Any:
        return self._call(self.engine.stats())

    def shutdown(self) -> None:
        """Stop the worker processes and the event loop thread."""
        if self._loop.is_closed():
            return
        self._finalizer.detach()
        if self._thread.is_alive():
            try:
                self._call(self.engine.shutdown())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
