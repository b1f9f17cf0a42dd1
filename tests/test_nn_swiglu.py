"""Smooth-SwiGLU: exact equivalence, bounded branch, FP8 outlier robustness (§11.3)."""

from __future__ import annotations

import copy
import functools
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from helpers import rel_error

from lpdist.nn import Float8Linear, FP4Linear, SmoothSwiGLU, convert, register_swiglu, swiglu
from lpdist.quant import fake_quantize

DIM, FFN, TOKENS = 64, 176, 32


def _reference(x, mlp):
    w1, w2, w3 = (p.weight.detach().double() for p in (mlp.up_proj, mlp.gate_proj, mlp.down_proj))
    x = x.double()
    return (F.silu(x @ w2.t()) * (x @ w1.t())) @ w3.t()


@pytest.mark.parametrize("smooth", ["token", "channel"])
def test_equivalent_to_swiglu_in_fp64(smooth, generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    mlp = SmoothSwiGLU(DIM, FFN, smooth=smooth).double()
    x = torch.randn(TOKENS, DIM, generator=generator, dtype=torch.float64)
    want = _reference(x, mlp)
    assert ((mlp(x) - want).abs().max() / want.abs().max()) < 1e-6
    plain = swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, smooth=None)
    assert ((plain - want).abs().max() / want.abs().max()) < 1e-12


def test_bias_is_not_rescaled(generator):
    lin = functools.partial(nn.Linear, bias=True, dtype=torch.float64)
    mlp = SmoothSwiGLU(DIM, FFN, linear=lin, smooth="token")
    x = torch.randn(TOKENS, DIM, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(mlp(x), swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, smooth=None))


def test_token_variant_bounds_the_linear_branch(generator):
    mlp = SmoothSwiGLU(DIM, FFN, smooth="token")
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("a", args[0]))
    x = torch.randn(TOKENS, DIM, generator=generator)
    mlp(x)
    swish = F.silu(mlp.gate_proj(x))
    assert (seen["a"].abs() <= swish.abs() * (1 + 1e-6)).all()


class _OutlierUp(nn.Module):
    """``up_proj`` whose output has one token (row) or one channel (column) ``factor``x larger."""

    def __init__(self, inner: nn.Module, axis: str, factor: float) -> None:
        super().__init__()
        self.inner, self.axis, self.factor = inner, axis, factor
        self.weight = inner.weight

    def forward(self, x):
        u = self.inner(x)
        mask = torch.ones_like(u)
        if self.axis == "token":
            mask[3] = self.factor
        else:
            mask[:, 5] = self.factor
        return u * mask


class _DelayedFP8Linear(nn.Module):
    """FP8 linear with a per-tensor E4M3 input scale taken from the previous batch (delayed
    scaling, §2.1/§11.3) and a current per-tensor E4M3 weight scale; fp64 GEMM."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.input_scale: torch.Tensor | None = None

    def forward(self, a):
        if self.input_scale is None:  # calibration batch
            self.input_scale = a.detach().abs().max().float() / 448.0
        a_q = fake_quantize(a, "e4m3", scale=self.input_scale).double()
        return a_q @ fake_quantize(self.weight, "e4m3").double().t()


@pytest.mark.parametrize("smooth", ["token", "channel"])
def test_outlier_fp8_error_at_least_5x_lower(smooth, generator):
    """§11.3: one token (per-token variant) or one channel (per-channel variant) of u is 1000x
    larger than in the previous batch. The previous batch's E4M3 scale saturates the plain
    down-projection input; the smoothed input stays bounded by |Swish(g)| and fits."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    mlp = SmoothSwiGLU(DIM, FFN, smooth=smooth).double()
    x_prev, x = (torch.randn(TOKENS, DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    errors = {}
    for mode in (None, smooth):
        mlp.smooth = mode
        mlp.down_proj = _DelayedFP8Linear(mlp.down_proj.weight.detach())
        with torch.no_grad():
            mlp(x_prev)  # sets the delayed input scale from a normal batch
            mlp.up_proj = _OutlierUp(mlp.up_proj, smooth, 1000.0)
            g = x @ mlp.gate_proj.weight.t()
            want = (F.silu(g) * mlp.up_proj(x)) @ mlp.down_proj.weight.t()
            y = mlp(x)
            mlp.up_proj = mlp.up_proj.inner
        errors[mode] = ((y - want).norm() / want.norm()).item()
    assert errors[smooth] < 0.1  # within FP8 error: e4m3 input and weight, 2^-4 each
    assert errors[smooth] * 5 <= errors[None], errors


def test_current_scaling_absorbs_moderate_outliers(generator):
    """With Float8Linear's current (just-in-time) per-tensor scaling, a 1000x token outlier
    costs the ordinary tokens little either way; a 1e5x spike flushes them unless smoothed."""
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    mlp = SmoothSwiGLU(DIM, FFN, linear=functools.partial(Float8Linear, scaling="tensor"))
    inner = mlp.up_proj
    x = torch.randn(TOKENS, DIM, generator=generator)
    keep = torch.ones(TOKENS, dtype=torch.bool)
    keep[3] = False  # the ordinary tokens (the outlier row dominates any global norm)
    errors = {}
    for factor in (1e3, 1e5):
        mlp.up_proj = _OutlierUp(inner, "token", factor)
        g = x.double() @ mlp.gate_proj.weight.detach().double().t()
        want = (F.silu(g) * mlp.up_proj(x).detach().double()) @ mlp.down_proj.weight.detach().double().t()
        for mode in (None, "token"):
            mlp.smooth = mode
            with torch.no_grad():
                y = mlp(x).double()
            errors[factor, mode] = ((y - want)[keep].norm() / want[keep].norm()).item()
    assert errors[1e3, None] < 0.15 and errors[1e3, "token"] < 0.15
    assert errors[1e5, "token"] * 5 <= errors[1e5, None], errors


def test_register_swiglu_and_convert(generator):
    @register_swiglu
    class MyMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_gate, self.w_up, self.w_down = (nn.Linear(DIM, FFN, bias=False),
                                                   nn.Linear(DIM, FFN, bias=False),
                                                   nn.Linear(FFN, DIM, bias=False))

        def forward(self, x):
            return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))

    register_swiglu(MyMLP, gate="w_gate", up="w_up", down="w_down")
    model = nn.Sequential(MyMLP()).double()
    x = torch.randn(TOKENS, DIM, generator=generator, dtype=torch.float64)
    before = model(x)
    summary = convert(model, "fp8-smooth", filter_fn=lambda name, m: False)
    assert summary.smoothed == ["0"] and summary.num_converted == 0 and model[0].smooth == "token"
    assert ((model(x) - before).abs().max() / before.abs().max()) < 1e-6
    with pytest.raises(ValueError, match="smooth"):
        swiglu(x, model[0].w_gate, model[0].w_up, model[0].w_down, smooth="row")


@pytest.mark.parametrize("recipe", ["quartet", "dge", "nvfp4"])
def test_works_with_fp4_projections(recipe, generator):
    mlp = SmoothSwiGLU(DIM, 128, linear=functools.partial(FP4Linear, recipe=recipe), smooth="token")
    x = torch.randn(TOKENS, DIM, generator=generator, requires_grad=True)
    y = mlp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert rel_error(y.detach(), _reference(x.detach(), mlp).float()) < 0.5  # E2M1: ~2^-2 per operand


# Smoothing adds bf16 roundings that plain SwiGLU does not have, each a relative error of at most
# the unit roundoff u = 2^-8 on a value no larger than the output (the bias is added last, so no
# cancellation magnifies them): "token" rounds u/s, the down projection's matmul output and its
# product with s (three, against the one rounding of matmul + bias); "channel" rounds u/s and
# W3·diag(s) (two). So the smoothed error may exceed the plain one by at most that many u.
_BF16_U = 2.0 ** -8
_EXTRA_ROUNDINGS = {"token": 3, "channel": 2}


@pytest.mark.parametrize("smooth", ["token", "channel"])
def test_bf16_smoothing_with_biases_keeps_bf16_accuracy(smooth, generator):
    lin = functools.partial(nn.Linear, bias=True)
    mlp = SmoothSwiGLU(DIM, FFN, linear=lin, smooth=smooth)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / p.shape[-1] ** 0.5)
        mlp.up_proj.weight.mul_(50.0)  # a large linear branch: per-token scales s of 10^2..10^3
        mlp.down_proj.bias.fill_(4.0)  # a bias of the output's size
    x = torch.randn(TOKENS, DIM, generator=generator).to(torch.bfloat16)
    mlp = mlp.to(torch.bfloat16)
    ref = swiglu(x.double(), *(copy.deepcopy(m).double() for m in (mlp.gate_proj, mlp.up_proj,
                                                                    mlp.down_proj)), smooth=None)
    plain = rel_error(swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, smooth=None).double(), ref)
    smoothed = rel_error(mlp(x).double(), ref)
    assert smoothed <= plain + _EXTRA_ROUNDINGS[smooth] * _BF16_U, (smoothed, plain)


@register_swiglu
class _RegisteredMLP(nn.Module):
    """A SwiGLU MLP known to ``convert`` only through :func:`register_swiglu` (importable by
    name, as a pickled model's classes must be)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(DIM, FFN, bias=False), nn.Linear(DIM, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, DIM, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def test_smoothed_registered_mlp_survives_pickle_save_load_and_deepcopy(generator):
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = nn.Sequential(_RegisteredMLP())
    convert(model, "fp8-smooth")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    x = torch.randn(TOKENS, DIM, generator=generator)
    mlp = model[0]
    want = swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, smooth="token")
    assert not torch.equal(swiglu(x, mlp.gate_proj, mlp.up_proj, mlp.down_proj, smooth=None), want)
    clones = (pickle.loads(pickle.dumps(model)), torch.load(buf, weights_only=False), copy.deepcopy(model))
    for clone in clones:
        assert isinstance(clone[0], _RegisteredMLP) and clone[0].smooth == "token"
        assert isinstance(clone[0].down_proj, Float8Linear)
        assert torch.equal(clone(x), want)  # the smoothed forward, not the class's own
    assert torch.equal(model(x), want)


def _folded_copy(mlp: SmoothSwiGLU, s: torch.Tensor) -> SmoothSwiGLU:
    """A plain (unsmoothed) SwiGLU with the paper's per-channel factors folded into its weights
    (§2.3, §11.3): ``w̃1,i = s_i·w1,i`` (row i of up_proj) and ``w̃3,i = w3,i/s_i`` (column i of
    down_proj). ``s`` is the paper's factor, which multiplies the linear branch."""
    folded = copy.deepcopy(mlp)
    folded.smooth = None
    with torch.no_grad():
        folded.up_proj.weight.mul_(s[:, None])
        folded.down_proj.weight.div_(s[None, :])
    return folded


@pytest.mark.parametrize("scale", ["module", "random"])
def test_inference_folding_gives_the_smoothed_output_in_fp64(scale, generator):
    """§11.3 inference folding. The per-channel module divides the linear branch by
    ``s_j = max_t |u_tj|`` (the paper's factor is its inverse, §2.3 implementer's note); folding
    ``1/s`` into W1 and W3 gives a plain SwiGLU whose output equals the smoothed module's and the
    float64 SwiGLU reference (rel. 1e-12), and whose down projection sees the same, bounded input
    as the smoothed one. Any other s > 0 (log-uniform over 10^±3) leaves the output unchanged too."""
    mlp = SmoothSwiGLU(DIM, FFN, smooth="channel").double()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) / p.shape[-1] ** 0.5)
        spread = torch.logspace(-2, 2, FFN, dtype=torch.float64)[torch.randperm(FFN, generator=generator)]
        mlp.up_proj.weight.mul_(spread[:, None])  # channel scales over four decades
    x = torch.randn(TOKENS, DIM, generator=generator, dtype=torch.float64)
    u = x @ mlp.up_proj.weight.detach().t()
    if scale == "module":
        s_paper = 1.0 / u.abs().amax(dim=0)
    else:
        s_paper = 10.0 ** (6 * torch.rand(FFN, generator=generator, dtype=torch.float64) - 3)
    folded = _folded_copy(mlp, s_paper)
    seen = {}
    mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("smoothed", args[0]))
    folded.down_proj.register_forward_pre_hook(lambda m, args: seen.setdefault("folded", args[0]))
    with torch.no_grad():
        want, got, reference = mlp(x), folded(x), _reference(x, mlp)
    assert rel_error(got, want) <= 1e-12
    assert rel_error(got, reference) <= 1e-12
    if scale == "module":
        assert rel_error(seen["folded"], seen["smoothed"]) <= 1e-12
        swish = F.silu(x @ mlp.gate_proj.weight.detach().t())
        assert (seen["folded"].abs() <= swish.abs() * (1 + 1e-12)).all()
