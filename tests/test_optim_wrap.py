"""lpdist.optim.wrap: Adam(W) becomes lpdist AdamW, other optimizers keep their rule with
quantized state; schedulers, GradScaler and torch-format state dicts keep working."""

from __future__ import annotations

import copy

import pytest
import torch

from lpdist.optim import AdamW, QuantizedState, wrap


def _mlp(generator: torch.Generator) -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Linear(12, 48), torch.nn.Tanh(), torch.nn.Linear(48, 4))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.4)
    return model


def _train(model, opt, seed, steps, scaler=None, poison_step=None):
    gen = torch.Generator().manual_seed(seed)
    target = torch.nn.Linear(12, 4)
    with torch.no_grad():
        target.weight.copy_(torch.randn(4, 12, generator=gen))
        target.bias.zero_()
    for step in range(steps):
        x = torch.randn(32, 12, generator=gen)
        opt.zero_grad()
        loss = (model(x) - torch.sin(target(x))).pow(2).mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if step == poison_step:
                next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()


def _groups(model):
    return [{"params": model[0].parameters()},
            {"params": model[2].parameters(), "lr": 2e-3, "weight_decay": 0.0, "betas": (0.8, 0.99)}]


def test_wrapping_torch_adamw_reproduces_lpdist_adamw(generator):
    model = _mlp(generator)
    twin = copy.deepcopy(model)
    wrapped = wrap(torch.optim.AdamW(_groups(model), lr=5e-3, weight_decay=0.05), moments="fp8")
    direct = AdamW(_groups(twin), lr=5e-3, weight_decay=0.05, moments="fp8")
    assert isinstance(wrapped, AdamW)
    assert [g["lr"] for g in wrapped.param_groups] == [5e-3, 2e-3]
    assert wrapped.param_groups[1]["betas"] == (0.8, 0.99)
    _train(model, wrapped, 3, 50)
    _train(twin, direct, 3, 50)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_wrapping_carries_existing_adam_state(generator):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)  # no weight decay: Adam == AdamW
    ref_opt = torch.optim.Adam(ref.parameters(), lr=5e-3)
    _train(model, opt, 1, 5)
    _train(ref, ref_opt, 1, 5)
    wrapped = wrap(opt, moments="fp32")
    assert float(wrapped.state[next(model.parameters())]["step"]) == 5
    _train(model, wrapped, 2, 10)
    _train(ref, ref_opt, 2, 10)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_l2_adam_and_unknown_options_raise(generator):
    model = _mlp(generator)
    with pytest.raises(ValueError, match="L2"):
        wrap(torch.optim.Adam(model.parameters(), weight_decay=0.1))
    with pytest.raises(ValueError, match="amsgrad"):
        wrap(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="shard"):
        wrap(torch.optim.SGD(model.parameters(), lr=0.1), shard="fsdp")
    with pytest.raises(TypeError, match="optimizer"):
        wrap(model)
    decoupled = wrap(torch.optim.Adam(model.parameters(), weight_decay=0.1, decoupled_weight_decay=True))
    assert isinstance(decoupled, AdamW) and decoupled.param_groups[0]["weight_decay"] == 0.1


@pytest.mark.parametrize("moments,unit_roundoff", [("fp8", 2.0**-3), ("fp16", 2.0**-11)])
@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5),
], ids=["sgd-momentum", "adagrad", "rmsprop"])
def test_other_optimizers_track_within_the_format_error(generator, make, moments, unit_roundoff):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    start = [p.detach().clone() for p in model.parameters()]
    wrapped = wrap(make(model.parameters()), moments=moments)
    plain = make(ref.parameters())
    assert isinstance(wrapped, QuantizedState)
    _train(model, wrapped, 5, 200)
    _train(ref, plain, 5, 200)
    # Every step perturbs the state by one rounding of relative size <= u (u = 2^-3 for the
    # E5M2 sqrt of non-negative state in "fp8", 2^-11 for fp16); the 200-step parameter
    # displacement then differs from the unwrapped run's by about u in relative terms (and by
    # the same factor 2^8 between the two formats): bound 2u. A wrong rule or lost state is O(1).
    for p, q, p0 in zip(model.parameters(), ref.parameters(), start):
        assert ((p - q).norm() / (q - p0).norm()).item() < 2 * unit_roundoff
    elements = sum(v.numel() for st in plain.state.values() for v in st.values()
                   if isinstance(v, torch.Tensor) and v.numel() > 1)
    element_bytes = 1 if moments == "fp8" else 2
    assert wrapped.memory_bytes() / elements <= element_bytes + 0.1  # + a 4-byte scale per 128


def test_scheduler_drives_the_wrapped_optimizer(generator):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    wrapped = wrap(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), moments="fp32")
    plain = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (wrapped, plain)]
    for i in range(6):
        _train(model, wrapped, i, 1)
        _train(ref, plain, i, 1)
        for s in scheds:
            s.step()
    assert wrapped.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)
    assert wrapped.inner.param_groups[0]["lr"] == wrapped.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), ref.parameters()):  # fp32 storage: exactly the same run
        assert torch.equal(p, q)


def test_grad_scaler_skips_and_steps_like_unwrapped(generator):
    model = _mlp(generator)
    ref = copy.deepcopy(model)
    wrapped = wrap(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), moments="fp32")
    plain = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    # An inf gradient at step 3: that step is skipped and the scale backs off, exactly as for
    # the unwrapped optimizer.
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(2)]
    _train(model, wrapped, 4, 8, scalers[0], poison_step=3)
    _train(ref, plain, 4, 8, scalers[1], poison_step=3)
    assert scalers[0].get_scale() == scalers[1].get_scale() == 2.0**9
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    lambda ps: torch.optim.Adagrad(ps, lr=0.05),
], ids=["sgd-momentum", "adagrad"])
def test_state_dict_round_trip_through_the_unwrapped_optimizer(generator, make):
    model = _mlp(generator)
    wrapped = wrap(make(model.parameters()), moments="fp8")
    _train(model, wrapped, 6, 4)
    sd = wrapped.state_dict()
    plain = make(model.parameters())
    plain.load_state_dict(sd)  # the wrapped optimizer's ordinary format
    back = wrap(make(model.parameters()), moments="fp8")
    back.load_state_dict(plain.state_dict())
    sd2 = back.state_dict()
    for i, st in sd["state"].items():
        for key, value in st.items():
            # Requantizing dequantized values: same block max, same scale, same codes.
            torch.testing.assert_close(sd2["state"][i][key], value, rtol=1e-6, atol=0)
    twin = copy.deepcopy(model)
    twin_opt = wrap(make(twin.parameters()), moments="fp8")
    twin_opt.load_state_dict(sd)
    _train(model, back, 7, 3)
    _train(twin, twin_opt, 7, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("block", [0, -128, 100, 4096, 128.0, True])
def test_bad_block_is_refused_before_anything_runs(block):
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match="block"):
        wrap(torch.optim.SGD([p], lr=0.1, momentum=0.9), block=block)
    with pytest.raises(ValueError, match="block"):
        QuantizedState(torch.optim.SGD([p], lr=0.1, momentum=0.9), block=block)


def test_load_state_dict_keeps_groups_shared_with_the_inner_optimizer(generator):
    """torch's load replaces the inner optimizer's group list: the wrapper must share the new one,
    or an LR scheduler on the wrapper stops reaching the steps."""
    p = torch.nn.Parameter(torch.randn(256, generator=generator))
    opt = wrap(torch.optim.SGD([p], lr=1.0, momentum=0.9))
    p.grad = torch.randn(256, generator=generator)
    opt.step()
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 0.0)  # lr 0 from now on
    before = p.detach().clone()
    p.grad = torch.randn(256, generator=generator)
    opt.step()
    assert torch.equal(p.detach(), before)


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, nesterov=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.05, betas=(0.8, 0.9), weight_decay=0.3),
])
def test_groups_added_after_wrapping_get_the_original_settings(generator, make):
    first = torch.nn.Parameter(torch.randn(8, generator=generator))
    original = make([first])
    opt = wrap(original)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(8, generator=generator))]})
    added = opt.param_groups[-1]
    for key in ("lr", "momentum", "nesterov", "betas", "weight_decay"):
        if key in original.defaults:
            assert added[key] == original.defaults[key], key


def test_momentum_keeps_the_signed_format_while_it_happens_to_be_positive(generator):
    """A momentum buffer is signed even when all its values are positive for a while: it stays in
    the first format (e4m3: relative error <= 2^-4 for values within a binade of the block max),
    not the second (sqrt in e5m2)."""
    p = torch.nn.Parameter(torch.zeros(256))
    opt = wrap(torch.optim.SGD([p], lr=0.1, momentum=0.9), moments="fp8")
    p.grad = 1.0 + torch.rand(256, generator=generator)  # all positive, within [1, 2)
    opt.step()  # the first step's buffer is the gradient itself
    packed = opt.packed[p]["momentum_buffer"]
    assert packed.store.fmt.name == "e4m3" and not packed.root
    error = (packed.unpack() - p.grad).abs() / p.grad
    assert float(error.max()) <= 2.0 ** -4


@pytest.mark.parametrize("make,key", [(lambda p: torch.optim.SGD([p], lr=0.1, momentum=0.9), "momentum_buffer"),
                                      (lambda p: torch.optim.Adagrad([p], lr=0.1), "sum")])
def test_non_finite_state_stays_non_finite_and_spares_its_block(generator, make, key):
    """An inf in block 0 and a NaN in block 1 of a state tensor stay non-finite when packed, and the
    other elements of those blocks keep the format's accuracy (scales from the finite values
    only): e4m3 relative error <= 2^-4 for the momentum buffer, the sum of squares stored as sqrt
    in e5m2 (relative error <= 2^-3 on sqrt, so <= 2^-3 * (2 + 2^-3) on the sum). Before, the inf
    made its whole block NaN and the NaN left its block unscaled (values above 448 saturated)."""
    p = torch.nn.Parameter(torch.zeros(256))
    opt = wrap(make(p), moments="fp8")
    grad = 1000.0 * (1.0 + torch.rand(256, generator=generator))
    grad[5], grad[130] = float("inf"), float("nan")
    p.grad = grad
    opt.step()
    want = grad if key == "momentum_buffer" else grad * grad
    got = opt.packed[p][key].unpack()
    poisoned = torch.zeros(256, dtype=torch.bool)
    poisoned[[5, 130]] = True
    assert not bool(torch.isfinite(got[poisoned]).any())
    bound = 2.0 ** -4 if key == "momentum_buffer" else 2.0 ** -3 * (2 + 2.0 ** -3)
    error = (got[~poisoned] - want[~poisoned]).abs() / want[~poisoned]
    assert float(error.max()) <= bound
