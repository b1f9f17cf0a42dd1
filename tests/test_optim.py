"""lpdist.optim.AdamW on CPU (the torch reference path): parity with torch.optim.AdamW, tracking
in low precision, the ALGORITHMS.md §0 second-moment case, non-finite gradients, state dicts."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from lpdist.optim import AdamW, clip_coefficient
from lpdist.optim.fused import stochastic_round
from lpdist.optim.moments import MOMENT_FORMATS, decode, encode, sqrt_rn
from lpdist.quant import fake_quantize


def _mlp(generator: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.GELU(), torch.nn.Linear(40, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model.to(dtype)


def _train(model, opt, generator, steps, batch=32):
    for _ in range(steps):
        x = torch.randn(batch, 24, generator=generator)
        opt.zero_grad()
        model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        opt.step()


def _groups(model, lr):
    """Two groups with different hyper-parameters (per-group overrides)."""
    first, second = model[0], model[2]
    return [{"params": first.parameters()},
            {"params": second.parameters(), "lr": lr * 0.5, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


@pytest.mark.parametrize("maximize", [False, True])
def test_fp32_moments_match_torch_adamw_over_100_steps(generator, maximize):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    opt = AdamW(_groups(model, 1e-2), lr=1e-2, weight_decay=0.1, moments="fp32", maximize=maximize)
    ref_opt = torch.optim.AdamW(_groups(ref, 1e-2), lr=1e-2, weight_decay=0.1, maximize=maximize)
    _train(model, opt, torch.Generator().manual_seed(seed), 100)
    _train(ref, ref_opt, torch.Generator().manual_seed(seed), 100)
    # Same fp32 math in a different operation order (torch uses lerp/addcdiv): differences are
    # a few fp32 ulps per step on parameters of magnitude ~1 -> far below 1e-6 after 100 steps.
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_reference_step_is_per_operation_fp32(generator):
    """The torch reference must do exactly what csrc/adam.cu does: every operation a correctly
    rounded fp32 operation. Oracle: numpy float32 (IEEE per operation), 3 steps, bit for bit."""
    n = 4099
    p0 = torch.randn(n, generator=generator)
    grads = [torch.randn(n, generator=generator) * 10.0 ** torch.randint(-8, 1, (n,), generator=generator)
             for _ in range(3)]
    param = torch.nn.Parameter(p0.clone())
    opt = AdamW([param], lr=3e-3, weight_decay=0.05, moments="fp32")
    f32 = np.float32
    p, m, v = p0.numpy().copy(), np.zeros(n, f32), np.zeros(n, f32)
    for t, g in enumerate(grads, start=1):
        param.grad = g.clone()
        opt.step()
        g = g.numpy()
        b1, b2, lr, wd, eps = f32(0.9), f32(0.999), f32(3e-3), f32(0.05), f32(1e-8)
        bc1, inv_bc2 = f32(1 - 0.9**t), f32((1 - 0.999**t) ** -0.5)
        m = b1 * m + f32(1 - 0.9) * g
        v = b2 * v + f32(1 - 0.999) * (g * g)
        denom = np.sqrt(v) * inv_bc2 + eps
        p = p * (f32(1) - lr * wd) - (lr / bc1) * (m / denom)
    assert np.array_equal(param.detach().numpy(), p)
    assert np.array_equal(opt.state[param]["exp_avg_sq_codes"].numpy(), v)


def test_sqrt_rn_is_correctly_rounded(generator):
    x = torch.rand(100_000, generator=generator) * 10.0 ** torch.randint(-30, 30, (100_000,), generator=generator)
    assert np.array_equal(sqrt_rn(x).numpy(), np.sqrt(x.numpy()))  # numpy's float32 sqrt is IEEE


def test_tensor_lr_and_scheduler_drive_the_step(generator):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    opt = AdamW(model.parameters(), lr=torch.tensor(1e-2), moments="fp32")
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.3)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=3, gamma=0.3)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    g1, g2 = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(10):
        _train(model, opt, g1, 1)
        _train(ref, ref_opt, g2, 1)
        sched.step()
        ref_sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1e-2 * 0.3**3, rel=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def _corpus_windows(context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte-level next-character windows from a real text: this Python's ``os.py`` source."""
    data = torch.tensor(list(open(os.__file__, "rb").read()[:60000]), dtype=torch.long).clamp(max=127)
    idx = torch.arange(len(data) - context - 1)
    x = data[idx[:, None] + torch.arange(context)]
    return x, data[idx + context]


class _CharMLP(torch.nn.Module):
    def __init__(self, context: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(128, 16)
        self.hidden = torch.nn.Linear(16 * context, 64)
        self.out = torch.nn.Linear(64, 128)

    def forward(self, x):
        return self.out(torch.nn.functional.gelu(self.hidden(self.embed(x).flatten(1))))


def _lm_loss(make_opt, steps=300, context=8):
    x, y = _corpus_windows(context)
    torch.manual_seed(0)
    model = _CharMLP(context)
    opt = make_opt(model.parameters())
    g = torch.Generator().manual_seed(1)
    train_idx, held = torch.arange(0, len(x) - 4096), torch.arange(len(x) - 4096, len(x))
    for _ in range(steps):
        b = train_idx[torch.randint(len(train_idx), (64,), generator=g)]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[b]), y[b]).backward()
        opt.step()
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(x[held]), y[held]).item()


def test_low_precision_moments_track_fp32_on_a_char_lm():
    """Next-byte prediction on real source text: held-out loss within 2% of fp32 AdamW."""
    kw = dict(lr=3e-3, weight_decay=0.01)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threading only adds synchronisation on a busy CPU
    try:
        _check_lm_tracking(kw)
    finally:
        torch.set_num_threads(threads)


def _check_lm_tracking(kw):
    reference = _lm_loss(lambda ps: torch.optim.AdamW(ps, **kw))
    assert reference < 0.8 * torch.log(torch.tensor(128.0)).item()  # it actually learned
    for moments in ("fp8", "fp16", "bf16"):
        loss = _lm_loss(lambda ps: AdamW(ps, moments=moments, **kw))
        assert abs(loss - reference) <= 0.02 * reference, (moments, loss, reference)


def test_fp8_state_bytes_per_param(generator):
    model = torch.nn.Linear(1000, 300)  # 300,300 params: many blocks plus a partial last block
    opt = AdamW(model.parameters(), moments="fp8", block=128)
    model(torch.randn(2, 1000, generator=generator)).sum().backward()
    opt.step()
    per_param = opt.memory_bytes() / sum(p.numel() for p in model.parameters())
    assert per_param <= 2.07  # 1 + 1 code bytes + 2 fp32 scales per 128 elements = 2.0625
    fp16 = AdamW(model.parameters(), moments="fp16")
    fp16.step()
    assert fp16.memory_bytes() / sum(p.numel() for p in model.parameters()) <= 4.07


def test_fp8_in_a_moments_tuple_means_the_fp8_presets_format_at_that_position(generator):
    """``("fp8", "fp16")``: m in E4M3 (as the "fp8" preset stores m), v in fp16; it trains exactly
    as the explicit ``("e4m3", "fp16")`` does."""
    model = _mlp(generator)
    twin = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    opt = AdamW(model.parameters(), lr=1e-2, moments=("fp8", "fp16"))
    ref = AdamW(twin.parameters(), lr=1e-2, moments=("e4m3", "fp16"))
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    _train(model, opt, torch.Generator().manual_seed(seed), 5)
    _train(twin, ref, torch.Generator().manual_seed(seed), 5)
    for p, q, p0 in zip(model.parameters(), twin.parameters(), start):
        st = opt.state[p]
        assert (st["exp_avg_codes"].dtype, st["exp_avg_sq_codes"].dtype) == (torch.float8_e4m3fn, torch.float16)
        assert torch.equal(p, q) and not torch.equal(p, p0)


def _adam_updates(moment_fn, grads, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
    """Per-step AdamW updates with stored moments passed through ``moment_fn(m, v)``."""
    m = torch.zeros_like(grads[0])
    v = torch.zeros_like(grads[0])
    updates = []
    for t, g in enumerate(grads, start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
        updates.append(lr * m_hat / (v_hat.sqrt() + eps))
        m, v = moment_fn(m, v)
    return torch.stack(updates)


def test_fp8_second_moment_never_blows_up_over_seven_decades(generator):
    """ALGORITHMS.md §0: one 128-block whose gradient magnitudes span 1 .. 1e-7."""
    magnitudes = torch.logspace(0, -7, 128)
    grads = [magnitudes * (0.5 + torch.randn(128, generator=generator)) for _ in range(60)]
    exact = _adam_updates(lambda m, v: (m, v), grads)

    def naive(m, v):  # E4M3 m and E5M2 v itself, block-scaled: v of small elements flushes to 0
        return fake_quantize(m, "e4m3", block=128), fake_quantize(v, "e5m2", block=128)
    naive_updates = _adam_updates(naive, grads)

    model = torch.nn.Linear(128, 1, bias=False)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.0, moments="fp8", block=128)
    ours = []
    for g in grads:
        before = model.weight.detach().clone()
        model.weight.grad = g.view(1, 128).clone()
        opt.step()
        ours.append((before - model.weight.detach()).view(128))
    ours = torch.stack(ours)
    envelope = exact.abs().amax()  # the largest fp32-moment update (~lr)
    # The case is real: the naive layout produces updates orders of magnitude outside it.
    assert naive_updates.abs().amax() > 20 * envelope
    # Ours stays inside: sqrt(v) spans 7 decades (E5M2 block range ~9.6), stored with relative
    # error <= 2^-3 and never flushed; m has error <= 2^-4 or flushes to 0. The ratio m/sqrt(v)
    # is off by at most a few quantization errors compounded through the EMAs (< 1.5x).
    assert ours.abs().amax() <= 1.5 * envelope
    per_element_max = exact.abs().amax(dim=0)
    assert (ours.abs().amax(dim=0) <= 1.5 * per_element_max + 1e-12).all()
    # And it is still Adam where E4M3 holds m in its normal range (gradients within 3 decades of
    # the block max; below that m loses precision and then flushes to 0): the same direction.
    normal = (exact.abs() > 0.3 * envelope) & (magnitudes >= 1e-3)
    assert (torch.sign(ours[normal]) == torch.sign(exact[normal])).float().mean() > 0.97


def test_moment_encoding_error_bounds(generator):
    x = torch.randn(1000, generator=generator) * torch.logspace(-3, 0, 1000)
    for name, rel in (("e4m3", 2.0**-4), ("e5m2", 2.0**-3), ("fp16", 2.0**-11), ("bf16", 2.0**-8)):
        fmt = MOMENT_FORMATS[name]
        codes, scales = encode(x, fmt, 128, positive_floor=False)
        back = decode(codes, scales, fmt, 128)
        # Elements within 5 binades of their block max are normal numbers in every format
        # (E4M3 spans 2^-6..448 = 14.8 binades): RNE relative error <= 2^-(mbits+1).
        block_amax = torch.nn.functional.pad(x.abs(), (0, 24)).view(-1, 128).amax(1)
        normal = x.abs() >= 2.0**-5 * block_amax.repeat_interleave(128)[:1000]
        torch.testing.assert_close(back[normal], x[normal], rtol=rel, atol=0)
    root = torch.tensor([1.0, 1e-30, 0.0])
    codes, scales = encode(root, MOMENT_FORMATS["e5m2"], 128, positive_floor=True)
    stored = decode(codes, scales, MOMENT_FORMATS["e5m2"], 128)
    assert stored[1] > 0 and stored[2] == 0  # a positive sqrt(v) is never flushed to zero


def _snapshot(model, opt):
    return ([p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict()))


def _assert_same(a, b):
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert a[1]["state"].keys() == b[1]["state"].keys()
    for i in a[1]["state"]:
        for k, v in a[1]["state"][i].items():
            assert torch.equal(v, b[1]["state"][i][k]), k


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_changes_nothing(generator, policy):
    model = _mlp(generator)
    opt = AdamW(model.parameters(), lr=1e-2, moments="fp8", nonfinite=policy)
    _train(model, opt, generator, 3)
    before = _snapshot(model, opt)
    for bad in (float("nan"), float("inf")):
        model(torch.randn(4, 24, generator=generator)).sum().backward()
        model[2].weight.grad[1, 2] = bad  # only one element of one (late) parameter
        if policy == "raise":
            with pytest.raises(FloatingPointError):
                opt.step()
        else:
            opt.step()
        _assert_same(before, _snapshot(model, opt))
        opt.zero_grad()
    assert opt.skipped_steps == (2 if policy == "skip" else 0)
    # A first step that fails creates no state either.
    fresh = AdamW(_mlp(generator).parameters(), nonfinite=policy)
    for p in fresh.param_groups[0]["params"]:
        p.grad = torch.full_like(p, float("nan"))
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            fresh.step()
    else:
        fresh.step()
    assert len(fresh.state) == 0


def test_grads_finite_flag_replaces_the_scan(generator):
    """A caller's flag (e.g. from the clipped gradient norm) steps exactly like the scan when
    True, and when False applies the policy with parameters and state unchanged."""
    model = _mlp(generator)
    twin = copy.deepcopy(model)
    opt = AdamW(model.parameters(), lr=1e-2, moments="fp8", nonfinite="skip")
    ref = AdamW(twin.parameters(), lr=1e-2, moments="fp8", nonfinite="skip")
    ref._seed = opt._seed
    as_flag = (lambda n: bool(torch.isfinite(n)), torch.isfinite, lambda n: torch.isfinite(n).int())
    for make_flag in as_flag:
        x = torch.randn(8, 24, generator=generator)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
        opt.step(grads_finite=make_flag(norm))
        ref.step()
        _assert_same(_snapshot(twin, ref), _snapshot(model, opt))
    before = _snapshot(model, opt)
    opt.step(grads_finite=torch.tensor(False))  # finite gradients, but the caller says otherwise
    _assert_same(before, _snapshot(model, opt))
    assert opt.skipped_steps == 1
    for bad in (torch.tensor(0.5), torch.tensor([True, True]), "yes"):
        with pytest.raises(TypeError, match="grads_finite"):
            opt.step(grads_finite=bad)


@pytest.mark.parametrize("moments", ["fp8", "fp32", "bf16"])
def test_grad_scale_clips_inside_the_step(generator, moments):
    """``step(grad_scale=clip_coefficient(norm, max_norm))`` equals ``clip_grad_norm_`` followed by
    a plain step, bit for bit (fp32 gradients: the same fp32 products), and leaves ``.grad`` as
    it was; the coefficient is the one torch applies, below 1 here (the norm exceeds max_norm)."""
    model = _mlp(generator)
    twin = copy.deepcopy(model)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, moments=moments)
    ref = AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, moments=moments)
    ref._seed = opt._seed
    max_norm = 0.05
    for _ in range(4):
        x = torch.randn(16, 24, generator=generator)
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        coefficient = clip_coefficient(norm, max_norm)
        ref_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        assert torch.equal(norm, ref_norm) and 0 < coefficient.item() < 1
        opt.step(grads_finite=True, grad_scale=coefficient)
        ref.step()
        _assert_same(_snapshot(twin, ref), _snapshot(model, opt))
        for g, p in zip(grads, model.parameters()):
            assert torch.equal(g, p.grad)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_bad_grad_scale_changes_nothing(generator, policy):
    """A NaN or infinite grad_scale tensor is a non-finite gradient (policy applies, nothing
    written); a non-finite float, or something that is not a real scalar, is refused by name."""
    model = _mlp(generator)
    opt = AdamW(model.parameters(), lr=1e-2, moments="fp8", nonfinite=policy)
    _train(model, opt, generator, 2)
    model(torch.randn(4, 24, generator=generator)).sum().backward()
    before = _snapshot(model, opt)
    for bad in (torch.tensor(float("nan")), torch.tensor([float("inf")])):
        if policy == "raise":
            with pytest.raises(FloatingPointError):
                opt.step(grad_scale=bad)
        else:
            opt.step(grad_scale=bad)
        _assert_same(before, _snapshot(model, opt))
    assert opt.skipped_steps == (2 if policy == "skip" else 0)
    with pytest.raises(ValueError, match="grad_scale must be finite"):
        opt.step(grad_scale=float("inf"))
    for bad in (True, torch.tensor(1), torch.ones(2), "0.5"):
        with pytest.raises(TypeError, match="grad_scale"):
            opt.step(grad_scale=bad)
    _assert_same(before, _snapshot(model, opt))
    opt.step(grad_scale=0.5)  # a float works
    assert not torch.equal(before[0][0], next(model.parameters()).detach())


@pytest.mark.parametrize("moments", ["fp8", "fp32"])
def test_state_dict_round_trip_through_torch_adamw(generator, moments):
    model = _mlp(generator)
    opt = AdamW(model.parameters(), lr=1e-2, moments=moments)
    _train(model, opt, generator, 5)
    sd = opt.state_dict()
    for i, p in enumerate(model.parameters()):
        assert sd["state"][i]["exp_avg"].shape == p.shape
        assert sd["state"][i]["exp_avg_sq"].shape == p.shape
        assert float(sd["state"][i]["step"]) == 5
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch_opt.load_state_dict(sd)
    for i, p in enumerate(model.parameters()):
        assert torch.equal(torch_opt.state[p]["exp_avg"], sd["state"][i]["exp_avg"])
    back = AdamW(model.parameters(), lr=1e-2, moments=moments)
    back.load_state_dict(torch_opt.state_dict())
    sd2 = back.state_dict()
    # Requantizing dequantized moments reproduces them: same block amax, same scale, same codes.
    for i in sd["state"]:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sd2["state"][i][key], sd["state"][i][key], rtol=1e-6, atol=0)
    # The continued runs agree.
    twin = copy.deepcopy(model)
    twin_opt = AdamW(twin.parameters(), lr=1e-2, moments=moments)
    twin_opt.load_state_dict(sd)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    _train(model, back, torch.Generator().manual_seed(seed), 3)
    _train(twin, twin_opt, torch.Generator().manual_seed(seed), 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_torch_adamw_checkpoint_continues_in_lpdist(generator):
    model = _mlp(generator)
    torch_opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, torch_opt, generator, 4)
    twin = copy.deepcopy(model)
    opt = AdamW(twin.parameters(), lr=1e-2, moments="fp32")
    opt.load_state_dict(torch_opt.state_dict())
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    _train(model, torch_opt, torch.Generator().manual_seed(seed), 5)
    _train(twin, opt, torch.Generator().manual_seed(seed), 5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_bf16_params_stochastic_rounding_and_master_weights(generator):
    x = torch.full((200000,), 1.0 + 2.0**-10)  # a quarter of a bf16 ulp above 1
    r = stochastic_round(x, torch.bfloat16, seed=123, salt=7).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    # Unbiased: the mean is x within 5 standard deviations of a Bernoulli(1/8) mean.
    sigma = 2.0**-7 * (0.125 * 0.875 / x.numel()) ** 0.5
    assert abs(r.mean().item() - x[0].item()) < 5 * sigma
    fp32 = _mlp(generator, torch.bfloat16).float()  # bf16-representable start for both runs
    master = copy.deepcopy(fp32).to(torch.bfloat16)
    opt32 = AdamW(fp32.parameters(), lr=1e-2, moments="fp32")
    optm = AdamW(master.parameters(), lr=1e-2, moments="fp32", master_weights=True)
    for _ in range(5):  # identical fp32 gradients: the master copy follows the fp32 run
        x = torch.randn(8, 24, generator=generator).to(torch.bfloat16)
        for model, opt in ((fp32, opt32), (master, optm)):
            opt.zero_grad()
            model(x.to(next(model.parameters()).dtype)).float().pow(2).mean().backward()
        for p, q in zip(fp32.parameters(), master.parameters()):
            q.grad = p.grad.to(torch.bfloat16)
            p.grad = q.grad.float()
        opt32.step()
        optm.step()
    for p, q in zip(fp32.parameters(), master.parameters()):
        assert torch.equal(optm.state[q]["master_param"].view(p.shape), p.detach())
        assert torch.equal(q.detach(), p.detach().to(torch.bfloat16))
    sd = optm.state_dict()
    assert sd["state"][0]["master_param"].dtype == torch.float32
    reloaded = AdamW(master.parameters(), lr=1e-2, moments="fp32", master_weights=True)
    reloaded.load_state_dict(sd)
    first = next(master.parameters())
    assert torch.equal(reloaded.state[first]["master_param"], optm.state[first]["master_param"])


def test_bad_arguments_raise_clearly():
    p = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match="moments"):
        AdamW(p, moments="int8")
    with pytest.raises(ValueError, match="block"):
        AdamW(p, block=100)
    with pytest.raises(ValueError, match="nonfinite"):
        AdamW(p, nonfinite="ignore")
    with pytest.raises(ValueError, match="amsgrad"):
        AdamW(p, amsgrad=True)
    with pytest.raises(ValueError, match="betas"):
        AdamW(p, betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="float32"):
        AdamW([torch.nn.Parameter(torch.randn(4, dtype=torch.float64))])


# ------------------------------------------------------------------------------ loading state

@pytest.mark.parametrize("dtype,moments,master", [(torch.float16, "fp8", False), (torch.float16, "fp32", True),
                                                  (torch.bfloat16, "fp32", False), (torch.bfloat16, "fp8", True)])
def test_state_dict_round_trip_keeps_fp32_moments_of_low_precision_params(generator, dtype, moments, master):
    """torch's load casts state to the parameter dtype; the moments and master copies must not
    go through that cast (fp16 would flush second moments of ~1e-10 to zero, bf16 round them)."""
    model = _mlp(generator, dtype)
    opt = AdamW(model.parameters(), lr=1e-3, moments=moments, master_weights=master)
    for _ in range(3):
        opt.zero_grad()
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=generator) * 1e-5).to(dtype)  # v ~ 1e-10 < fp16's 6e-8
        opt.step()
    saved = opt.state_dict()
    reloaded = AdamW(model.parameters(), lr=1e-3, moments=moments, master_weights=master)
    reloaded.load_state_dict(copy.deepcopy(saved))
    again = reloaded.state_dict()
    for i in saved["state"]:
        assert bool((saved["state"][i]["exp_avg_sq"] > 0).all())
        for key in saved["state"][i]:
            assert torch.equal(again["state"][i][key], saved["state"][i][key]), key


def test_checkpoint_of_master_weights_optimizer_resumes(generator, tmp_path):
    from lpdist import checkpoint

    model = _mlp(generator, torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-3, moments="fp8", master_weights=True)
    _train(model, opt, generator, 2)
    checkpoint.save(tmp_path, 2, model, opt)
    twin = copy.deepcopy(model)
    twin_opt = AdamW(twin.parameters(), lr=1e-3, moments="fp8", master_weights=True)
    checkpoint.load(tmp_path, twin, twin_opt)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    _train(model, opt, torch.Generator().manual_seed(seed), 2)
    _train(twin, twin_opt, torch.Generator().manual_seed(seed), 2)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_master_copy_that_no_longer_matches_its_parameter_is_replaced(generator):
    """A master copy carried through another optimizer's training is stale: it is re-seeded from
    the parameter (with a warning) instead of undoing that training."""
    model = _mlp(generator, torch.bfloat16)
    opt = AdamW(model.parameters(), lr=1e-3, moments="fp32", master_weights=True)
    _train(model, opt, generator, 1)
    other = torch.optim.AdamW(model.parameters(), lr=1e-2)
    other.load_state_dict(opt.state_dict())
    _train(model, other, generator, 3)
    back = AdamW(model.parameters(), lr=1e-3, moments="fp32", master_weights=True)
    with pytest.warns(UserWarning, match="master copy"):
        back.load_state_dict(other.state_dict())
    for p in model.parameters():
        assert torch.equal(back.state[p]["master_param"].view(p.shape), p.detach().float())


def _refused_loads(sd: dict) -> list[dict]:
    """State dicts that must be refused: wrong-size moments or master copy, a NaN lr, amsgrad."""
    loads = []
    for key in ("exp_avg", "exp_avg_sq", "master_param"):
        bad = copy.deepcopy(sd)
        bad["state"][1][key] = torch.zeros(3)
        bad["param_groups"][0]["lr"] = 123.0  # must not be taken either
        loads.append(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][1]["lr"] = float("nan")
    loads.append(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["amsgrad"] = True
    loads.append(bad)
    return loads


def test_a_refused_load_changes_nothing(generator):
    model = _mlp(generator, torch.bfloat16)
    opt = AdamW(_groups(model, 1e-3), lr=1e-3, moments="fp8", master_weights=True)
    _train(model, opt, generator, 2)
    before = _snapshot(model, opt)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    for bad in _refused_loads(opt.state_dict()):
        with pytest.raises(ValueError):
            opt.load_state_dict(bad)
        _assert_same(before, _snapshot(model, opt))
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before


@pytest.mark.parametrize("options, error", [({"grads_finite": "yes"}, TypeError),
                                             ({"grad_scale": float("nan")}, ValueError),
                                             ({"grad_scale": torch.ones(2)}, TypeError)])
def test_bad_step_options_create_no_state(generator, options, error):
    model = _mlp(generator)
    opt = AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 24, generator=generator)).sum().backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match=next(iter(options))):
        opt.step(**options)
    assert len(opt.state) == 0 and all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_a_step_that_raises_creates_no_state(generator):
    model = _mlp(generator)
    cases = []
    opt = AdamW(_groups(model, 1e-3), lr=1e-3)
    opt.param_groups[1]["lr"] = float("nan")  # the second group is refused after the first is seen
    cases.append((opt, ValueError))
    opt = AdamW(model.parameters(), lr=1e-3)
    cases.append((opt, TypeError))
    for opt, error in cases:
        opt.zero_grad()
        model(torch.randn(4, 24, generator=generator)).sum().backward()
        if error is TypeError:
            model[2].bias.grad = model[2].bias.grad.to_sparse()  # the last parameter's gradient is refused
        with pytest.raises(error):
            opt.step()
        assert len(opt.state) == 0 and opt.state_dict()["state"] == {}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3])
def test_tensor_lr_is_checked_like_a_float(generator, value):
    p = torch.nn.Parameter(torch.randn(8, generator=generator))
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=torch.tensor(value))
    lr = torch.tensor(1e-3)
    opt = AdamW([p], lr=lr)
    lr.fill_(value)  # a scheduler writing a bad value in place
    p.grad = torch.randn(8, generator=generator)
    before = p.detach().clone()
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert torch.equal(p.detach(), before) and len(opt.state) == 0
    for bad in (torch.tensor(True), torch.tensor(1), torch.tensor([1e-3, 1e-3])):
        with pytest.raises(ValueError, match="lr"):
            AdamW([p], lr=bad)


def test_stochastic_rounding_does_not_depend_on_the_rng_state(generator):
    """Data-parallel replicas seeded differently (e.g. ``manual_seed(seed + rank)``) must round
    their bf16 parameters identically, or they drift apart."""
    start = _mlp(generator, torch.bfloat16)
    grads = [[torch.randn(p.shape, generator=generator).to(torch.bfloat16) for p in start.parameters()]
             for _ in range(3)]
    results = []
    for rank_seed in (1, 2):
        torch.manual_seed(rank_seed)
        model = copy.deepcopy(start)
        opt = AdamW(model.parameters(), lr=1e-2, moments="fp8")
        for step_grads in grads:
            for p, g in zip(model.parameters(), step_grads):
                p.grad = g.clone()
            opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b.detach()) for a, b in zip(results[0], start.parameters()))
