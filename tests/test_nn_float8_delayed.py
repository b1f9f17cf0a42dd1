"""Delayed scaling in Float8Linear (``amax_history > 0``): X and E scaled with the largest amax
of earlier steps, against lpdist.quant with those scales and float64 GEMMs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lpdist.nn import Float8Linear
from lpdist.quant import FORMATS, fake_quantize
from lpdist.quant.scaling import float_scale

T, K, N = 64, 128, 96
HISTORY = 3


def _layer(generator: torch.Generator, **options) -> Float8Linear:
    layer = Float8Linear(K, N, amax_history=HISTORY, **options).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(N, K, generator=generator, dtype=torch.float64) * 0.05)
    return layer


def _expected(x, w, e, x_amax, g_amax, grad_fmt):
    """Fprop, Dgrad and Wgrad in float64 from fake_quantize: X scaled by ``x_amax`` and E by
    ``g_amax`` (saturating beyond them), W by its own amax."""
    def fq(t, fmt, amax):
        return fake_quantize(t, fmt, scale=float_scale(torch.tensor(amax), FORMATS[fmt].max)).double()

    xq, eq = fq(x, "e4m3", x_amax), fq(e, grad_fmt, g_amax)
    wq = fake_quantize(w, "e4m3").double()
    return xq @ wq.t(), eq @ wq, eq.t() @ xq


@pytest.mark.parametrize("grad_fmt", ["e5m2", "e4m3"])
def test_scales_come_from_the_last_steps_amax(grad_fmt, generator):
    """Step 1 scales with its own amax; step k > 1 with the largest amax of the (at most
    HISTORY) steps before it, including a step whose values exceed that range (saturated)."""
    layer = _layer(generator, grad_fmt=grad_fmt)
    x_amaxes, g_amaxes = [], []
    for x_size, g_size in ((3.0, 1e-3), (1.0, 2e-3), (8.0, 1e-4), (0.5, 5e-4), (0.25, 1e-3), (0.1, 3e-3)):
        x = (torch.randn(T, K, generator=generator, dtype=torch.float64) * x_size).requires_grad_()
        e = torch.randn(T, N, generator=generator, dtype=torch.float64) * g_size
        x_used = max(x_amaxes[-HISTORY:]) if x_amaxes else x.abs().max().item()
        g_used = max(g_amaxes[-HISTORY:]) if g_amaxes else e.abs().max().item()
        y = layer(x)
        y.backward(e)
        want = _expected(x.detach(), layer.weight.detach(), e, x_used, g_used, grad_fmt)
        for got, ref in zip((y, x.grad, layer.weight.grad), want):
            torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        layer.weight.grad = None
        x_amaxes.append(x.abs().max().item())
        g_amaxes.append(e.abs().max().item())
        recent = lambda amaxes: (amaxes[::-1] + [0.0] * HISTORY)[:HISTORY]  # noqa: E731 (newest first)
        torch.testing.assert_close(layer._x_amax_history, torch.tensor(recent(x_amaxes)), rtol=1e-7, atol=0)
        torch.testing.assert_close(layer._grad_amax_history, torch.tensor(recent(g_amaxes)), rtol=1e-7, atol=0)
    assert x_amaxes[2] > 2 * max(x_amaxes[:2])  # the third step did saturate


def test_saturation_is_counted(generator):
    layer = Float8Linear(K, N, amax_history=HISTORY)
    layer(torch.randn(T, K, generator=generator)).sum().backward()
    x = torch.randn(T, K, generator=generator)
    x[0, 0] = 100 * x.abs().max()  # beyond the first step's range: clipped at 448 · scale
    layer(x).sum().backward()
    n = x.numel() + layer.weight.numel() + T * N
    assert layer.last_stats()["saturated_frac"] == pytest.approx(1 / n)


@pytest.mark.parametrize("first,bad", [(False, -float("inf")), (False, float("nan")), (True, -float("inf"))],
                         ids=["delayed-inf", "delayed-nan", "first-step-inf"])
def test_a_non_finite_value_makes_the_step_non_finite_and_spares_the_history(first, bad, generator):
    """±inf (or, with the scale from the history, NaN) in X or E is not saturated against the
    history's range: the step's results are non-finite (its scale is NaN, or infinite on the
    first step) and it records amax 0, so it sets no later scale; the earlier entries shift as
    usual."""
    layer = Float8Linear(K, N, amax_history=HISTORY)
    if not first:
        layer(torch.randn(T, K, generator=generator)).sum().backward()
    x_history, g_history = layer._x_amax_history.clone(), layer._grad_amax_history.clone()
    x = torch.randn(T, K, generator=generator).requires_grad_()
    x_bad = x.detach().clone()
    x_bad[3, 4] = bad
    y = layer(x_bad)
    assert not torch.isfinite(y).any()
    e = torch.randn(T, N, generator=generator)
    e[0, 0] = -bad
    y_good = layer(x)
    y_good.backward(e)
    assert not torch.isfinite(x.grad).any() and not torch.isfinite(layer.weight.grad).any()
    assert layer._x_amax_history[1] == 0.0 and layer._grad_amax_history[0] == 0.0
    torch.testing.assert_close(layer._x_amax_history[2:], x_history[:HISTORY - 2], rtol=0, atol=0)
    torch.testing.assert_close(layer._grad_amax_history[1:], g_history[:HISTORY - 1], rtol=0, atol=0)


def test_compiled_steps_match_eager(generator):
    """Three steps compiled (the first with current scaling, then delayed) equal three eager
    steps of a twin layer, histories included."""
    torch._dynamo.reset()
    eager = Float8Linear(K, N, amax_history=HISTORY)
    compiled_layer = Float8Linear(K, N, amax_history=HISTORY)
    compiled_layer.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_layer)
    for size in (1.0, 3.0, 0.5):
        x = torch.randn(T, K, generator=generator) * size
        e = torch.randn(T, N, generator=generator)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        eager(x1).backward(e)
        compiled(x2).backward(e)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_layer.weight.grad, eager.weight.grad, rtol=1e-5, atol=1e-6)
        eager.weight.grad = compiled_layer.weight.grad = None
    torch.testing.assert_close(compiled_layer._x_amax_history, eager._x_amax_history, rtol=0, atol=0)
    torch.testing.assert_close(compiled_layer._grad_amax_history, eager._grad_amax_history, rtol=0, atol=0)


def test_state_dict_from_linear_and_dtype_casts(generator):
    lin = nn.Linear(K, N, bias=True)
    layer = Float8Linear.from_linear(lin, amax_history=HISTORY)
    assert list(layer.state_dict()) == list(lin.state_dict())
    assert layer._x_amax_history.device == lin.weight.device and not layer._x_amax_history.is_meta
    layer(torch.randn(T, K, generator=generator)).sum().backward()
    recorded = layer._x_amax_history.clone()
    layer = layer.to(torch.bfloat16)
    assert layer._x_amax_history.dtype == torch.float32 and torch.equal(layer._x_amax_history, recorded)
    assert "amax_history=3" in repr(layer)


def test_bad_arguments():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="amax_history"):
            Float8Linear(K, N, amax_history=bad)
    with pytest.raises(ValueError, match="scaling='tensor'"):
        Float8Linear(K, N, scaling="row", amax_history=4)


def test_a_forward_without_gradients_leaves_the_gradient_history_empty(generator):
    """An evaluation forward first (no graph, so no backward) fills only the input history: the
    first backward after it still scales E with its own amax, not with an empty history (whose
    scale 1 would flush gradients of ~1e-6 to zero)."""
    layer = _layer(generator)
    with torch.no_grad():
        layer(torch.randn(T, K, generator=generator, dtype=torch.float64))
    x_eval_amax = layer._x_amax_history[0].item()
    x = torch.randn(T, K, generator=generator, dtype=torch.float64).requires_grad_()
    e = torch.randn(T, N, generator=generator, dtype=torch.float64) * 1e-6
    layer(x).backward(e)
    want = _expected(x.detach(), layer.weight.detach(), e, x_eval_amax, e.abs().max().item(), "e5m2")
    for got, ref in zip((x.grad, layer.weight.grad), want[1:]):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
