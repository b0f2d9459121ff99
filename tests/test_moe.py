"""MoE layer: grouped and loop paths agree, routing is dropless top-k, balancing works."""

import pytest
import torch
import torch.nn.functional as F

from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.model.moe import CPU_BF16_ROWS, FEW_TOKENS, ExpertPathChoice, MoE, grouped_mm_supported, init_moe_weights

# Tiny shapes: a second intra-op thread on a shared, busy machine only adds waiting.
pytestmark = pytest.mark.usefixtures("one_thread")

needs_grouped = pytest.mark.skipif(
    not grouped_mm_supported(torch.device("cpu"), torch.float32), reason="grouped_mm not available on this CPU/torch"
)




def make_moe(**overrides) -> MoE:
    torch.manual_seed(0)
    values = dict(d_model=32, n_heads=4, n_kv_heads=2, n_experts=6, top_k=2, expert_hidden=48)
    values.update(overrides)
    moe = MoE(ModelConfig(**values))
    init_moe_weights(moe, std=0.2, out_std=0.2)
    return moe


def run_path(moe: MoE, impl: str, x: torch.Tensor, upstream: torch.Tensor):
    moe.zero_grad()
    moe.config.expert_impl = impl
    x = x.clone().requires_grad_(True)
    out, _, _ = moe(x, need_losses=False)
    out.backward(upstream)
    grads = {name: p.grad.clone() for name, p in moe.named_parameters()}
    return out.detach(), x.grad.clone(), grads


@needs_grouped
@pytest.mark.parametrize("n_shared", [0, 1])
def test_grouped_and_loop_agree_in_outputs_and_gradients(n_shared):
    moe = make_moe(n_shared_experts=n_shared)
    torch.manual_seed(1)
    x = torch.randn(3, 7, 32)
    upstream = torch.randn(3, 7, 32)  # a random upstream gradient, so every output element matters
    out_loop, dx_loop, g_loop = run_path(moe, "loop", x, upstream)
    out_grouped, dx_grouped, g_grouped = run_path(moe, "grouped", x, upstream)
    torch.testing.assert_close(out_grouped, out_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_grouped, dx_loop, atol=1e-5, rtol=1e-5)
    assert g_loop.keys() == g_grouped.keys()
    for name in g_loop:
        torch.testing.assert_close(g_grouped[name], g_loop[name], atol=1e-5, rtol=1e-5, msg=name)


@needs_grouped
def test_grouped_handles_experts_that_receive_no_tokens():
    moe = make_moe()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, 0] = 50.0  # experts 0 and (by index tie-break) one other take everything
    x = torch.randn(5, 32).abs() + 0.1
    upstream = torch.randn(5, 32)
    out_loop, dx_loop, _ = run_path(moe, "loop", x, upstream)
    out_grouped, dx_grouped, _ = run_path(moe, "grouped", x, upstream)
    torch.testing.assert_close(out_grouped, out_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_grouped, dx_loop, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["loop", pytest.param("grouped", marks=needs_grouped)])
def test_output_is_renormalised_top_k_mixture_of_every_token(impl):
    """Dropless Mixtral routing, checked token by token against the definition."""
    moe = make_moe(expert_impl=impl)
    x = torch.randn(9, 32)
    out, _, _ = moe(x, need_losses=False)
    probs = F.softmax(x @ moe.gate.weight.T, dim=-1)
    top_p, top_e = probs.topk(2, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    ex = moe.experts
    for t in range(9):
        expected = sum(
            top_p[t, j] * (F.silu(ex.w1[e] @ x[t]) * (ex.w3[e] @ x[t])) @ ex.w2[e].T
            for j, e in enumerate(top_e[t].tolist())
        )
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


def test_balancing_losses_and_stats():
    moe = make_moe(aux_loss_coef=0.5, z_loss_coef=0.25)
    with torch.no_grad():
        moe.gate.weight.zero_()  # uniform router: aux loss is exactly 1, z loss is log(E)^2
    x = torch.randn(10, 32)
    _, weighted, stats = moe(x, need_losses=True)
    assert stats["aux_loss"].item() == pytest.approx(1.0, abs=1e-6)
    assert stats["z_loss"].item() == pytest.approx(torch.log(torch.tensor(6.0)).item() ** 2, rel=1e-5)
    assert stats["router_entropy"].item() == pytest.approx(torch.log(torch.tensor(6.0)).item(), rel=1e-5)
    assert weighted.item() == pytest.approx(0.5 * 1.0 + 0.25 * stats["z_loss"].item(), rel=1e-5)
    assert stats["tokens_per_expert"].sum().item() == 10 * 2
    assert stats["tokens_per_expert"].shape == (6,)


def test_concentrated_routing_raises_aux_loss():
    moe = make_moe()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, :] = 5.0
    x = torch.rand(16, 32) + 0.5
    _, _, stats = moe(x, need_losses=True)
    assert stats["aux_loss"].item() > 1.5


def test_bias_balancing_steers_selection_but_not_mixing_weights():
    moe = make_moe(balance="bias", bias_update_rate=0.1)
    moe.train()
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0, :] = 1.0  # expert 0 is everyone's favourite
    x = torch.rand(20, 32) + 0.5
    moe(x, need_losses=False)
    load = moe.gate.load_since_update.clone()
    assert load[0] == 20
    moe.gate.update_bias(0.1)
    bias = moe.gate.expert_bias
    assert bias[0] < 0 and torch.all(bias[load < load.mean()] > 0)
    assert moe.gate.load_since_update.sum() == 0  # counting restarts after each update
    # A large bias changes which experts are chosen; weights stay the unbiased softmax, renormalised.
    with torch.no_grad():
        moe.gate.expert_bias.copy_(torch.tensor([0.0, 0, 0, 0, 10, 10]))
    logits, weights, ids = moe.gate(x)
    assert set(ids.flatten().tolist()) == {4, 5}
    probs = logits.softmax(-1)
    expected = probs[:, 4:6] / probs[:, 4:6].sum(-1, keepdim=True)
    torch.testing.assert_close(weights.sort(-1).values, expected.sort(-1).values)


def test_router_runs_in_float32_under_bfloat16_input():
    moe = make_moe(expert_impl="loop").to(torch.bfloat16)
    logits, weights, _ = moe.gate(torch.randn(4, 32, dtype=torch.bfloat16))
    assert logits.dtype == torch.float32 and weights.dtype == torch.float32


@needs_grouped
@pytest.mark.parametrize("n_tokens", [1, 3])
def test_few_token_decoding_path_agrees_with_loop(n_tokens):
    """A decoding step on CPU takes forward_few_tokens; same outputs and gradients as the reference."""
    assert n_tokens <= FEW_TOKENS
    moe = make_moe(n_shared_experts=1)
    x = torch.randn(1, n_tokens, 32)
    upstream = torch.randn(1, n_tokens, 32)
    out_loop, dx_loop, g_loop = run_path(moe, "loop", x, upstream)
    out_few, dx_few, g_few = run_path(moe, "grouped", x, upstream)
    torch.testing.assert_close(out_few, out_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx_few, dx_loop, atol=1e-5, rtol=1e-5)
    for name in g_loop:
        torch.testing.assert_close(g_few[name], g_loop[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["loop", pytest.param("grouped", marks=needs_grouped)])
def test_bfloat16_autocast_forward_and_backward(impl):
    moe = make_moe(expert_impl=impl)
    x = torch.randn(2, 8, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, weighted, _ = moe(x, need_losses=True)
    reference, _, _ = make_moe(expert_impl="loop")(x, need_losses=False)
    assert out.dtype == x.dtype
    torch.testing.assert_close(out, reference, atol=0.05, rtol=0.05)  # bf16 rounding, same routing
    (out.square().sum() + weighted).backward()
    assert moe.experts.w1.grad.dtype == torch.float32 and moe.experts.w1.grad.abs().sum() > 0


@needs_grouped
def test_bfloat16_on_cpu_pads_each_experts_rows_and_agrees_with_the_loop(monkeypatch):
    """oneDNN builds a kernel per new bfloat16 shape: the grouped GEMMs see row counts in multiples of
    CPU_BF16_ROWS (zero rows), and the result is the loop's."""
    moe = make_moe()
    offsets_seen, real_grouped_mm = [], F.grouped_mm

    def recording(a, b, offs=None, **kwargs):
        offsets_seen.append((a.shape[0], offs.tolist()))
        return real_grouped_mm(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(F, "grouped_mm", recording)
    torch.manual_seed(1)
    x, upstream = torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_loop, dx_loop, g_loop = run_path(moe, "loop", x, upstream)
        out_grouped, dx_grouped, g_grouped = run_path(moe, "grouped", x, upstream)
    assert offsets_seen, "the grouped path ran"
    for rows, offsets in offsets_seen:
        assert rows == offsets[-1] and all(o % CPU_BF16_ROWS == 0 for o in offsets)
    torch.testing.assert_close(out_grouped, out_loop, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx_grouped, dx_loop, atol=2e-2, rtol=2e-2)
    for name in g_loop:
        # bfloat16 rounding, relative to the largest entry (the router's gradient sums many rounded terms)
        scale = g_loop[name].abs().max().item()
        torch.testing.assert_close(g_grouped[name], g_loop[name], atol=1e-2 * scale, rtol=2e-2, msg=name)
        assert scale > 0, name


def test_the_chosen_expert_path_is_logged_once(caplog):
    choice = ExpertPathChoice()
    with caplog.at_level("INFO", logger="gtransformer.model.moe"):
        for _ in range(2):
            choice.resolve("auto", torch.device("cpu"), torch.float32)
        chosen = choice.resolve("loop", torch.device("cpu"), torch.float32)
    messages = [r.getMessage() for r in caplog.records]
    assert chosen == "loop"
    assert len(messages) == 2 and "path on cpu" in messages[0] and "loop path" in messages[1]
    expected = "grouped" if grouped_mm_supported(torch.device("cpu"), torch.float32) else "loop"
    assert f"{expected} path" in messages[0]


def test_a_model_logs_its_expert_path_once_for_all_its_layers(caplog):
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50, context_length=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=3,
                            n_experts=4, top_k=2, expert_hidden=16))
    assert all(block.mlp.expert_path is model.expert_path for block in model.layers)
    with caplog.at_level("INFO", logger="gtransformer.model.moe"):
        model(torch.randint(0, 50, (2, 5)))
        model(torch.randint(0, 50, (2, 5)))
    assert sum("path on cpu" in r.getMessage() for r in caplog.records) == 1
