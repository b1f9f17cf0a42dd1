"""csrc/adam.cu against its torch reference: bit-identical parameters, codes and scales."""

from __future__ import annotations

import pytest
import torch

from lpdist import kernels
from lpdist.optim import AdamW

pytestmark = pytest.mark.gpu

# Odd sizes (tails shorter than 4 elements and partial quantization blocks), a vector-friendly
# size, and many small tensors so that one launch covers tensors of every kind.
SHAPES = [(1,), (3,), (130,), (37, 29), (64, 128), (1000,)] + [(5, 7)] * 40
# 16K quantization blocks of 128: more than the persistent kernels' warps, so every warp walks
# several blocks and crosses a tensor boundary (grid-stride loop, pipelined loads).
SHAPES += [(4096, 512)]


def _params(dtype, generator, misaligned=False):
    params = [torch.randn(s, generator=generator).to(dtype) for s in SHAPES]
    if misaligned:  # a view one element into its storage: the kernel must take the scalar path
        params.append(torch.randn(1001, generator=generator).to(dtype)[1:])
    return params


def _run(params, grads, device, seed, grad_scales=None, **kw):
    """``AdamW(**kw)`` stepped once per entry of ``grads`` on ``device``; ``grad_scales``: the
    step's ``grad_scale`` for each step (moved to ``device``)."""
    ps = [torch.nn.Parameter(p.clone().to(device)) if p._base is None
          else torch.nn.Parameter(p._base.clone().to(device)[1:]) for p in params]
    opt = AdamW(ps, **kw)
    opt._seed = seed
    for index, step_grads in enumerate(grads):
        for p, g in zip(ps, step_grads):
            p.grad = g.to(device)
        opt.step(**({"grad_scale": grad_scales[index].to(device)} if grad_scales is not None else {}))
    return ps, opt


def _bits(t):
    """fp8 tensors compared through their bytes (torch.equal has no fp8 kernels everywhere)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _mismatch(what: str, index: int, ref: torch.Tensor, out: torch.Tensor) -> str | None:
    """None if bit-identical, else where they differ: count, first element, max ulp distance."""
    ref, out = ref.detach().reshape(-1).cpu(), out.detach().reshape(-1).cpu()
    bad = (_bits(ref) != _bits(out)).nonzero().flatten()
    if bad.numel() == 0:
        return None
    i = int(bad[0])
    int_dtype = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[ref.element_size()]
    ulps = (ref.view(int_dtype).long() - out.view(int_dtype).long()).abs().max().item()
    return (f"tensor {index} (numel {ref.numel()}) {what}: {bad.numel()} elements differ, first at "
            f"{i} (reference {ref[i].float().item()!r}, kernel {out[i].float().item()!r}), "
            f"max {ulps} ulp")


def _assert_bit_identical(cpu, gpu):
    """Every parameter, moment code/scale and master copy equal bit for bit; on failure the
    message lists every differing tensor, so one GPU run shows where the two paths part."""
    (ps_c, opt_c), (ps_g, opt_g) = cpu, gpu
    report = []
    for index, (a, b) in enumerate(zip(ps_c, ps_g)):
        report.append(_mismatch("parameter", index, a, b))
        sa, sb = opt_c.state[a], opt_g.state[b]
        for key in ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales", "master_param"):
            if key in sa:
                report.append(_mismatch(key, index, sa[key], sb[key]))
    report = [r for r in report if r is not None]
    assert not report, "kernel != reference:\n" + "\n".join(report)


CASES = [
    dict(dtype=torch.float32, moments="fp8", block=128),
    dict(dtype=torch.float32, moments="fp8", block=256, maximize=True),
    dict(dtype=torch.float32, moments="fp32", block=128),
    dict(dtype=torch.float32, moments="fp16", block=384),
    dict(dtype=torch.float32, moments=("bf16", "e4m3"), block=128),
    dict(dtype=torch.bfloat16, moments="fp8", block=128),  # stochastic rounding of the params
    dict(dtype=torch.float16, moments="fp8", block=128, master_weights=True),
    dict(dtype=torch.bfloat16, moments="fp8", block=128, master_weights=True),  # its own hot kernel
    dict(dtype=torch.bfloat16, moments=("e5m2", "fp32"), block=1024, master_weights=True),
    # the hot kernels of the 16-bit moments: unscaled bf16, block-scaled fp16
    dict(dtype=torch.float32, moments="bf16", block=128),
    dict(dtype=torch.float32, moments="fp16", block=128),
    dict(dtype=torch.bfloat16, moments="bf16", block=128),
    dict(dtype=torch.bfloat16, moments="fp16", block=128, master_weights=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kernel_matches_reference_bit_for_bit(generator, case):
    assert kernels.backend() == "cupy", "CuPy is needed for the fused kernel"
    case = dict(case)
    dtype = case.pop("dtype")
    params = _params(dtype, generator, misaligned=True)
    # Gradients over 8 decades so that the block scales and the sqrt(v) floor are exercised.
    grads = [[(torch.randn(p.shape, generator=generator) * 10.0 ** torch.randint(-8, 1, p.shape, generator=generator)
               ).to(dtype) for p in params] for _ in range(3)]
    kw = dict(lr=3e-3, weight_decay=0.05, **case)
    _assert_bit_identical(_run(params, grads, "cpu", 1234, **kw), _run(params, grads, "cuda", 1234, **kw))


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[2], CASES[7], CASES[9]],
                         ids=lambda c: "-".join(str(v) for v in c.values()))
def test_kernel_applies_grad_scale_like_the_reference(generator, case):
    """``step(grad_scale=...)`` (a device tensor, as from ``clip_coefficient``): the general and the
    hot kernels multiply every gradient by it exactly as the reference does."""
    case = dict(case)
    dtype = case.pop("dtype")
    params = _params(dtype, generator, misaligned=True)
    grads = [[torch.randn(p.shape, generator=generator).to(dtype) for p in params] for _ in range(3)]
    scales = [torch.tensor(value) for value in (0.37, 1.0, 2.5e-3)]
    kw = dict(lr=3e-3, weight_decay=0.05, **case)
    cpu = _run(params, grads, "cpu", 99, grad_scales=scales, **kw)
    _assert_bit_identical(cpu, _run(params, grads, "cuda", 99, grad_scales=scales, **kw))
    # The scale must have changed the step: the moments scale with it (the parameters much less,
    # Adam's update being nearly invariant to a constant gradient factor).
    (ps, opt), (ps_unscaled, opt_unscaled) = cpu, _run(params, grads, "cpu", 99, **kw)
    assert any(not torch.equal(_bits(value), _bits(opt_unscaled.state[q][key]))
               for p, q in zip(ps, ps_unscaled) for key, value in opt.state[p].items()
               if isinstance(value, torch.Tensor) and key != "step")


def test_kernel_reads_a_device_lr(generator):
    params = _params(torch.float32, generator)
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(2)]
    cpu = _run(params, grads, "cpu", 7, lr=torch.tensor(2e-3), moments="fp8")
    gpu = _run(params, grads, "cuda", 7, lr=torch.tensor(2e-3, device="cuda"), moments="fp8")
    _assert_bit_identical(cpu, gpu)


def _snapshot(ps, opt):
    """Copies of the parameters and of one parameter's optimizer state tensors."""
    return ([p.detach().clone() for p in ps],
            {k: v.clone() for k, v in opt.state[ps[4]].items() if isinstance(v, torch.Tensor)})


def _assert_unchanged(before, ps, opt):
    params, state = before
    for a, b in zip(params, ps):
        assert torch.equal(a, b.detach())
    for k, v in state.items():
        assert torch.equal(_bits(v), _bits(opt.state[ps[4]][k]))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1e-3])
@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_bad_device_lr_is_refused_on_the_device(generator, value, policy):
    """A GPU tensor lr is checked by the step on the device (no host read of its own): a NaN,
    inf or negative value raises whatever the nonfinite policy, and nothing is written."""
    params = _params(torch.float32, generator)
    grads = [[torch.randn(p.shape, generator=generator) for p in params]]
    lr = torch.tensor(2e-3, device="cuda")
    ps, opt = _run(params, grads, "cuda", 1, lr=lr, moments="fp8", nonfinite=policy)
    before = _snapshot(ps, opt)
    lr.fill_(value)
    for p in ps:
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match="lr"):
        opt.step()
    assert opt.skipped_steps == 0
    _assert_unchanged(before, ps, opt)


def _fp8_optimizer_after_one_step(generator, seed, policy):
    params = _params(torch.float32, generator)
    grads = [[torch.randn(p.shape, generator=generator) for p in params]]
    return _run(params, grads, "cuda", seed, moments="fp8", nonfinite=policy)


def _refused_step(opt, policy, **step_options):
    """A step that must not happen: FloatingPointError under ``raise``, a skip under ``skip``."""
    if policy == "raise":
        with pytest.raises(FloatingPointError):
            opt.step(**step_options)
    else:
        opt.step(**step_options)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_grad_scale_on_gpu_changes_nothing(generator, policy):
    ps, opt = _fp8_optimizer_after_one_step(generator, 5, policy)
    before = _snapshot(ps, opt)
    for value in (float("nan"), float("inf")):
        _refused_step(opt, policy, grad_scale=torch.tensor(value, device="cuda"))
        _assert_unchanged(before, ps, opt)
    assert opt.skipped_steps == (2 if policy == "skip" else 0)


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_nonfinite_gradient_on_gpu_changes_nothing(generator, policy):
    ps, opt = _fp8_optimizer_after_one_step(generator, 1, policy)
    before = _snapshot(ps, opt)
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[-1].grad[0, 0] = float("inf")
    _refused_step(opt, policy)
    if policy == "skip":
        assert opt.skipped_steps == 1
    _assert_unchanged(before, ps, opt)


@pytest.mark.parametrize("block, dtype", [(128, torch.float32), (128, torch.bfloat16), (512, torch.float32)])
def test_gradient_scan_finds_every_nonfinite_position(generator, block, dtype):
    """The scan kernel (several blocks per warp with a grid stride, across tensor boundaries and
    partial blocks) flags a single NaN or inf wherever it is, and nothing when all are finite."""
    shapes = [(3,), (130,), (37, 29), (1000,), (4096, 65)]
    ps = [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype).cuda()) for s in shapes]
    opt = AdamW(ps, lr=1e-3, moments="fp8", block=block, nonfinite="skip")
    expected_skips = 0
    for index, p in enumerate(ps):
        n = p.numel()
        for position, bad in [(0, float("nan")), (n - 1, float("inf")), (n // 2, float("-inf")),
                              (min(n - 1, 9 * 128 + 5), float("nan"))]:
            for q in ps:
                q.grad = torch.randn(q.shape, generator=generator).to(dtype).cuda()
            p.grad.view(-1)[position] = bad
            opt.step()
            expected_skips += 1
            assert opt.skipped_steps == expected_skips, (index, position, bad)
    for q in ps:
        q.grad = torch.randn(q.shape, generator=generator).to(dtype).cuda()
    opt.step()
    assert opt.skipped_steps == expected_skips


def test_grads_finite_flag_on_gpu(generator):
    """With the caller's device flag the step skips the gradient scan: True gives the same bits
    as the scanned step, False (here with a NaN gradient) changes nothing."""
    params = _params(torch.float32, generator, misaligned=True)
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(2)]
    ps_a, opt_a = _run(params, grads, "cuda", 3, moments="fp8", nonfinite="skip")
    ps_b, opt_b = _run(params, grads[:1], "cuda", 3, moments="fp8", nonfinite="skip")
    for p, g in zip(ps_b, grads[1]):
        p.grad = g.cuda()
    norm = torch.nn.utils.clip_grad_norm_(ps_b, float("inf"))
    opt_b.step(grads_finite=torch.isfinite(norm))
    _assert_bit_identical((ps_a, opt_a), (ps_b, opt_b))
    before = [p.detach().clone() for p in ps_b]
    ps_b[3].grad[0, 0] = float("nan")
    opt_b.step(grads_finite=torch.isfinite(torch.nn.utils.clip_grad_norm_(ps_b, float("inf"))))
    assert opt_b.skipped_steps == 1
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, ps_b))
