"""Bad input across the public API: a clear ValueError/TypeError naming the argument, or a
documented correct result (empty in, empty out; NaN in, NaN out) -- never a crash deep inside
torch or a silently wrong number. The collectives' twins (sizes that differ across ranks,
check_finite) are in tests/distributed/test_bad_input_dist.py.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from lpdist import checkpoint, comm, data, dist, kernels, models, nn as lnn, optim, quant
from lpdist.nn.smooth_swiglu import enable_smoothing

NAN, INF = float("nan"), float("inf")


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(8, 8))]


def _tiny_llama() -> models.Llama:
    torch.manual_seed(0)
    return models.Llama(models.preset("tiny"))


X = torch.randn(4, 64)
CONFIG = dict(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8)

# (id, call, exception, message fragment naming the argument)
CASES = [
    # lpdist.quant
    ("quantize-int", lambda: quant.quantize(torch.arange(8)), TypeError, "x must be a floating"),
    ("quantize-list", lambda: quant.quantize([1.0]), TypeError, "x must be a torch.Tensor"),
    ("quantize-fp8-input", lambda: quant.quantize(X.to(torch.float8_e4m3fn)), TypeError, "x must be"),
    ("quantize-fmt", lambda: quant.quantize(X, "e3m3"), ValueError, "fmt"),
    ("quantize-fmt-none", lambda: quant.quantize(X, None), ValueError, "fmt"),
    ("quantize-block-0", lambda: quant.quantize(X, block=0), ValueError, "block"),
    ("quantize-block-neg", lambda: quant.quantize(X, block=-4), ValueError, "block"),
    ("quantize-block-float", lambda: quant.quantize(X, block=1.5), ValueError, "block"),
    ("quantize-block-bool", lambda: quant.quantize(X, block=True), ValueError, "block"),
    ("quantize-mx-block", lambda: quant.quantize(X, "mxfp8", block=16), ValueError, "block"),
    ("quantize-rounding", lambda: quant.quantize(X, rounding="up"), ValueError, "rounding"),
    ("quantize-scale-shape", lambda: quant.quantize(X, block=32, scale=torch.ones(3)), ValueError, "scale"),
    ("quantize-scale-float", lambda: quant.quantize(X, scale=2.0), TypeError, "scale"),
    ("quantize-scale-int", lambda: quant.quantize(X, scale=torch.tensor(2)), TypeError, "scale"),
    ("quantize-scale-mx", lambda: quant.quantize(X, "mxfp8", scale=torch.ones(4, 2)), ValueError, "scale"),
    ("quantize-scale-rule", lambda: quant.quantize(X, "mxfp8", scale_rule="round"), ValueError, "scale_rule"),
    ("quantize-scale-rule-plain", lambda: quant.quantize(X, scale_rule="floor"), ValueError, "scale_rule"),
    ("dequantize-tensor", lambda: quant.dequantize(X), TypeError, "q must be a QTensor"),
    ("dequantize-int-dtype", lambda: quant.dequantize(quant.quantize(X), torch.int32), TypeError, "dtype"),
    ("dequantize-str-dtype", lambda: quant.dequantize(quant.quantize(X), "float32"), TypeError, "dtype"),
    ("fake-quantize-fmt", lambda: quant.fake_quantize(X, "bad"), ValueError, "fmt"),
    ("fake-quantize-int", lambda: quant.fake_quantize(torch.arange(3), "e4m3"), TypeError, "x must be"),
    ("round-fmt", lambda: quant.round_to_format(X, "e9m9"), ValueError, "fmt"),
    ("round-preset", lambda: quant.round_to_format(X, "mxfp8"), ValueError, "fmt"),
    ("round-rounding", lambda: quant.round_to_format(X, "e4m3", rounding="x"), ValueError, "rounding"),
    ("block-amax-0", lambda: quant.block_amax(X, 0), ValueError, "block"),
    ("quantize-generator", lambda: quant.quantize(X, generator="g"), TypeError, "generator"),
    ("round-int", lambda: quant.round_to_format(torch.arange(8), "e4m3"), TypeError, "floating-point tensor"),
    ("round-list", lambda: quant.round_to_format([1.0], "e4m3"), TypeError, "floating-point tensor"),
    # lpdist.nn
    ("f8-in-0", lambda: lnn.Float8Linear(0, 8), ValueError, "in_features"),
    ("f8-out-neg", lambda: lnn.Float8Linear(8, -1), ValueError, "out_features"),
    ("f8-in-float", lambda: lnn.Float8Linear(1.5, 8), ValueError, "in_features"),
    ("f8-block-in-str", lambda: lnn.Float8Linear("a", 128, scaling="block"), ValueError,
     "in_features must be a positive int"),
    ("f8-scaling", lambda: lnn.Float8Linear(64, 8, scaling="col"), ValueError, "scaling"),
    ("f8-block-0", lambda: lnn.Float8Linear(64, 8, scaling="block", block=0), ValueError, "block"),
    ("f8-block-untileable", lambda: lnn.Float8Linear(64, 8, scaling="block", block=100), ValueError, "block"),
    ("f8-grad-fmt", lambda: lnn.Float8Linear(64, 8, grad_fmt="e2m1"), ValueError, "grad_fmt"),
    ("f8-input-width", lambda: lnn.Float8Linear(64, 8)(torch.randn(4, 32)), ValueError, "in_features"),
    ("f8-input-int", lambda: lnn.Float8Linear(64, 8)(torch.ones(4, 64, dtype=torch.long)), TypeError, "input"),
    ("f4-recipe", lambda: lnn.FP4Linear(64, 8, recipe="x"), ValueError, "recipe"),
    ("f4-in-0", lambda: lnn.FP4Linear(0, 8), ValueError, "in_features"),
    ("f4-nvfp4-untileable", lambda: lnn.FP4Linear(10, 8, recipe="nvfp4"), ValueError, "in_features"),
    ("f4-nvfp4-in-str", lambda: lnn.FP4Linear("a", 128, recipe="nvfp4"), ValueError,
     "in_features must be a positive int"),
    ("f4-nvfp4-out-str", lambda: lnn.FP4Linear(128, "16", recipe="nvfp4"), ValueError,
     "out_features must be a positive int"),
    ("f4-input-width", lambda: lnn.FP4Linear(64, 8)(torch.randn(2, 32)), ValueError, "in_features"),
    ("f4-recipe-list", lambda: lnn.FP4Linear(64, 8, recipe=["dge"]), ValueError, "recipe"),
    ("f4-recipe-none", lambda: lnn.FP4Linear(64, 8, recipe=None), ValueError, "recipe"),
    *[(f"{name}-input-{dtype}", lambda make=make, dtype=dtype: make()(X.to(dtype)), TypeError, "input")
      for name, make in (("f8", lambda: lnn.Float8Linear(64, 8)), ("f4", lambda: lnn.FP4Linear(64, 8)))
      for dtype in (torch.float8_e4m3fn, torch.float8_e5m2)],
    ("f8-input-complex", lambda: lnn.Float8Linear(64, 8)(X.to(torch.complex64)), TypeError, "input"),
    ("set-tracking-model", lambda: lnn.set_tracking("model", True), TypeError, "model"),
    ("swiglu-dim", lambda: lnn.SmoothSwiGLU(0, 8), ValueError, "dim"),
    ("swiglu-hidden", lambda: lnn.SmoothSwiGLU(8, -8), ValueError, "hidden"),
    ("swiglu-linear", lambda: lnn.SmoothSwiGLU(8, 8, linear="fp8"), TypeError, "linear"),
    ("swiglu-smooth", lambda: lnn.SmoothSwiGLU(8, 8, smooth="row"), ValueError, "smooth"),
    ("swiglu-fn-smooth", lambda: lnn.swiglu(torch.randn(2, 8), torch.nn.Linear(8, 4), torch.nn.Linear(8, 4),
                                            torch.nn.Linear(4, 8), smooth="x"), ValueError, "smooth"),
    ("enable-smoothing-module", lambda: enable_smoothing(torch.nn.Linear(8, 8), "token"), ValueError, "module"),
    ("convert-recipe", lambda: lnn.convert(torch.nn.Linear(64, 64), "fp9"), ValueError, "recipe"),
    ("convert-model", lambda: lnn.convert("model", "fp8"), TypeError, "model"),
    ("convert-bare-linear", lambda: lnn.convert(torch.nn.Linear(64, 64), "fp8"), ValueError, "from_linear"),
    ("convert-filter", lambda: lnn.convert(torch.nn.Sequential(torch.nn.Linear(64, 64)), "fp8", filter_fn=3),
     TypeError, "filter_fn"),
    ("recipe-linear", lambda: lnn.Recipe("x", linear="fp16"), ValueError, "linear"),
    ("recipe-grad-comm", lambda: lnn.Recipe("x", grad_comm="e2m1"), ValueError, "grad_comm"),
    ("recipe-moments", lambda: lnn.Recipe("x", moments="fp7"), ValueError, "moments"),
    ("recipe-block", lambda: lnn.Recipe("x", linear="fp8", block=0), ValueError, "block"),
    ("recipe-fp4", lambda: lnn.Recipe("x", linear="fp4"), ValueError, "fp4_recipe"),
    ("recipe-keep-last", lambda: lnn.Recipe("x", keep_last_fraction=-0.1), ValueError, "keep_last_fraction"),
    ("recipe-keep-str", lambda: lnn.Recipe("x", keep_high_precision="lm_head"), TypeError, "keep_high_precision"),
    ("recipe-keep-none", lambda: lnn.Recipe("x", keep_high_precision=None), TypeError, "keep_high_precision"),
    ("recipe-keep-int", lambda: lnn.Recipe("x", keep_high_precision=("lm_head", 3)), TypeError,
     "keep_high_precision"),
    ("recipe-keep-last-str", lambda: lnn.Recipe("x", keep_last_fraction="0.1"), TypeError, "keep_last_fraction"),
    ("recipe-keep-last-bool", lambda: lnn.Recipe("x", keep_last_fraction=True), TypeError, "keep_last_fraction"),
    ("recipe-keep-last-nan", lambda: lnn.Recipe("x", keep_last_fraction=NAN), ValueError, "keep_last_fraction"),
    ("recipe-keep-last-one", lambda: lnn.Recipe("x", keep_last_fraction=1.0), ValueError, "keep_last_fraction"),
    ("recipe-fp4-list", lambda: lnn.Recipe("x", linear="fp4", fp4_recipe=["dge"]), ValueError, "fp4_recipe"),
    ("recipe-fp4-unused", lambda: lnn.Recipe("x", linear="fp8", fp4_recipe="bogus"), ValueError, "fp4_recipe"),
    ("recipe-linear-list", lambda: lnn.Recipe("x", linear=["fp8"]), ValueError, "linear"),
    ("recipe-smooth-list", lambda: lnn.Recipe("x", smooth_swiglu=["token"]), ValueError, "smooth_swiglu"),
    ("recipe-name", lambda: lnn.Recipe(None), TypeError, "name"),
    ("recipe-lookup-list", lambda: lnn.get_recipe(["fp8"]), ValueError, "recipe"),
    # lpdist.optim
    *[(f"adamw-{name}-{value}", functools.partial(optim.AdamW, _params(), **{name: value}), ValueError, name)
      for name, values in dict(lr=(-1.0, NAN, INF), eps=(-1.0, NAN, INF), weight_decay=(-0.1, NAN, INF),
                               betas=((1.0, 0.9), (NAN, 0.9), (0.9, INF), (0.9,)), block=(0, 100, 2048),
                               moments=("fp4", ("e4m3",), ("e4m3", "e2m1")), nonfinite=("ignore",)).items()
      for value in values],
    ("adamw-empty", lambda: optim.AdamW([]), ValueError, "empty parameter list"),
    ("adamw-int-param", lambda: optim.AdamW([torch.zeros(3, dtype=torch.long)]), TypeError, "parameters"),
    ("adamw-f64-param", lambda: optim.AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))]),
     TypeError, "parameters"),
    ("adamw-amsgrad", lambda: optim.AdamW(_params(), amsgrad=True), ValueError, "amsgrad"),
    ("wrap-not-optimizer", lambda: optim.wrap("adam"), TypeError, "optimizer"),
    ("wrap-moments", lambda: optim.wrap(torch.optim.AdamW(_params()), moments="x"), ValueError, "moments"),
    ("wrap-block", lambda: optim.wrap(torch.optim.AdamW(_params()), block=3), ValueError, "block"),
    ("wrap-shard", lambda: optim.wrap(torch.optim.AdamW(_params()), shard="x"), ValueError, "shard"),
    # lpdist.models
    ("preset-name", lambda: models.preset("2b"), ValueError, "preset"),
    ("preset-override", lambda: models.preset("tiny", dim=-1), ValueError, "dim"),
    ("config-heads", lambda: models.LlamaConfig(**{**CONFIG, "n_heads": 3}), ValueError, "n_heads"),
    ("config-kv-heads", lambda: models.LlamaConfig(**{**CONFIG, "n_kv_heads": 3}), ValueError, "n_kv_heads"),
    ("config-float-dim", lambda: models.LlamaConfig(**{**CONFIG, "dim": 64.0}), ValueError, "dim"),
    ("config-bool-layers", lambda: models.LlamaConfig(**{**CONFIG, "n_layers": True}), ValueError, "n_layers"),
    ("config-rope-nan", lambda: models.LlamaConfig(**CONFIG, rope_theta=NAN), ValueError, "rope_theta"),
    ("config-eps-neg", lambda: models.LlamaConfig(**CONFIG, norm_eps=-1e-5), ValueError, "norm_eps"),
    ("config-tie-str", lambda: models.LlamaConfig(**CONFIG, tie_embeddings="false"), TypeError, "tie_embeddings"),
    ("config-tie-int", lambda: models.LlamaConfig(**CONFIG, tie_embeddings=1), TypeError, "tie_embeddings"),
    ("llama-token-range", lambda: _tiny_llama()(torch.tensor([[600]])), ValueError, "tokens"),
    ("llama-token-negative", lambda: _tiny_llama()(torch.tensor([[-1]])), ValueError, "tokens"),
    ("llama-token-float", lambda: _tiny_llama()(torch.randn(1, 4)), TypeError, "tokens"),
    ("llama-token-1d", lambda: _tiny_llama()(torch.zeros(5, dtype=torch.long)), ValueError, "tokens"),
    ("llama-token-empty", lambda: _tiny_llama()(torch.zeros(1, 0, dtype=torch.long)), ValueError, "tokens"),
    ("llama-too-long", lambda: _tiny_llama()(torch.zeros(1, 300, dtype=torch.long)), ValueError, "max_seq_len"),
    # lpdist.data
    ("corpus-missing", lambda: data.load_corpus("/nonexistent/path"), ValueError, "data"),
    ("corpus-tokenizer", lambda: data.load_corpus(None, tokenizer="wordpiece"), ValueError, "tokenizer"),
    ("sampler-seq-0", lambda: data.WindowSampler(np.arange(100), 0), ValueError, "seq_len"),
    ("sampler-short", lambda: data.WindowSampler(np.arange(10), 64), ValueError, "seq_len"),
    ("sampler-float", lambda: data.WindowSampler(np.arange(100, dtype=np.float32), 8), TypeError, "tokens"),
    ("sampler-index", lambda: data.WindowSampler(np.arange(1000), 8).batch(-1, 0, 2), ValueError, "index"),
    ("sampler-batch", lambda: data.WindowSampler(np.arange(1000), 8).batch(0, 0, 0), ValueError, "batch_size"),
    ("sampler-rank", lambda: data.WindowSampler(np.arange(1000), 8).batch(0, -1, 2), ValueError, "rank"),
    ("sampler-seed-neg", lambda: data.WindowSampler(np.arange(100), 8, seed=-1), ValueError, "seed"),
    ("sampler-seed-float", lambda: data.WindowSampler(np.arange(100), 8, seed=1.5), ValueError, "seed"),
    # lpdist.comm hooks
    ("fsdp-hook-group", lambda: comm.FSDPHookState("group"), TypeError, "process_group"),
    ("ddp-hook-group", lambda: comm.DDPHookState(process_group=0), TypeError, "process_group"),
    ("ddp-hook-state", lambda: comm.fp8_ddp_hook(comm.FSDPHookState(), None), TypeError, "DDPHookState"),
    ("fsdp-hook-state", lambda: comm.fp8_fsdp_hook(None, torch.zeros(4)), TypeError, "FSDPHookState"),
    # lpdist.init
    ("init-backend", lambda: dist.init(backend="mpi"), ValueError, "backend"),
    ("init-timeout-neg", lambda: dist.init(timeout=-1), ValueError, "timeout"),
    ("init-timeout-nan", lambda: dist.init(timeout=NAN), ValueError, "timeout"),
    ("init-timeout-str", lambda: dist.init(timeout="10"), TypeError, "timeout"),
]


@pytest.mark.parametrize("call,error,match", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_bad_lpdist_backend_variable(monkeypatch):
    monkeypatch.setenv("LPDIST_BACKEND", "cuda")
    kernels._cupy.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"LPDIST_BACKEND must be unset or one of \('torch', 'cupy'\)"):
            kernels.backend()
    finally:
        monkeypatch.undo()
        kernels._cupy.cache_clear()


def test_bad_lpdist_timeout_variable(monkeypatch):
    monkeypatch.setenv("LPDIST_TIMEOUT", "ten")
    with pytest.raises(ValueError, match="LPDIST_TIMEOUT"):
        dist.init()
    monkeypatch.setenv("LPDIST_TIMEOUT", "-5")
    with pytest.raises(ValueError, match="LPDIST_TIMEOUT"):
        dist.init()


@pytest.mark.parametrize("kwargs,match", [
    (dict(step=-1), "step"), (dict(step=True), "step"), (dict(step="1"), "step"),
    (dict(keep=0), "keep"), (dict(keep="2"), "keep"), (dict(meta={"a": object()}), "meta"),
    (dict(model="model"), "model"), (dict(optimizer=None), "optimizer"),
])
def test_bad_checkpoint_save_arguments_write_nothing(tmp_path, kwargs, match):
    model = torch.nn.Linear(4, 4)
    args = dict(step=1, model=model, optimizer=torch.optim.AdamW(model.parameters()), **{})
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        checkpoint.save(tmp_path / "ckpt", args.pop("step"), args.pop("model"), args.pop("optimizer"), **args)
    assert not (tmp_path / "ckpt").exists()


def test_bad_checkpoint_load_arguments(tmp_path):
    with pytest.raises(TypeError, match="optimizer"):
        checkpoint.load(tmp_path, torch.nn.Linear(2, 2), "adam")


# ------------------------------------------------------------------ documented results

@pytest.mark.parametrize("fmt,block", [("e4m3", None), ("e5m2", 16), ("e2m1", 8), ("mxfp8", None),
                                       ("mxfp4", None), ("nvfp4", None)])
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 32)])
def test_empty_tensors_quantize_to_empty(fmt, block, shape):
    x = torch.empty(shape)
    y = quant.fake_quantize(x, fmt, block=block)
    assert y.shape == x.shape and y.dtype == x.dtype


def test_nan_stays_nan_and_inf_saturates(generator):
    """ALGORITHMS/DESIGN contract: NaN never becomes a number (FP8: per element; FP4: its block
    decodes as NaN); ±inf saturates to ±max times the scale of the finite values."""
    x = torch.randn(2, 32, generator=generator)
    x[0, 5] = NAN
    x[1, 7] = INF
    for fmt in ("e4m3", "e5m2"):
        y = quant.fake_quantize(x, fmt, block=16)
        assert torch.isnan(y[0, 5]) and torch.isnan(y).sum() == 1
        assert y[1, 7] == x[1, :16][torch.isfinite(x[1, :16])].abs().max()  # block amax maps to fmt max
    y = quant.fake_quantize(x, "e2m1", block=16)
    assert torch.isnan(y[0, :16]).all() and not torch.isnan(y[0, 16:]).any()
    assert torch.isfinite(y[1]).all()


@pytest.mark.parametrize("bad", [0.0, -1.0, NAN, INF])
def test_a_bad_given_scale_decodes_as_nan(generator, bad):
    x = torch.randn(2, 32, generator=generator)
    scale = x.abs().reshape(2, 2, 16).amax(-1) / 448
    scale[1, 0] = bad
    y = quant.fake_quantize(x, "e4m3", block=16, scale=scale)
    assert torch.isnan(y[1, :16]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[1, 16:]).all()


@pytest.mark.parametrize("make", [
    lambda: lnn.Float8Linear(32, 16, bias=True), lambda: lnn.Float8Linear(32, 16, scaling="row"),
    lambda: lnn.FP4Linear(32, 16, recipe="quartet"), lambda: lnn.FP4Linear(32, 16, recipe="nvfp4"),
    lambda: lnn.FP4Linear(32, 16, recipe="dge"),
])
def test_linears_on_an_empty_batch_return_empty_and_zero_gradients(make):
    layer = make()
    x = torch.empty(0, 5, 32, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


@pytest.mark.parametrize("make", [
    lambda: lnn.Float8Linear(32, 16), lambda: lnn.Float8Linear(32, 16, scaling="row"),
    lambda: lnn.FP4Linear(32, 16, recipe="quartet"), lambda: lnn.FP4Linear(32, 16, recipe="dge"),
    lambda: lnn.FP4Linear(32, 16, recipe="nvfp4"),
], ids=["fp8-tensor", "fp8-row", "quartet", "dge", "nvfp4"])
@pytest.mark.parametrize("where", ["input", "weight", "grad_out"])
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_linears_propagate_non_finite_values(make, where, bad, generator):
    """A NaN or ±inf in the input, the weight or the output gradient reaches every result
    (output, input gradient, weight gradient) that nn.Linear's reaches: never turned into a
    number. A NaN may spread over its scaling block (a whole row for per-token scales), not the
    batch; ±inf makes its FP8 scaling group's scale infinite, so with one scale per tensor every
    output is non-finite."""
    layer = make()
    x = torch.randn(32, 32, generator=generator)
    e = torch.randn(32, 16, generator=generator)
    {"input": x, "weight": layer.weight.data, "grad_out": e}[where][2, 3] = bad
    ref = torch.nn.Linear(32, 16, bias=False)
    ref.weight.data.copy_(layer.weight.data)
    results = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_()
        y = module(xi)
        y.backward(e)
        results.append([y.detach(), xi.grad, module.weight.grad])
    for name, ours, want in zip(("output", "input grad", "weight grad"), *results):
        assert (~torch.isfinite(ours)).any() == (~torch.isfinite(want)).any(), name
    per_tensor_scale = isinstance(layer, lnn.Float8Linear) and layer.scaling == "tensor"
    if math.isinf(bad) and per_tensor_scale and where != "grad_out":
        assert not torch.isfinite(results[0][0]).any()
    else:
        assert torch.isfinite(results[0][0]).any()


# --------------------------------------------- non-finite gradients in the optimizer (matrix)

MOMENTS = ["fp32", "bf16", "fp16", "fp8", ("e4m3", "bf16")]


@pytest.mark.parametrize("moments", MOMENTS, ids=str)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("when", ["first-step", "later-step"])
@pytest.mark.parametrize("make", ["AdamW", "wrap"])
def test_non_finite_gradient_changes_nothing(generator, moments, bad, policy, when, make):
    params = [torch.nn.Parameter(torch.randn(300, generator=generator)),
              torch.nn.Parameter(torch.randn(4, 64, generator=generator))]
    if make == "AdamW":
        opt = optim.AdamW(params, lr=1e-2, moments=moments, nonfinite=policy)
    else:
        opt = optim.wrap(torch.optim.AdamW(params, lr=1e-2), moments=moments)
        opt.nonfinite = policy
    if when == "later-step":
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        opt.step()
    before_params = [p.detach().clone() for p in params]
    before_state = opt.state_dict()
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    params[1].grad[2, 7] = bad
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite"):
            opt.step()
    else:
        opt.step()
        assert opt.skipped_steps == 1
    for p, b in zip(params, before_params):
        assert torch.equal(p.detach(), b)
    after_state = opt.state_dict()
    assert after_state["state"].keys() == before_state["state"].keys()
    for key, entry in before_state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after_state["state"][key][name])), name
    # the next finite step proceeds normally
    params[1].grad = torch.randn(params[1].shape, generator=generator)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params) and not torch.equal(params[1].detach(), before_params[1])


def test_hyper_parameter_made_nan_between_steps_is_refused(generator):
    params = _params()
    opt = optim.AdamW(params)
    opt.param_groups[0]["lr"] = NAN
    params[0].grad = torch.randn(8, 8, generator=generator)
    before = params[0].detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(params[0].detach(), before) and not opt.state


def test_empty_parameter_steps(generator):
    p = torch.nn.Parameter(torch.zeros(0))
    q = torch.nn.Parameter(torch.randn(5, generator=generator))
    before = q.detach().clone()
    opt = optim.AdamW([p, q], lr=0.1, weight_decay=0.0, moments="fp32")
    p.grad, q.grad = torch.zeros(0), torch.ones(5)
    opt.step()
    # Adam's first step moves every coordinate by lr * g / (|g| + eps) = lr (bias-corrected)
    assert p.shape == (0,) and torch.allclose(before - q.detach(), torch.full((5,), 0.1), atol=1e-6)
