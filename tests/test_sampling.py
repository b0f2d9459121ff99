"""Sampling: seeded reproducibility, top-k / top-p, repetition penalty, ids the tokenizer lacks."""

import pytest
import torch

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.inference.generate import for_tokenizer, generate, generate_text
from gtransformer.inference.sampling import SamplingConfig, SamplingState, apply_repetition_penalty, filter_logits

pytestmark = pytest.mark.usefixtures("one_thread")


def test_seeded_sampling_is_reproducible(make_model):
    model = make_model()
    sampling = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.2)
    a = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=123, **sampling))
    b = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=123, **sampling))
    c = generate(model, [[1, 2, 3], [4]], SamplingConfig(seed=124, **sampling))
    assert a == b
    assert a != c


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2, top_p=None))
    assert kept.tolist() == [[True, True, False, False, False]]
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.6))
    assert kept.tolist() == [[True, True, False, False, False]]  # 0.5 < 0.6, 0.5 + 0.2 reaches it
    kept = torch.isfinite(filter_logits(logits, top_k=None, top_p=0.1))
    assert kept.tolist() == [[True, False, False, False, False]]  # the most likely token always stays
    shuffled = logits[:, [3, 0, 4, 1, 2]]
    kept = torch.isfinite(filter_logits(shuffled, top_k=None, top_p=0.6))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_repetition_penalty_makes_seen_tokens_less_likely():
    logits = torch.tensor([[2.0, -1.0, 3.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -2.0, 3.0]]




def test_a_model_vocab_larger_than_the_tokenizer_never_samples_a_missing_id(make_model):
    """model.vocab_size may exceed the tokenizer's (padding, a smaller prepared vocabulary): never sample those ids."""
    tokenizer = Tokenizer.train_bpe(["Era uma vez uma casa. O amor é fogo que arde sem se ver. " * 20],
                                    vocab_size=300, min_frequency=1)
    n = tokenizer.vocab_size
    model = make_model(vocab_size=n + 20)
    with torch.no_grad():
        model.lm_head.weight[n:] = model.lm_head.weight[:20] * 50  # the missing ids would win every step
    prompt = [tokenizer.encode("Era uma vez")]
    unlimited = generate(model, prompt, SamplingConfig(max_new_tokens=8, temperature=0))[0]
    assert any(t >= n for t in unlimited)  # the setup really prefers them
    for temperature in (0, 1.0):
        sampling = SamplingConfig(max_new_tokens=8, temperature=temperature, seed=1)
        limited = generate(model, prompt, for_tokenizer(tokenizer, sampling))[0]
        assert limited and all(0 <= t < n for t in limited)
        (text,) = generate_text(model, tokenizer, ["Era uma vez"], sampling)  # decodes without an error
        assert isinstance(text, str)


def test_sampling_state_marks_stopped_rows_and_seen_tokens():
    sampling = SamplingConfig(temperature=0, repetition_penalty=1.5, stop_token_ids=(2,))
    state = SamplingState(sampling, [[0, 1], [3]], vocab_size=5, device="cpu")
    assert state.seen.tolist() == [[True, True, False, False, False], [False, False, False, True, False]]
    assert not state.greedy  # the penalty changes the logits first
    logits = torch.tensor([[0.0, 0.0, 9.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 9.0]])
    token = state.next_tokens(logits)
    assert token.tolist() == [-1, 4] and state.finished.tolist() == [True, False]
    assert state.feed(token).tolist() == [0, 4]  # a stopped row reads a dummy token, and it is not noted as seen
    assert state.seen[1, 4] and not state.seen[0, 4]
    assert state.next_tokens(logits).tolist() == [-1, 4]  # stopped rows stay stopped
