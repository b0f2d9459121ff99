"""gtransformer.analysis: each number checked against an independent computation on a tiny seeded model."""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import time
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.patches import Rectangle

from gtransformer.analysis import attention_maps, kv_cache, routing, tokens
from gtransformer.analysis.capture import visible
from gtransformer.analysis.loading import load_run
from gtransformer.data.clean import word_count
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.attention import KVCache
from gtransformer.model.primitives import swiglu
from gtransformer.training.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCE = "Era uma vez uma menina que morava numa casa perto do rio."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, make_corpus) -> PreparedCorpus:
    return PreparedCorpus(make_corpus(tmp_path_factory.mktemp("analysis") / "corpus", sentences=150))


@pytest.fixture(scope="module")
def tokenizer(corpus) -> Tokenizer:
    return corpus.tokenizer()


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=50)
    return buffer.getvalue()


# --- routing of one sentence ------------------------------------------------------------------------------


def moe_outputs(model, ids_BT):
    """(input, output) of every MoE block's mlp in a plain forward, captured independently of the analysis code."""
    seen = {}
    handles = [block.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, (args[0], out.output)))
               for i, block in enumerate(model.layers) if block.is_moe]
    with torch.no_grad():
        model(ids_BT)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("overrides", [{}, {"moe_every": 2, "n_layers": 3}, {"balance": "bias", "top_k": 1}])
def test_captured_routing_is_what_the_experts_mixed(make_model, overrides):
    model = make_model(**overrides)
    if model.config.balance == "bias":
        for block in model.layers:
            if block.is_moe:
                block.mlp.gate.expert_bias.copy_(torch.arange(4.0))  # the choice now differs from the top probability
    ids_BT = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    routing_layers = routing.capture_routing(model, ids_BT)
    seen = moe_outputs(model, ids_BT)
    assert [r.layer for r in routing_layers] == sorted(seen) == routing.moe_layers(model)
    stats = model(ids_BT, return_stats=True).stats
    for layer, stat in zip(routing_layers, stats):
        assert layer.ids_NK.shape == layer.weights_NK.shape == (18, model.config.top_k)
        assert torch.allclose(layer.weights_NK.sum(-1), torch.ones(18))
        # The model's own per-expert counts and entropy from the same forward.
        assert torch.equal(torch.bincount(layer.ids_NK.reshape(-1), minlength=4), stat["tokens_per_expert"])
        probs = layer.logits_NE.softmax(-1)
        assert torch.allclose(-(probs * probs.log()).sum(-1).mean(), stat["router_entropy"], atol=1e-6)
        # Mixing the chosen experts with the captured weights gives back the MoE layer's output.
        x_BTC, out_BTC = seen[layer.layer]
        experts = model.layers[layer.layer].mlp.experts
        x_NC = x_BTC.reshape(-1, x_BTC.shape[-1])
        expected = torch.zeros_like(x_NC)
        for n in range(x_NC.shape[0]):
            for e, w in zip(layer.ids_NK[n].tolist(), layer.weights_NK[n].tolist()):
                h = F.linear(swiglu(F.linear(x_NC[n], experts.w1[e]), F.linear(x_NC[n], experts.w3[e])), experts.w2[e])
                expected[n] += w * h
        assert torch.allclose(expected, out_BTC.reshape_as(expected), atol=1e-5)


def test_capture_stops_before_lm_head_and_leaves_no_hooks(make_model):
    model = make_model()
    calls = []
    handle = model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    routing.capture_routing(model, torch.tensor([[1, 2, 3]]))
    attention_maps.capture_attention(model, torch.tensor([[1, 2, 3]]), 0)
    assert calls == []
    model(torch.tensor([[1, 2, 3]]))
    assert calls == [1]
    handle.remove()
    assert not any(m._forward_hooks for m in model.modules())


def test_route_sentence_rows(make_model, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size, moe_every=2, n_layers=4)
    rows = routing.route_sentence(model, tokenizer, SENTENCE)
    ids = tokenizer.encode(SENTENCE)
    assert [r.layer for r in rows] == [1] * len(ids) + [3] * len(ids)
    assert "".join(r.token for r in rows if r.layer == 1) == SENTENCE
    assert [r.token_id for r in rows if r.layer == 3] == ids
    captured = routing.capture_routing(model, torch.tensor([ids]))
    for r in rows:
        assert len(set(r.experts)) == 2 and math.isclose(sum(r.weights), 1.0, rel_tol=1e-6)
        assert r.weights[0] >= r.weights[1]
        layer = captured[[1, 3].index(r.layer)]
        assert list(r.experts) == layer.ids_NK[r.position].tolist()
    with pytest.raises(UserError, match="context_length"):
        routing.route_sentence(model, tokenizer, SENTENCE * 20)


def test_routing_html_and_figure_colour_each_expert(make_model, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    rows = routing.route_sentence(model, tokenizer, "Ela <b>era</b> & ele.")
    colours = routing.expert_colours(4)
    assert len(set(colours)) == 4
    page = routing.routing_html(rows, 4)
    chips = re.findall(r"background:(#[0-9a-f]{6});[^>]*>e(\d+)( [0-9.]+)?</span>", page)
    weighted = [(c, int(e)) for c, e, w in chips if w]
    assert len(weighted) == len(rows) * 2 and all(c == colours[e] for c, e in weighted)
    assert [float(w) for _, _, w in chips if w] == [round(w, 2) for r in sorted(rows, key=lambda r: (r.position, r.layer))
                                                    for w in r.weights]
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page  # tokens are escaped
    assert page.count("<tr>") == 1 + len(rows) // 2
    fig = routing.routing_figure(rows, 4)
    cells = [p for p in fig.axes[0].patches if isinstance(p, Rectangle)]
    assert len(cells) == len(rows) * 2
    assert sorted(fig.axes[0].get_xticklabels()[i].get_text() for i in range(len(rows) // 2)) == sorted(
        visible(r.token) for r in rows if r.layer == 0)
    assert png_bytes(fig).startswith(b"\x89PNG")


def test_expert_colours_beyond_the_small_palettes():
    for n in (3, 12, 30):
        assert len(set(routing.expert_colours(n))) == n


# --- expert load, router entropy, top tokens over a split --------------------------------------------------


def test_windows_cover_the_bounded_tokens_once():
    tokens_N = np.arange(100, dtype=np.uint16)
    batches = list(routing.windows(tokens_N, max_tokens=75, context=10, batch_size=3))
    assert [tuple(b.shape) for b in batches] == [(3, 10), (3, 10), (1, 10), (1, 5)]
    assert torch.equal(torch.cat([b.reshape(-1) for b in batches]), torch.arange(75))


def test_routing_stats_equal_the_models_own_statistics(make_model, corpus, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    tokens_N = corpus.tokens("val")
    stats = routing.routing_stats(model, tokens_N, max_tokens=300, batch_size=2, context=64)
    assert stats.n_tokens == 300 and stats.layers == [0, 1]
    counts = np.zeros((2, 4), dtype=np.int64)
    entropy = np.zeros(2)
    for start in range(0, 300, 64):
        ids = torch.from_numpy(np.asarray(tokens_N[start : min(start + 64, 300)], dtype=np.int64))[None]
        for i, stat in enumerate(model(ids, return_stats=True).stats):
            counts[i] += stat["tokens_per_expert"].numpy()
            entropy[i] += float(stat["router_entropy"]) * ids.shape[1]
    assert np.array_equal(stats.counts_LE, counts)
    assert np.allclose(stats.entropy_L, entropy / 300, atol=1e-5)
    assert np.allclose(stats.load_LE.sum(axis=1), 1.0)
    assert stats.max_entropy == pytest.approx(math.log(4)) and (stats.entropy_L <= stats.max_entropy).all()
    assert np.array_equal(stats.token_totals_V, np.bincount(np.asarray(tokens_N[:300]), minlength=tokenizer.vocab_size))
    # Every occurrence of a token fills top_k slots, split over the experts.
    assert np.array_equal(stats.token_counts_LEV.sum(axis=1), 2 * np.stack([stats.token_totals_V] * 2))
    assert np.array_equal(stats.token_counts_LEV.sum(axis=2), stats.counts_LE)
    image = routing.expert_load_figure(stats).axes[0].images[0]
    assert np.allclose(image.get_array(), stats.load_LE)


def test_top_tokens_per_expert(make_model, corpus, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    tokens_N = corpus.tokens("val")
    stats = routing.routing_stats(model, tokens_N, max_tokens=256, batch_size=4, context=64)
    # Recount layer 1's (expert, token) pairs directly.
    pairs = Counter()
    for start in range(0, 256, 64):
        ids = torch.from_numpy(np.asarray(tokens_N[start : start + 64], dtype=np.int64))[None]
        layer = routing.capture_routing(model, ids)[1]
        for token, experts in zip(ids[0].tolist(), layer.ids_NK.tolist()):
            for e in experts:
                pairs[(e, token)] += 1
    totals = Counter(np.asarray(tokens_N[:256]).tolist())
    top = routing.top_tokens_per_expert(stats, tokenizer, layer=1, n=5)
    assert sorted(top) == [0, 1, 2, 3]
    for e, entries in top.items():
        expected = sorted(((count, -t) for (ex, t), count in pairs.items() if ex == e), reverse=True)[:5]
        assert [c for _, c, _ in entries] == [c for c, _ in expected]
        assert [text for text, _, _ in entries] == [tokens.token_text(tokenizer, -t) for _, t in expected]
        assert all(share == pytest.approx(c / totals[-t]) for (_, _, share), (c, t) in zip(entries, expected))
    by_share = routing.top_tokens_per_expert(stats, tokenizer, layer=1, n=5, by="share", min_count=3)
    for entries in by_share.values():
        assert [s for _, _, s in entries] == sorted((s for _, _, s in entries), reverse=True)
    with pytest.raises(UserError, match="not a MoE layer"):
        routing.top_tokens_per_expert(stats, tokenizer, layer=7)
    page = routing.top_tokens_html(top, 4)
    assert page.count("<tr>") == 5 and page.count("<code") == sum(len(v) for v in top.values())
    assert f'background:{routing.expert_colours(4)[2]}">e2<' in page


# --- attention maps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4}, {"qk_norm": True, "n_heads": 8}])
def test_attention_probs_reproduce_the_layers_output(make_model, overrides):
    model = make_model(**overrides)
    H, K = model.config.n_heads, model.config.n_kv_heads
    ids_BT = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(2))
    for layer in range(model.config.n_layers):
        capture = attention_maps.capture_attention(model, ids_BT, layer)
        probs_BHTT = capture.probs_BHTT
        assert probs_BHTT.shape == (2, H, 11, 11)
        assert torch.allclose(probs_BHTT.sum(-1), torch.ones(2, H, 11))
        assert torch.equal(probs_BHTT.triu(1), torch.zeros_like(probs_BHTT))  # causal
        # probs @ V (query head h reads K/V head h // (H / K)), then o_proj: the layer's own output.
        v_BHTD = capture.v_BKTD.repeat_interleave(H // K, dim=1)
        y_BTC = (probs_BHTT @ v_BHTD).transpose(1, 2).reshape(2, 11, -1)
        out = model.layers[layer].self_attn.o_proj(y_BTC)
        assert torch.allclose(out, capture.output_BTC, atol=1e-5, rtol=1e-4)
        assert (out - capture.output_BTC).abs().max() < 1e-3 * capture.output_BTC.abs().max()


def test_attention_output_check_can_fail(make_model):
    """Pairing query heads with the wrong K/V head (h % K instead of h // G) breaks the reproduction."""
    model = make_model(n_heads=4, n_kv_heads=2)
    ids_BT = torch.randint(0, 300, (1, 11), generator=torch.Generator().manual_seed(3))
    capture = attention_maps.capture_attention(model, ids_BT, 1)
    wrong_BHTD = capture.v_BKTD.repeat(1, 2, 1, 1)
    out = model.layers[1].self_attn.o_proj((capture.probs_BHTT @ wrong_BHTD).transpose(1, 2).reshape(1, 11, -1))
    assert not torch.allclose(out, capture.output_BTC, atol=1e-5)


def test_sentence_attention_and_its_figure(make_model, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size, n_heads=4, n_kv_heads=2)
    maps = attention_maps.sentence_attention(model, tokenizer, SENTENCE, layer=1)
    T = len(tokenizer.encode(SENTENCE))
    assert maps.probs_HTT.shape == (4, T, T) and "".join(maps.tokens) == SENTENCE
    assert maps.group_size == 2 and maps.heads_of_group(1) == [2, 3]
    fig = attention_maps.attention_figure(maps, kv_head=1)
    images = [ax.images[0].get_array() for ax in fig.axes if ax.images]
    assert len(images) == 2
    assert all(np.allclose(image, maps.probs_HTT[h].numpy()) for image, h in zip(images, [2, 3]))
    assert png_bytes(fig).startswith(b"\x89PNG")
    with pytest.raises(UserError, match="K/V heads"):
        attention_maps.attention_figure(maps, kv_head=2)
    with pytest.raises(UserError, match="layers 0..1"):
        attention_maps.sentence_attention(model, tokenizer, SENTENCE, layer=2)


# --- KV cache memory ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4}, {"head_dim": 6, "n_layers": 3}])
def test_kv_cache_formula_equals_allocated_tensors(make_model, overrides, dtype):
    model = make_model(**overrides)
    config = model.config
    for tokens_, batch in ((1, 1), (17, 3), (64, 2)):
        formula = kv_cache.kv_cache_bytes(config, tokens_, batch, dtype)
        cache = KVCache(config, batch, tokens_, device="cpu", dtype=dtype)
        assert formula == kv_cache.allocated_kv_cache_bytes(config, tokens_, batch, dtype)
        assert formula == (cache.k.numel() + cache.v.numel()) * cache.k.element_size()
        assert formula == model.kv_cache_bytes_per_token(dtype) * tokens_ * batch


def test_kv_cache_curve_and_figure(make_model):
    config = make_model(n_heads=4, n_kv_heads=1).config
    curve = kv_cache.kv_cache_curve(config, batch_size=2)
    assert curve.tokens == [8, 16, 24, 32, 40, 48, 56, 64]
    assert curve.gqa_allocated == curve.gqa_bytes and curve.mha_allocated == curve.mha_bytes
    assert all(m == 4 * g for m, g in zip(curve.mha_bytes, curve.gqa_bytes)) and curve.ratio == 4
    assert kv_cache.multi_head_config(config).n_kv_heads == 4 and config.n_kv_heads == 1
    assert curve.gqa_bytes[-1] == 2 * 2 * 1 * 8 * 64 * 4 * 2  # K and V, 2 layers, 1 head, head_dim 8, 64 tokens, fp32, batch 2
    lines = kv_cache.kv_cache_figure(curve).axes[0].get_lines()
    assert len(lines) == 4
    assert list(lines[0].get_ydata()) == [b / 2**20 for b in curve.gqa_bytes]
    unmeasured = kv_cache.kv_cache_curve(config, tokens=[5, 1000], measure=False)
    assert unmeasured.gqa_allocated is None and unmeasured.mha_bytes[1] == 1000 * unmeasured.mha_bytes[0] // 5
    assert len(kv_cache.kv_cache_figure(unmeasured).axes[0].get_lines()) == 2
    with pytest.raises(UserError, match="context_length"):
        kv_cache.allocated_kv_cache_bytes(config, 65)


# --- the tokenizer's view ----------------------------------------------------------------------------------


def test_word_pattern_counts_what_word_count_counts():
    for text in ("Não há razão: d'alma, guarda-chuva, 1999 anos_e ç!", "  ", "Ella—elle… o João's 3x"):
        assert len(tokens.WORD.findall(text)) == word_count(text)


def test_sample_text_drops_endoftext_and_is_bounded(tokenizer):
    ids = tokenizer.encode("Era uma vez.") + [tokenizer.eot_id] + tokenizer.encode("Fim da historia.")
    sample, text = tokens.sample_text(tokenizer, np.array([tokenizer.eot_id] + ids, dtype=np.uint16), 100)
    assert tokenizer.eot_id not in sample.tolist() and text == "Era uma vez.\nFim da historia."
    sample, text = tokens.sample_text(tokenizer, np.array(ids, dtype=np.uint16), 3)
    assert sample.tolist() == ids[:3] and text == tokenizer.decode(ids[:3])


def test_token_stats(corpus, tokenizer):
    tokens_N = corpus.tokens("val")
    stats = tokens.token_stats(tokenizer, tokens_N, max_tokens=500, top=5)
    sample = [t for t in np.asarray(tokens_N[:500]).tolist() if t != tokenizer.eot_id]
    text = tokenizer.decode(sample)
    assert (stats.n_tokens, stats.n_words, stats.n_bytes) == (len(sample), word_count(text), len(text.encode()))
    assert stats.tokens_per_word == len(sample) / word_count(text)
    counts = Counter(sample).most_common()
    assert [c for _, c in stats.most_frequent] == [c for _, c in counts[:5]]
    assert stats.most_frequent[0][0] == tokens.token_text(tokenizer, counts[0][0])
    longest = max(len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size) if i != tokenizer.eot_id)
    assert stats.longest[0][1] == longest and [n for _, n in stats.longest] == sorted((n for _, n in stats.longest), reverse=True)
    assert sum(stats.pieces_per_word.values()) == pytest.approx(1.0)
    assert len(tokens.pieces_figure(stats).axes[0].patches) == 6


def test_pieces_per_word_by_hand(tokenizer):
    text = "casa casa extraordinariamente"
    one = len(tokenizer.encode(" casa"))
    many = len(tokenizer.encode(" extraordinariamente"))
    assert many > one
    assert tokens.pieces_per_word(tokenizer, text) == {one: 2 / 3, many: 1 / 3}


def test_token_text_shows_partial_utf8_bytes(tokenizer):
    assert tokens.token_text(tokenizer, tokenizer.encode("a")[0]) == "a"
    byte = next(i for i in range(tokenizer.vocab_size) if tokenizer.token_bytes(i) == b"\xc3")
    assert tokens.token_text(tokenizer, byte) == "\\xc3"


def test_tiktoken_offline_gives_a_note(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    assert tokens.load_tiktoken(("gpt2", "o200k_base")) == {"gpt2": "not available offline",
                                                          "o200k_base": "not available offline"}


def test_tiktoken_that_never_answers_is_given_up(monkeypatch):
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: time.sleep(5))
    start = time.monotonic()
    notes = tokens.load_tiktoken(("gpt2", "o200k_base"), timeout_s=0.3)
    assert time.monotonic() - start < 1.5
    assert all(note.startswith("not available offline (no answer") for note in notes.values())


def test_real_tiktoken_returns_in_time():
    """Whatever the network (none here): an encoding or the note, never a hang."""
    pytest.importorskip("tiktoken")
    start = time.monotonic()
    loaded = tokens.load_tiktoken(timeout_s=10)
    assert time.monotonic() - start < 11
    assert all(isinstance(v, Tokenizer) or v.startswith("not available offline") for v in loaded.values())


def test_compare_tokenizers_with_an_available_encoding(monkeypatch, tokenizer):
    tiktoken = pytest.importorskip("tiktoken")
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"ao"] = 256
    encoding = tiktoken.Encoding(name="tiny", pat_str=r"""\s+|\S+""", mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": 257})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    loaded = tokens.load_tiktoken(("tiny",))
    views = tokens.compare_tokenizers("não ao <pão>", {"ours": tokenizer, **loaded, "gone": "not available offline"})
    assert [v.name for v in views] == ["ours", "tiny", "gone"]
    assert "".join(views[0].pieces) == "não ao <pão>"
    assert views[1].pieces[:6] == ["n", "\\xc3", "\\xa3", "o", " ", "ao"]  # bytes of a split character shown as \xNN
    assert views[1].n_tokens == len("não <pão>".encode()) + 2  # byte tokens, plus the space and the merged "ao"
    assert views[2].pieces == [] and views[2].note == "not available offline"
    page = tokens.tokenization_html(views)
    assert page.count("<tr>") == 4 and "&lt;" in page and "<pão>" not in page and "not available offline" in page


# --- loading a run and its corpus ---------------------------------------------------------------------------


def test_load_run_finds_the_recorded_corpus(tmp_path, make_model, make_run, corpus, tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    run = tmp_path / "runs" / "r"
    shutil.copytree(corpus.path, tmp_path / "corpus")
    relative = "../../corpus"  # relative to the run folder, not to the working directory
    save_checkpoint(run, 1, model.state_dict(), {}, {"config": {"model": model.config.to_dict(), "data": {"path": relative}}})
    tokenizer.save(run / "tokenizer.json")
    loaded = load_run(run)
    assert loaded.corpus is not None and loaded.corpus.path.resolve() == (tmp_path / "corpus").resolve()
    assert loaded.tokenizer.vocab_size == tokenizer.vocab_size and not loaded.model.training
    assert load_run(run, data=corpus.path).corpus.path == corpus.path
    # A run that recorded no corpus (make_run) has none; another tokenizer's corpus is refused.
    other = make_run(tmp_path / "other")
    assert load_run(other).corpus is None
    with pytest.raises(UserError, match="another tokenizer"):
        load_run(other, data=corpus.path)
    with pytest.raises(UserError, match="not found"):
        load_run(run, data=tmp_path / "nowhere")
    assert json.loads((run / "checkpoints" / "step-0000001" / "meta.json").read_text())["config"]["data"]["path"] == relative
