"""Prompt logprobs: computed in the worker while the prompt is prefilled (in chunks or whole,
with a warm prefix cache, after preemption), equal to the log-softmax of a direct full forward
of the prompt; through the Python engine and the HTTP API."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

from streamvlm import AsyncEngine, EngineConfig
from streamvlm.contract.protocol import PromptLogprobs
from streamvlm.contract.sampling import SamplingParams
from streamvlm.gateway.app import build_app
from streamvlm.gateway.settings import GatewaySettings
from tests.conftest import hf_model
from tests.helpers import local_llm, run, wait_idle
from tests.live_server import LiveServer
from tests.model_harness import load_ours, prefill_logits

MODEL = "tiny"
PROMPT = [int(t) for t in torch.randint(3, 500, (50,), generator=torch.Generator().manual_seed(0))]
TOP = 4


@pytest.fixture(scope="module")
def expected(llama_path) -> torch.Tensor:
    """log_softmax of our model's logits at every prompt position, from one direct forward."""
    logits = prefill_logits(load_ours(llama_path), PROMPT, torch.arange(len(PROMPT)))
    return torch.log_softmax(logits, dim=-1)


def assert_matches(values: PromptLogprobs, logprobs: torch.Tensor, prompt: list[int], k: int) -> None:
    """values hold prompt tokens 1.. of prompt; logprobs[p] predicts token p + 1."""
    assert values.first_position == 1 and len(values) == len(prompt) - 1
    rows = logprobs[:len(prompt) - 1]
    targets = torch.tensor(prompt[1:])
    chosen = rows.gather(1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(values.token_logprobs), chosen, rtol=0, atol=1e-5)
    assert values.ranks == ((rows > chosen[:, None]).sum(-1) + 1).tolist()
    top = rows.topk(k, dim=-1)
    assert values.top_token_ids == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(values.top_logprobs), top.values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunk, async_scheduling", [(16, False), (7, False), (512, False),
                                                     (7, True)])
def test_prompt_logprobs_equal_a_full_forward(llama_path, expected, chunk, async_scheduling):
    """Chunked prefill (chunk edges on and off block edges) or the whole prompt in one step,
    with the next step queued before the last one's results are taken or not."""
    llm = local_llm(llama_path, max_model_len=256, block_size=16, max_num_batched_tokens=chunk,
                    async_scheduling=async_scheduling)
    try:
        out = llm.generate([{"prompt_token_ids": PROMPT}],
                           SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=TOP))[0]
        assert_matches(out.prompt_logprobs, expected, PROMPT, TOP)
        assert out.num_cached_tokens == 0
        assert len(out.token_ids) == 3
        # Not asked: not computed.
        plain = llm.generate([{"prompt_token_ids": PROMPT}], SamplingParams(max_tokens=2))[0]
        assert plain.prompt_logprobs is None
    finally:
        llm.shutdown()


def test_prompt_logprobs_match_transformers(llama_path):
    with torch.inference_mode():
        logits = hf_model(llama_path)(torch.tensor([PROMPT])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    llm = local_llm(llama_path, max_model_len=256, block_size=16, max_num_batched_tokens=16)
    try:
        out = llm.generate([{"prompt_token_ids": PROMPT}],
                           SamplingParams(max_tokens=1, prompt_logprobs=0))[0]
    finally:
        llm.shutdown()
    values = out.prompt_logprobs
    assert values.top_token_ids == [[]] * len(values)
    chosen = reference[:-1].gather(1, torch.tensor(PROMPT[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(values.token_logprobs), chosen, rtol=1e-4, atol=1e-4)


def test_a_warm_prefix_cache_is_not_used_for_prompt_logprobs(llama_path, expected):
    llm = local_llm(llama_path, max_model_len=256, block_size=16, max_num_batched_tokens=16)
    try:
        request = [{"prompt_token_ids": PROMPT}]
        llm.generate(request, SamplingParams(max_tokens=2))   # the prompt's blocks are cached now
        warm = llm.generate(request, SamplingParams(max_tokens=2))[0]
        assert warm.num_cached_tokens == 48
        out = llm.generate(request, SamplingParams(max_tokens=2, prompt_logprobs=TOP))[0]
        assert out.num_cached_tokens == 0
        assert_matches(out.prompt_logprobs, expected, PROMPT, TOP)
        # A longer prompt sharing the cached prefix: its logprobs are exact too.
        longer = PROMPT + [7, 8, 9]
        full = torch.log_softmax(prefill_logits(load_ours(llama_path), longer,
                                                torch.arange(len(longer))), dim=-1)
        out = llm.generate([{"prompt_token_ids": longer}],
                           SamplingParams(max_tokens=2, prompt_logprobs=1))[0]
        assert_matches(out.prompt_logprobs, full, longer, 1)
        assert not any(wait_idle(llm).pool.ref_counts)
    finally:
        llm.shutdown()


def test_prompt_logprobs_after_preemption_are_sent_once(llama_path, expected):
    """A pool too small for every request at once: requests are preempted and recomputed, and
    each still gets its prompt's logprobs once, exact."""
    llm = local_llm(llama_path, max_model_len=128, block_size=16, max_num_batched_tokens=32,
                    num_kv_blocks=10)
    try:
        params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=2)
        outs = llm.generate([{"prompt_token_ids": PROMPT}] * 3, params)
        for out in outs:
            assert_matches(out.prompt_logprobs, expected, PROMPT, 2)
            assert len(out.token_ids) == 60
        stats = llm.engine.metrics.num_preemptions
        assert stats > 0
    finally:
        llm.shutdown()


def test_prompt_logprobs_with_tensor_parallelism(llama_path, expected):
    """Every rank computes the prompt rows' logits (the vocabulary is gathered over the group);
    rank 0 reports them."""
    from streamvlm import LLM

    with LLM(str(llama_path), max_model_len=256, block_size=16, max_num_batched_tokens=16,
             tensor_parallel_size=2) as llm:
        out = llm.generate({"prompt_token_ids": PROMPT},
                           SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=TOP),
                           use_tqdm=False)[0]
    assert_matches(out.prompt_logprobs, expected, PROMPT, TOP)


def test_prompt_logprobs_with_prefill_and_decode_groups(loop, llama_path, expected):
    """The prefill group computes the prompt and sends its logprobs with the first token."""
    async def scenario():
        config = EngineConfig(model=str(llama_path), groups=["prefill", "decode"], max_model_len=256,
                              block_size=16, max_num_batched_tokens=16, worker_backend="thread")
        async with AsyncEngine(config) as engine:
            params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=TOP)
            return await engine.generate({"prompt_token_ids": PROMPT}, params)

    out = run(loop, scenario())
    assert_matches(out.prompt_logprobs, expected, PROMPT, TOP)
    assert len(out.token_ids) == 4


def test_one_token_prompt_has_no_prompt_logprobs(llama_path):
    llm = local_llm(llama_path, max_model_len=64)
    try:
        out = llm.generate([{"prompt_token_ids": [5]}], SamplingParams(max_tokens=1, prompt_logprobs=1))[0]
        assert out.prompt_logprobs == PromptLogprobs()
    finally:
        llm.shutdown()


@pytest.mark.parametrize("value", [-1, 21, 1.5, True])
def test_prompt_logprobs_are_bounded(value):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)


# ---- over HTTP --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(llama_path):
    engine = AsyncEngine(EngineConfig(model=str(llama_path), max_model_len=256, block_size=16,
                                      max_num_batched_tokens=16, worker_backend="thread"))
    live = LiveServer(build_app(engine, GatewaySettings(served_model_name=MODEL))).start()
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0)


def test_prompt_logprobs_over_http(client, server, expected):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                    extra_body={"prompt_logprobs": 1})
    entries = out.choices[0].model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == len(PROMPT)
    for position in range(1, len(PROMPT)):
        entry = entries[position]
        own = entry[str(PROMPT[position])]
        row = expected[position - 1]
        assert own["logprob"] == pytest.approx(float(row[PROMPT[position]]), abs=1e-5)
        assert own["rank"] == int((row > row[PROMPT[position]]).sum()) + 1
        best = int(row.argmax())
        assert entry[str(best)]["rank"] == 1
        assert set(entry) == {str(PROMPT[position]), str(best)}
        assert own["decoded_token"] == server.app.state.engine.tokenizer.decode([PROMPT[position]])
    # Chat: one prompt_logprobs for the response, as vLLM's.
    chat = client.chat.completions.create(model=MODEL, max_tokens=2, n=2, seed=1,
                                          messages=[{"role": "user", "content": "Hello there"}],
                                          extra_body={"prompt_logprobs": 0})
    entries = chat.model_extra["prompt_logprobs"]
    assert entries[0] is None and len(entries) == chat.usage.prompt_tokens
    assert all(len(e) == 1 for e in entries[1:])


def test_prompt_logprobs_refusals(client, server):
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=2,
                                  extra_body={"prompt_logprobs": 21})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs") as info:
        client.chat.completions.create(model=MODEL, max_tokens=2, stream=True,
                                       messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"prompt_logprobs": 1})
    assert info.value.body["param"] == "prompt_logprobs"
    resp = httpx.post(server.base_url + "/v1/completions",
                      json={"prompt": "Hi", "max_tokens": 2, "prompt_logprobs": "x"})
    assert resp.status_code == 400


def test_n_choices_share_the_prompt_that_the_first_scores(server, expected):
    engine = server.app.state.engine
    params = SamplingParams(n=3, seed=2, max_tokens=4, prompt_logprobs=TOP)
    outs = server.call(engine.generate_choices({"prompt_token_ids": PROMPT}, params))
    for out in outs:
        assert_matches(out.prompt_logprobs, expected, PROMPT, TOP)
    assert outs[0].num_cached_tokens == 0
    assert all(o.num_cached_tokens == 48 for o in outs[1:])
