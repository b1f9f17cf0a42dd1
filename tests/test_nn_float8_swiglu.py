"""The fused FP8 SwiGLU MLP (lpdist.nn.float8_swiglu) against its three Float8Linear layers and
float64 references (CPU: the torch twins of the CUDA kernels)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lpdist.nn.smooth_swiglu as smooth_swiglu
from lpdist.models.llama import Llama, preset
from lpdist.nn import Float8Linear, convert, swiglu
from lpdist.nn.float8_swiglu import float8_swiglu, fusable, swiglu_grad_values, swiglu_values
from lpdist.nn.fp8_cast import cast_fp8, cast_fp8_both_ways

T, K, H = 256, 256, 384


def _layers(scaling="tensor", grad_fmt="e5m2", dtype=torch.float32, **kwargs):
    return [Float8Linear(a, b, scaling=scaling, grad_fmt=grad_fmt, dtype=dtype, **kwargs)
            for a, b in ((K, H), (K, H), (H, K))]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _run(layers, x, dy, **options):
    x = x.clone().requires_grad_()
    y = swiglu(x, *layers, smooth=None, **options)
    y.backward(dy)
    grads = [layer.weight.grad for layer in layers]
    for layer in layers:
        layer.weight.grad = None
    return y.detach(), x.grad, *grads


def test_swiglu_values_match_float64_autograd(generator):
    """The twins' fp32 SwiGLU value and gradients: a few fp32 roundings (2^-24 each) from the
    float64 autograd of silu(g) * u."""
    g, u, dh = (torch.randn(64, 96, generator=generator, dtype=torch.float64) * 4 for _ in range(3))
    g64 = g.clone().requires_grad_()
    u64 = u.clone().requires_grad_()
    h64 = F.silu(g64) * u64
    h64.backward(dh)
    (h,) = swiglu_values(g.float(), u.float())
    dg, du = swiglu_grad_values(g.float(), u.float(), dh.float())
    for got, want in ((h, h64.detach()), (dg, g64.grad), (du, u64.grad)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("scaling,grad_fmt", [("tensor", "e5m2"), ("tensor", "e4m3"), ("block", "e4m3")])
def test_fused_mlp_equals_the_three_layers(scaling, grad_fmt, generator):
    """Output and all gradients equal the three Float8Linear layers run one by one. Only the
    rounding of SwiGLU's fp32 arithmetic differs (a few ulps, another order of operations):
    among 98k values of h, dg or du a few at most land on the other side of an FP8 rounding
    boundary and move by one step (2^-3 of themselves at most), so results differ by
    <= 1e-3 relative, against the FP8 error itself of about 6e-2."""
    fused = _layers(scaling, grad_fmt)
    layered = _layers(scaling, grad_fmt)
    for a, b in zip(fused, layered):
        b.load_state_dict(a.state_dict())
    x = torch.randn(4, T // 4, K, generator=generator)
    dy = torch.randn(4, T // 4, K, generator=generator)
    assert fusable(x, *fused)
    got = _run(fused, x, dy, fuse=True)
    want = _run(layered, x, dy)
    for name, a, b in zip(("y", "dx", "d_gate", "d_up", "d_down"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert a.abs().max() > 0 and _rel(a, b) <= 1e-3, (name, _rel(a, b))
    # and against float64 (the FP8 error of the layers, e5m2 gradients ~ 2^-3 relative)
    x64 = x.double().requires_grad_()
    w = [layer.weight.detach().double().requires_grad_() for layer in fused]
    y64 = (F.silu(x64 @ w[0].t()) * (x64 @ w[1].t())) @ w[2].t()
    y64.backward(dy.double())
    for a, b in zip(got, (y64.detach(), x64.grad, *(wi.grad for wi in w))):
        assert _rel(a, b) < 0.15
    for a, b in zip(fused, layered):  # telemetry as if each layer had run
        for key, value in b.last_stats().items():
            assert a.last_stats()[key] == pytest.approx(value, rel=1e-3, abs=1e-6), key


@pytest.mark.parametrize("scaling", ["tensor", "block"])
def test_fused_mlp_compiles_like_eager(scaling, generator):
    torch._dynamo.reset()
    layers = _layers(scaling, "e4m3")
    x = torch.randn(T, K, generator=generator)
    dy = torch.randn(T, K, generator=generator)
    eager = _run(layers, x, dy, fuse=True)
    compiled_fn = torch.compile(lambda t: swiglu(t, *layers, smooth=None, fuse=True), fullgraph=True)
    xc = x.clone().requires_grad_()
    compiled_fn(xc).backward(dy)
    compiled = (None, xc.grad, *(layer.weight.grad for layer in layers))
    for a, b in zip(compiled[1:], eager[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fusable_rules(generator):
    x = torch.randn(T, K, generator=generator)
    assert fusable(x, *_layers("tensor")) and fusable(x, *_layers("block", "e4m3"))
    assert not fusable(x, *_layers("row"))
    mixed = _layers("tensor")
    mixed[2] = Float8Linear(H, K, scaling="tensor", grad_fmt="e4m3")
    assert not fusable(x, *mixed)
    assert not fusable(x, *_layers("tensor", bias=True))
    hooked = _layers("tensor")
    hooked[1].register_forward_hook(lambda *args: None)
    assert not fusable(x, *hooked)
    assert not fusable(x, torch.nn.Linear(K, H), *_layers("tensor")[1:])
    assert not fusable(x[:0], *_layers("tensor"))
    with pytest.raises(ValueError, match="Float8Linear"):
        float8_swiglu(x, *_layers("row"))
    calls = []
    original = smooth_swiglu.float8_swiglu
    smooth_swiglu.float8_swiglu = lambda *args: calls.append(1) or original(*args)
    try:
        swiglu(x, *hooked, smooth=None, fuse=True)  # hooks: layer by layer
        swiglu(x, *_layers("tensor"), smooth=None)  # off by default
        assert calls == []
        swiglu(x, *_layers("tensor"), smooth=None, fuse=True)
        assert calls == [1]
    finally:
        smooth_swiglu.float8_swiglu = original


def test_nan_input_reaches_the_output(generator):
    """A NaN in x is not hidden: it does not set a scale and its row of y is NaN."""
    x = torch.randn(T, K, generator=generator)
    x[5, 7] = float("nan")
    y = swiglu(x, *_layers("tensor"), smooth=None, fuse=True)
    assert y[5].isnan().all() and y[torch.arange(T) != 5].isfinite().all()


@pytest.mark.parametrize("block", [0, 128])
def test_swiglu_cast_ops_check(block, generator):
    """The custom ops' fake (compile-time) outputs have the real shapes and strides, and the
    per-tensor both-ways cast is cast_fp8 and its transpose."""
    g, u, dh = (torch.randn(256, 384, generator=generator) for _ in range(3))
    torch.library.opcheck(torch.ops.lpdist.fp8_swiglu_cast_both_ways.default, (g, u, "e4m3", block, True))
    torch.library.opcheck(torch.ops.lpdist.fp8_swiglu_grad_cast_both_ways.default, (g, u, dh, "e5m2", block, True))
    torch.library.opcheck(torch.ops.lpdist.fp8_cast_both_ways.default, (g, "e4m3", block, False))
    rows, cols = cast_fp8_both_ways(g, "e5m2", None, track=True)
    want = cast_fp8(g, "e5m2", track=True)
    assert torch.equal(rows.data.view(torch.uint8), want.data.view(torch.uint8))
    assert torch.equal(cols.data.view(torch.uint8), want.data.t().contiguous().view(torch.uint8))
    assert torch.equal(cols.scale, want.scale) and rows.amax == want.amax
    with pytest.raises(ValueError, match="block"):
        cast_fp8_both_ways(g, "e4m3", 0)


def test_llama_mlps_fuse_when_asked(generator, monkeypatch):
    """The Llama's MLPs take the fused path with ``fuse = True`` under the fp8 recipe (not by
    default, not under fp8-smooth) and the model trains through it."""
    calls = []
    original = smooth_swiglu.float8_swiglu
    monkeypatch.setattr(smooth_swiglu, "float8_swiglu", lambda *args: calls.append(1) or original(*args))
    config = preset("tiny", vocab_size=256)
    for recipe, fuse, fused in (("fp8", True, True), ("fp8", False, False), ("fp8-smooth", True, False)):
        torch.manual_seed(0)
        model = Llama(config)
        convert(model, recipe)
        for block in model.layers:
            block.mlp.fuse = fuse
        calls.clear()
        tokens = torch.randint(0, 256, (2, 128), generator=generator)
        loss = F.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        assert len(calls) == (config.n_layers if fused else 0), (recipe, fuse)
        grads = [p.grad for p in model.parameters()]
        assert all(g is not None and g.isfinite().all() for g in grads)
