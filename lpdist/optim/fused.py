"""The fused AdamW step: torch reference (the oracle) and the multi-tensor CUDA launch.

Per element, in fp32, in this order (ALGORITHMS.md §9.1 step 5 with decoupled weight decay,
Loshchilov & Hutter, arXiv 1711.05101; moments stored as in ``lpdist.optim.moments``)::

    g      = -grad if maximize else grad
    m_old  = decode(m);  v_old = decode(v) if v is fp32 else decode(sqrt_v) ** 2
    m      = beta1 * m_old + (1 - beta1) * g
    v      = beta2 * v_old + (1 - beta2) * (g * g)
    denom  = sqrt(v) * (1 / sqrt(1 - beta2^t)) + eps
    p      = p * (1 - lr * wd) - (lr / (1 - beta1^t)) * (m / denom)

then ``p`` is written (fp32; bf16/fp16 with stochastic rounding; or an fp32 master copy plus
its round-to-nearest bf16/fp16 image) and ``m``, ``sqrt(v)`` are requantized with fresh block
scales (``RNE(x * (1 / scale))``, one division per block). ``1 / sqrt(1 - beta2^t)`` is computed
once per step on the host and rounded to fp32, so the only per-element divisions are ``m / denom``
and none by a per-step or per-block constant. Every line is separate correctly rounded fp32
operations; ``csrc/adam.cu`` is compiled
with ``--fmad=false`` so it performs the same operations without fused multiply-adds, which makes
the kernel bit-identical to :func:`reference_step` (stochastic rounding included: its uniforms
come from the counter-based hash ``hashed_uniform`` shared with the other kernels, with counter
``tensor_index * 2^40 + element_index``), except on fp32 subnormals (below 2^-126), which the
kernel flushes to zero and the reference does not (``lpdist.kernels``).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from ..quant.noise import hashed_uniform
from .moments import MomentFormat, MomentStore, decode, encode, sqrt_rn

__all__ = ["Slot", "Hyper", "reference_step", "nonfinite_flag", "FusedLauncher",
           "stochastic_round", "PARAM_FORMAT_CODES"]

KERNEL_MODULE = "adam"
THREADS = 256
WARPS_PER_CTA = THREADS // 32
TABLE_COLS = 9
PARAM_FORMAT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MASK32 = 0xFFFFFFFF
_WEYL = 0x9E3779B9  # golden-ratio increment: a distinct seed for every step
_COUNTER_SHIFT = 40  # the tensor index occupies the counter bits above the element index
# (param fmt, m fmt, v fmt, fp32 master copies) with a compile-time specialised kernel (block 128,
# csrc/adam.cu adamw_hot): fp32, bf16 or bf16-with-master parameters, and the "fp8", "bf16" or
# "fp16" moments. These are persistent: a half-warp per quantization block, each warp
# walks the block pairs with a grid stride, so the grid is the resident CTA count
# (PERSISTENT_CTAS_PER_SM, passed to the compiler with -D and used by __launch_bounds__).
_PARAM_KINDS = {(0, False): "f32", (1, False): "bf16", (1, True): "bf16_master"}
_MOMENT_KINDS = {(3, 4): "e4m3_e5m2", (1, 1): "bf16", (2, 2): "fp16"}
_SPECIALISED = {(pf, mf, vf, master): f"adamw_c1_{param}_{moments}"
                for (pf, master), param in _PARAM_KINDS.items()
                for (mf, vf), moments in _MOMENT_KINDS.items()}
PERSISTENT_CTAS_PER_SM = 3
_BLOCKS_PER_WARP = 2  # quantization blocks a warp of a specialised kernel covers per iteration
_SPECIALISED_MAX_BLOCKS = 2**30  # block indices of the specialised kernels are 32-bit
SCAN_BLOCKS_PER_WARP = 4  # quantization blocks a warp of the gradient scan loads per iteration


def nvrtc_options() -> tuple[str, ...]:
    """Compiler options of csrc/adam.cu: no fused multiply-adds (bit-identical to the reference),
    the resident CTAs per SM of the specialised kernels and the blocks per warp of the scan."""
    return ("--fmad=false", f"-DPERSISTENT_CTAS_PER_SM={PERSISTENT_CTAS_PER_SM}",
            f"-DSCAN_BLOCKS_PER_WARP={SCAN_BLOCKS_PER_WARP}")


_F32 = struct.Struct("f")


def f32(x: float) -> float:
    """``x`` rounded to the nearest fp32 (the value a kernel receives as a float argument)."""
    return _F32.unpack(_F32.pack(x))[0]


@dataclass
class Slot:
    """One parameter's share of a step: local tensors (DTensor shards already unwrapped)."""

    param: torch.Tensor
    grad: torch.Tensor
    master: torch.Tensor | None
    m: MomentStore
    v: MomentStore
    salt: int


@dataclass(frozen=True)
class Hyper:
    """fp32-exact scalars of one step (identical for the kernel and the reference)."""

    lr: float | torch.Tensor
    beta1: float
    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    weight_decay: float
    bias_correction1: float
    inv_bias_correction2_sqrt: float  # 1 / sqrt(1 - beta2^step): a product per element, not a division
    maximize: bool
    seed: int
    grad_scale: torch.Tensor | None = None  # fp32 0-dim: every gradient element is multiplied by it first

    @classmethod
    def for_step(cls, lr: float | torch.Tensor, betas: tuple[float, float], eps: float,
                 weight_decay: float, step: int, maximize: bool, seed: int,
                 grad_scale: torch.Tensor | None = None) -> "Hyper":
        beta1, beta2 = float(betas[0]), float(betas[1])
        on_device = isinstance(lr, torch.Tensor) and lr.device.type != "cpu"
        return cls(
            lr=lr.detach().reshape(()) if on_device else f32(float(lr)),
            beta1=f32(beta1), one_minus_beta1=f32(1.0 - beta1),
            beta2=f32(beta2), one_minus_beta2=f32(1.0 - beta2),
            eps=f32(eps), weight_decay=f32(weight_decay),
            bias_correction1=f32(1.0 - beta1**step),
            inv_bias_correction2_sqrt=f32((1.0 - beta2**step) ** -0.5),
            maximize=bool(maximize), seed=(seed + step * _WEYL) & _MASK32, grad_scale=grad_scale)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, seed: int, salt: int) -> torch.Tensor:
    """Unbiased stochastic rounding of flat fp32 ``x`` to bf16/fp16 (ALGORITHMS.md §1.5).

    ``lo`` is ``x`` rounded toward zero, ``hi`` the next value away from zero; ``hi`` is chosen
    when ``u < (|x| - |lo|) / (|hi| - |lo|)``, ``u = hashed_uniform(salt * 2^40 + index, seed)``.
    """
    index = torch.arange(x.numel(), dtype=torch.int64, device=x.device) + (salt << _COUNTER_SHIFT)
    u = hashed_uniform(index, seed)
    nearest = x.to(dtype)
    overshoot = nearest.float().abs() > x.abs()
    bits = nearest.view(torch.int16)
    lo = torch.where(overshoot, bits - 1, bits).view(dtype)
    hi = (lo.view(torch.int16) + 1).view(dtype)
    lo_f, hi_f = lo.float(), hi.float()
    p_up = (x.abs() - lo_f.abs()) / (hi_f.abs() - lo_f.abs())
    return torch.where(lo_f == x, lo, torch.where(u < p_up, hi, lo))


def _scalar(x: float, device: torch.device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32, device=device)


def reference_step(slot: Slot, h: Hyper) -> None:
    """One AdamW step of one parameter with torch ops (the oracle of ``csrc/adam.cu``)."""
    dev = slot.param.device
    s = lambda x: _scalar(x, dev)  # noqa: E731  (fp32 0-dim operands keep every op in fp32)
    p = (slot.master if slot.master is not None else slot.param).reshape(-1).float()
    g = slot.grad.reshape(-1).float()
    if h.grad_scale is not None:
        g = g * h.grad_scale.to(dev)
    if h.maximize:
        g = -g
    lr = h.lr.to(device=dev, dtype=torch.float32) if isinstance(h.lr, torch.Tensor) else s(h.lr)
    decay = s(1.0) - lr * s(h.weight_decay)
    step_size = lr / s(h.bias_correction1)
    m_old = decode(slot.m.codes, slot.m.scales, slot.m.fmt, slot.m.block)
    v_dec = decode(slot.v.codes, slot.v.scales, slot.v.fmt, slot.v.block)
    v_is_root = slot.v.fmt.name != "fp32"
    v_old = v_dec * v_dec if v_is_root else v_dec
    m = s(h.beta1) * m_old + s(h.one_minus_beta1) * g
    v = s(h.beta2) * v_old + s(h.one_minus_beta2) * (g * g)
    root = sqrt_rn(v)
    denom = root * s(h.inv_bias_correction2_sqrt) + s(h.eps)
    p = p * decay - step_size * (m / denom)

    if slot.master is not None:
        slot.master.copy_(p.view(slot.master.shape))
        slot.param.copy_(p.view(slot.param.shape))
    elif slot.param.dtype != torch.float32:
        slot.param.copy_(stochastic_round(p, slot.param.dtype, h.seed, slot.salt).view(slot.param.shape))
    else:
        slot.param.copy_(p.view(slot.param.shape))
    for store, value, floor in ((slot.m, m, False), (slot.v, root if v_is_root else v, v_is_root)):
        codes, scales = encode(value, store.fmt, store.block, positive_floor=floor)
        store.codes.copy_(codes)
        store.scales.copy_(scales)


def nonfinite_flag(grads: list[torch.Tensor]) -> torch.Tensor:
    """int32 0-dim tensor on the gradients' device: 1 if any element is NaN or ±inf."""
    bad = torch.stack([~torch.isfinite(g).all() for g in grads]).any()
    return bad.to(torch.int32)


def _kernel_block(block: int, m_fmt: MomentFormat, v_fmt: MomentFormat) -> int:
    """Elements per warp: the quantization block for scaled formats, else 128."""
    return block if (m_fmt.scaled or v_fmt.scaled) else 128


def _kernel_name(elems: int, total_blocks: int, param_fmt: int, m_fmt: MomentFormat,
                 v_fmt: MomentFormat, master: bool) -> str:
    """The specialised kernel for the combination when there is one, else the general one."""
    general = f"adamw_c{elems // 128}"
    if elems != 128 or total_blocks >= _SPECIALISED_MAX_BLOCKS:
        return general
    return _SPECIALISED.get((param_fmt, m_fmt.code, v_fmt.code, master), general)


def _step_grid(name: str, total_blocks: int, device: torch.device) -> int:
    """CTAs of a step launch: one warp per block, or the resident CTAs for persistent kernels."""
    if name in _SPECIALISED.values():
        return kernels.capped_grid(total_blocks, WARPS_PER_CTA * _BLOCKS_PER_WARP, PERSISTENT_CTAS_PER_SM, device)
    return -(-total_blocks // WARPS_PER_CTA)


def _pinned_to(device: torch.device, values: list) -> torch.Tensor:
    """int64 host list -> device tensor through pinned memory (an asynchronous copy)."""
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


class FusedLauncher:
    """Multi-tensor launches of ``csrc/adam.cu`` with device tables cached per bucket.

    A bucket is a list of slots sharing param dtype, moment formats, block and step. Its table
    (pointers, sizes, first block of every tensor) is copied to the device only when a pointer
    changes; gradient pointers are a second small array, re-sent only when gradients move.
    """

    def __init__(self) -> None:
        self._tables: dict[object, tuple[tuple, torch.Tensor, int]] = {}
        self._grads: dict[object, tuple[tuple, torch.Tensor]] = {}

    def _table(self, key: object, slots: list[Slot], elems: int) -> tuple[torch.Tensor, int]:
        rows, start = [], 0
        for sl in slots:
            lowp = sl.param.data_ptr() if sl.master is not None else 0
            read = sl.master if sl.master is not None else sl.param
            n = sl.param.numel()
            rows.append((read.data_ptr(), sl.m.codes.data_ptr(), sl.m.scales.data_ptr(),
                         sl.v.codes.data_ptr(), sl.v.scales.data_ptr(), lowp, n, start, sl.salt))
            start += -(-n // elems)
        signature = tuple(rows)
        cached = self._tables.get(key)
        if cached is None or cached[0] != signature:
            flat = [x for row in rows for x in row]
            cached = (signature, _pinned_to(slots[0].param.device, flat), start)
            self._tables[key] = cached
        return cached[1], cached[2]

    def _grad_ptrs(self, key: object, slots: list[Slot]) -> torch.Tensor:
        ptrs = tuple(sl.grad.data_ptr() for sl in slots)
        cached = self._grads.get(key)
        if cached is None or cached[0] != ptrs:
            cached = (ptrs, _pinned_to(slots[0].param.device, list(ptrs)))
            self._grads[key] = cached
        return cached[1]

    def check(self, key: object, slots: list[Slot], block: int, flag: torch.Tensor) -> None:
        """Set ``flag`` (int32 on the device) to 1 if any gradient of the bucket is non-finite."""
        elems = _kernel_block(block, slots[0].m.fmt, slots[0].v.fmt)
        table, total = self._table(key, slots, elems)
        if total == 0:
            return
        grads = self._grad_ptrs(key, slots)
        device = slots[0].param.device
        grid = kernels.capped_grid(total, WARPS_PER_CTA * SCAN_BLOCKS_PER_WARP, device=device)
        kernels.launch(KERNEL_MODULE, "grads_nonfinite", grid, THREADS,
                       (table, np.int32(len(slots)), grads, np.int64(total), np.int32(elems),
                        np.int32(PARAM_FORMAT_CODES[slots[0].param.dtype]), flag),
                       device=device, options=nvrtc_options())

    def step(self, key: object, slots: list[Slot], block: int, h: Hyper, skip_flag: torch.Tensor) -> None:
        """One fused launch for the bucket; does nothing on the device if ``skip_flag`` is set."""
        m_fmt, v_fmt = slots[0].m.fmt, slots[0].v.fmt
        elems = _kernel_block(block, m_fmt, v_fmt)
        table, total = self._table(key, slots, elems)
        if total == 0:
            return
        grads = self._grad_ptrs(key, slots)
        param_fmt = PARAM_FORMAT_CODES[slots[0].param.dtype]
        name = _kernel_name(elems, total, param_fmt, m_fmt, v_fmt, slots[0].master is not None)
        if isinstance(h.lr, torch.Tensor):
            lr_value, lr_ptr = 0.0, h.lr.to(dtype=torch.float32).contiguous()
        else:
            lr_value, lr_ptr = h.lr, np.uint64(0)
        grad_mul = np.uint64(0) if h.grad_scale is None else h.grad_scale.to(slots[0].param.device)
        args = (table, np.int32(len(slots)), grads, np.int64(total), np.int32(param_fmt),
                np.int32(m_fmt.code), np.int32(v_fmt.code), np.float32(lr_value), lr_ptr, grad_mul,
                np.float32(h.beta1), np.float32(h.one_minus_beta1), np.float32(h.beta2),
                np.float32(h.one_minus_beta2), np.float32(h.eps), np.float32(h.weight_decay),
                np.float32(h.bias_correction1), np.float32(h.inv_bias_correction2_sqrt),
                np.int32(h.maximize), np.uint32(h.seed), skip_flag)
        device = slots[0].param.device
        kernels.launch(KERNEL_MODULE, name, _step_grid(name, total, device), THREADS, args,
                       device=device, options=nvrtc_options())
