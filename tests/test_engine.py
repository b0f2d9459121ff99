"""The batching engine: each request equals `generate` for its prompt alone, slots, queue, events, asyncio."""

import asyncio

import pytest
import torch
from conftest import NEEDS_CPP_COMPILER

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.inference import decode as decode_module
from gtransformer.inference.decode import DecodeOptions
from gtransformer.inference.decode_model import CACHE_ATTRIBUTE
from gtransformer.inference.engine import Engine, QueueFull
from gtransformer.inference.generate import generate
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.model.attention import KVCache

# Tiny shapes: a second intra-op thread on a shared, busy machine only adds waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

WAIT = 30  # seconds: every wait has a timeout, so a broken engine fails instead of hanging
TEXT = (
    "O coração da nação bateu mais forte. Ação e reação, é só o começo: ótimo, avó, maçã, pão. "
    "Não há razão para não ler Machado de Assis e Eça de Queirós à noite. "
) * 3
PROMPTS = [[5, 17, 42], list(range(10, 31)), [7], [1, 2, 3, 4, 5, 6, 7, 8], [9] * 5, [3, 4], [100, 200, 50], [15]]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def model(make_model):
    return make_model()


def greedy(n: int = 16, **kw) -> SamplingConfig:
    return SamplingConfig(**{"max_new_tokens": n, "temperature": 0, "stop_token_ids": (299,), **kw})


def alone(model, prompt, sampling):
    return generate(model, [prompt], sampling)[0]


def after_step(engine: Engine, k: int, action) -> None:
    """Run `action()` in the engine thread right after its k-th batched step: deterministic timing."""
    step = engine._batched_step

    def step_then_act():
        step()
        if engine._steps == k:
            action()

    engine._batched_step = step_then_act


def test_per_row_cache_step_equals_full_recompute(model):
    """KVCache.rows with next_slots: rows of different lengths, each at its own slot, through GPT.forward."""
    config = model.config
    cache = KVCache(config, 3, config.context_length, "cpu", torch.float32)
    prompts = [[5, 17, 42], [7], [1, 2, 3, 4, 5, 6]]
    with torch.no_grad():
        for row, prompt in enumerate(prompts):
            model(torch.tensor([prompt]), cache=cache.rows(row, row + 1))
        tokens = torch.tensor([11, 12, 13])
        view = cache.rows(0, 3, [len(p) for p in prompts])
        logits = model(tokens[:, None], cache=view, position_ids=view.next_slots[:, None]).logits[:, -1]
        for row, prompt in enumerate(prompts):
            full = model(torch.tensor([prompt + [11 + row]])).logits[0, -1]
            torch.testing.assert_close(logits[row], full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("max_batch", [1, 3, 8])
@pytest.mark.parametrize("path", ["decoding copy", "model"])  # CPU steps run a decoding copy; GPUs the model
def test_concurrent_requests_equal_generate_alone(model, tokenizer, max_batch, path, monkeypatch):
    model.__dict__.pop(CACHE_ATTRIBUTE, None)
    if path == "model":
        monkeypatch.setattr(decode_module, "decoding_model", lambda model, dtype, layout: model)
    sampling = greedy(repetition_penalty=1.3) if max_batch == 3 else greedy()
    with Engine(model, tokenizer, max_batch=max_batch) as engine:
        requests = [engine.submit(p, sampling) for p in PROMPTS]
        results = [r.result(timeout=WAIT) for r in requests]
    model.__dict__.pop(CACHE_ATTRIBUTE, None)
    for prompt, (tokens, text, final) in zip(PROMPTS, results):
        assert tokens == alone(model, prompt, sampling)
        assert final.finish_reason in ("length", "stop")
        assert final.usage.prompt_tokens == len(prompt) and final.usage.completion_tokens == len(tokens)


@NEEDS_CPP_COMPILER
def test_compiled_engine_equals_compiled_generate_alone(model, tokenizer):
    """options.compile: batches padded to 1, 2 or 4 rows (3 active rows run as 4), each compiled at start."""
    compiled = DecodeOptions(compile=True)
    engine = Engine(model, tokenizer, max_batch=4, options=compiled)
    padded = []
    step = engine._batched_step
    engine._batched_step = lambda: (padded.append(engine._padded(len(engine._slots))), step())
    with engine:
        compiled_at_start = set(engine._decoder.compiled._warm)
        requests = [engine.submit(p, greedy()) for p in PROMPTS[:5]]
        results = [r.result(timeout=WAIT)[0] for r in requests]
    assert {key[0] for key in compiled_at_start} == {1, 2, 4}
    assert engine._decoder.compiled._warm == compiled_at_start  # no request waited for a compilation
    assert 4 in padded and len(set(padded)) > 1
    for prompt, tokens in zip(PROMPTS, results):
        assert tokens == generate(model, [prompt], greedy(), compiled)[0]


def test_request_joining_midway_and_interleaving(model, tokenizer):
    long_prompt, late_prompt = PROMPTS[1], PROMPTS[0]
    engine = Engine(model, tokenizer, max_batch=4)
    late = []
    after_step(engine, 5, lambda: late.append(engine.submit(late_prompt, greedy(24))))
    with engine:
        first_events = list(engine.submit(long_prompt, greedy(40)).events(timeout=WAIT))
        late_events = list(late[0].events(timeout=WAIT))
    first_tokens = [e.token_id for e in first_events if e.token_id is not None]
    late_tokens = [e.token_id for e in late_events if e.token_id is not None]
    assert first_tokens == alone(model, long_prompt, greedy(40))
    assert late_tokens == alone(model, late_prompt, greedy(24))
    # The late request joined at step 5 (its prefill), and then both produced a token in every step.
    late_steps = [e.step for e in late_events if e.token_id is not None]
    first_steps = [e.step for e in first_events if e.token_id is not None]
    assert late_steps == list(range(5, 5 + len(late_tokens)))
    assert set(late_steps) <= set(first_steps) and len(first_tokens) > late_steps[-1]


def test_requests_admitted_together_share_every_step(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2)
    a, b = engine.submit(PROMPTS[0], greedy(10)), engine.submit(PROMPTS[3], greedy(10))
    with engine:
        steps_a = [e.step for e in a.events(timeout=WAIT) if e.token_id is not None]
        steps_b = [e.step for e in b.events(timeout=WAIT) if e.token_id is not None]
    assert steps_a == steps_b == list(range(10))


def test_cancel_frees_the_slot_for_a_queued_request(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    running = engine.submit(PROMPTS[1], greedy(40))
    waiting = engine.submit(PROMPTS[0], greedy(12))
    after_step(engine, 3, running.cancel)
    with engine:
        events = list(running.events(timeout=WAIT))
        tokens, _, final = waiting.result(timeout=WAIT)
    assert events[-1].finish_reason == "cancelled"
    assert events[-1].usage.completion_tokens == len(events) - 1 == 4  # the prefill's token and 3 steps
    assert tokens == alone(model, PROMPTS[0], greedy(12)) and final.finish_reason == "length"


def test_cancel_midway_keeps_the_other_rows_exact(model, tokenizer):
    """A cancelled row in the middle frees its cache row: the last row moves in and goes on unchanged."""
    engine = Engine(model, tokenizer, max_batch=8)
    requests = [engine.submit(p, greedy(20)) for p in PROMPTS[:6]]
    after_step(engine, 2, requests[1].cancel)
    with engine:
        assert list(requests[1].events(timeout=WAIT))[-1].finish_reason == "cancelled"
        results = {i: r.result(timeout=WAIT)[0] for i, r in enumerate(requests) if i != 1}
    for i, tokens in results.items():
        assert tokens == alone(model, PROMPTS[i], greedy(20))


def test_queue_full_and_user_errors(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=2)
    # Room for one request per free slot plus max_queue waiting ones: 1 + 2.
    queued = [engine.submit(PROMPTS[0], greedy(4)) for _ in range(3)]
    with pytest.raises(QueueFull, match="max_queue"):
        engine.submit(PROMPTS[0], greedy(4))
    assert issubclass(QueueFull, UserError)
    with pytest.raises(UserError, match="no tokens"):
        engine.submit([], greedy(4))
    with pytest.raises(UserError, match="context_length \\(64\\)"):
        engine.submit(list(range(60)), greedy(10))
    engine.stop(drain=False)
    assert all(r.result(timeout=WAIT)[2].finish_reason == "cancelled" for r in queued)
    with pytest.raises(UserError, match="stopped"):
        engine.submit(PROMPTS[0], greedy(4))


def test_finish_reasons_stop_token_stop_string_length(model, tokenizer):
    reference = alone(model, PROMPTS[3], greedy(16))
    with Engine(model, tokenizer) as engine:
        tokens, text, final = engine.submit(PROMPTS[3], greedy(16)).result(timeout=WAIT)
        assert final.finish_reason == "length" and len(tokens) == 16
        stop_id = reference[5]
        first = reference.index(stop_id)
        tokens, _, final = engine.submit(PROMPTS[3], greedy(16, stop_token_ids=(stop_id,))).result(timeout=WAIT)
        assert final.finish_reason == "stop" and tokens == reference[:first]
        assert final.usage.completion_tokens == first
        stop = text[len(text) // 2 : len(text) // 2 + 2]
        _, cut, final = engine.submit(PROMPTS[3], greedy(16, stop_strings=(stop,))).result(timeout=WAIT)
        assert final.finish_reason == "stop" and cut == text[: text.index(stop)]


def test_default_stop_is_the_end_of_text_token(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=16, temperature=0)  # no stop ids: the engine stops at the eot
    reference = alone(model, PROMPTS[2], sampling)
    eot = tokenizer.eot_id
    with Engine(model, tokenizer) as engine:
        tokens, _, final = engine.submit(PROMPTS[2], sampling).result(timeout=WAIT)
    expected = reference[: reference.index(eot)] if eot in reference else reference
    assert tokens == expected
    assert final.finish_reason == ("stop" if eot in reference else "length")


def test_usage_and_logprobs(model, tokenizer):
    with Engine(model, tokenizer) as engine:
        request = engine.submit(PROMPTS[0], greedy(6), logprobs=3)
        events = list(request.events(timeout=WAIT))
    tokens = [e.token_id for e in events if e.token_id is not None]
    final = events[-1]
    assert final.usage.prompt_tokens == 3 and final.usage.completion_tokens == len(tokens) == 6
    assert 0 < final.usage.time_to_first_token <= final.usage.total_time
    with torch.no_grad():
        for i, event in enumerate(events[:-1]):
            assert len(event.top_logprobs) == 3
            ids = [t for t, _ in event.top_logprobs]
            values = [v for _, v in event.top_logprobs]
            assert values == sorted(values, reverse=True) and ids[0] == event.token_id  # greedy: the top token
            full = torch.log_softmax(model(torch.tensor([PROMPTS[0] + tokens[:i]])).logits[0, -1], -1)
            torch.testing.assert_close(torch.tensor(values), full[ids], atol=1e-4, rtol=0)
            assert event.logprob == pytest.approx(values[0])
    with Engine(model, tokenizer) as engine:
        plain = list(engine.submit(PROMPTS[0], greedy(2)).events(timeout=WAIT))
    assert plain[0].logprob is None and plain[0].top_logprobs == ()


def test_seeded_sampling_is_reproducible_per_request(model, tokenizer):
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_k=50, seed=7, stop_token_ids=(299,))
    with Engine(model, tokenizer, max_batch=4) as engine:
        first = engine.submit(PROMPTS[0], sampling).result(timeout=WAIT)[0]
        together = [engine.submit(PROMPTS[0], sampling), engine.submit(PROMPTS[1], sampling),
                    engine.submit(PROMPTS[0], SamplingConfig(**{**vars(sampling), "seed": 8}))]
        again, _, other = [r.result(timeout=WAIT)[0] for r in together]
    assert first == again
    assert first != other


def test_asyncio_interface(model, tokenizer):
    async def collect(engine):
        requests = [engine.submit(p, greedy(12)) for p in PROMPTS[:3]]

        async def read(request):
            return [e async for e in request]

        return await asyncio.wait_for(asyncio.gather(*(read(r) for r in requests)), WAIT)

    with Engine(model, tokenizer, max_batch=2) as engine:
        results = asyncio.run(collect(engine))
    for prompt, events in zip(PROMPTS, results):
        assert [e.token_id for e in events if e.token_id is not None] == alone(model, prompt, greedy(12))
        assert events[-1].finish_reason is not None


def test_stop_with_drain_finishes_in_flight_requests(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=2).start()
    requests = [engine.submit(p, greedy(12)) for p in PROMPTS[:4]]
    engine.stop(drain=True, timeout=WAIT)
    for prompt, request in zip(PROMPTS, requests):
        assert request.done
        tokens, _, final = request.result(timeout=1)
        assert tokens == alone(model, prompt, greedy(12)) and final.finish_reason == "length"
    with pytest.raises(UserError):
        engine.submit(PROMPTS[0], greedy(4))


def test_engine_never_samples_ids_the_tokenizer_lacks(make_model, tokenizer):
    n = tokenizer.vocab_size
    model = make_model(vocab_size=n + 20)
    with torch.no_grad():
        model.lm_head.weight[n:] = model.lm_head.weight[:20] * 50
    with Engine(model, tokenizer, max_batch=2) as engine:
        requests = [engine.submit(PROMPTS[0], SamplingConfig(max_new_tokens=8, temperature=t, seed=1)) for t in (0, 1.0)]
        results = [r.result(timeout=WAIT)[0] for r in requests]
    assert all(tokens and all(0 <= t < n for t in tokens) for tokens in results)
