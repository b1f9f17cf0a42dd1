"""Quantized collectives: ``reduce_scatter``, ``all_gather`` and ``all_reduce`` in FP8.

``reduce_scatter(output, input)`` follows ``torch.distributed.reduce_scatter_tensor``: ``input``
holds W equal chunks (chunk ``r`` ends up reduced on rank ``r``), ``output`` one chunk, same
dtype (float32, bfloat16 or float16). Chunks need not be multiples of ``block`` (the last block
of each chunk is partial). Transports: ``"all_to_all"`` (module ``all_to_all``; default, fp32
sum of W dequantized copies), ``"p2p"`` (module ``p2p``; the same bytes, exchanged by the
quantize kernel's stores into the other GPUs' memory: one machine, CUDA, peer access) and
``"nccl"`` (module ``shared_scale``; NCCL's fp8 sum).

Error feedback (``residual=``, a tensor shaped like the input, float32 or the input's dtype,
zero at the start): the call sends ``Q(x + r)`` and stores ``r <- x + r - Q(x + r)``, so what
one step loses the next one sends (EF-SGD; Karimireddy et al. 2019, "Error Feedback Fixes
SignSGD", arXiv 1901.09847); the sum of the outputs over steps tracks the sum of
the inputs up to one step's error instead of drifting.

``all_gather`` quantizes each rank's input once with block scales, gathers scales + codes, and
decodes on every rank: all ranks see identical, lossy values. ``all_reduce`` is the quantized
reduce-scatter followed by the quantized all-gather; with ``residual=`` both roundings are fed
back (the all-gather error of chunk ``r`` is added to rank ``r``'s residual, divided by the op
factor), so repeated calls stay unbiased as well.

Error per call: see ``rms_error_bound``.

Non-finite values and disagreeing ranks (module ``agree``): a block holding NaN or inf always
arrives as NaN, never as a finite number (its scale is NaN). With ``check_finite=True`` the
ranks first agree, by one small all-reduce, that every input is finite and raise
``FloatingPointError`` on all ranks otherwise, before anything is sent. The same all-reduce
compares sizes, dtype, format, block and transport across ranks (``ValueError`` on all ranks
when they differ, or when one rank's arguments were refused); it always runs on non-NCCL
groups and, on NCCL groups, only with ``check_finite=True``.

Subgroups: ``group`` may hold a subset of the ranks. As with torch's own collectives, a rank
outside ``group`` (``dist.new_group`` gave it ``GroupMember.NON_GROUP_MEMBER``) does nothing:
the call warns and returns ``None``, also with ``async_op=True``, without checking its
arguments or touching its tensors.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist

from . import stats
from .agree import agree, fingerprint_code, needs_agreement
from .all_to_all import reduce_scatter_all_to_all
from .codec import FP8_DTYPES, MAX_BLOCK, dequant_into, quantize_into
from .compat import all_gather_single
from .ops import reduction_factor
from .p2p import reduce_scatter_p2p
from .peer import peer_access_problem
from .pending import PendingCollective, finished
from .shared_scale import reduce_scatter_shared_scale
from .wire import WireLayout
from ..quant import FORMATS

__all__ = ["reduce_scatter", "all_gather", "all_reduce", "rms_error_bound", "fastest_transport", "TRANSPORTS",
           "ROUNDINGS"]

TRANSPORTS = ("all_to_all", "nccl", "p2p")
ROUNDINGS = ("nearest", "stochastic")
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GOLDEN = 0x9E3779B9


def rms_error_bound(fmt: str = "e4m3", rounding: str = "nearest", roundings: int = 1) -> float:
    """Bound on the relative L2 error of a quantized collective on block-scaled data.

    Derivation (ALGORITHMS.md §1.1, §1.5). A normal value ``v`` in binade ``[2^E, 2^(E+1))`` of a
    format with ``m`` mantissa bits lies on a grid of spacing ``u = 2^(E-m)``:

    * RNE: the error is at most ``u/2`` and, over many elements, uniform on ``[-u/2, u/2]``, so
      ``E[e^2] = u^2/12 <= v^2 * 2^(-2m)/12``: relative RMS ``<= 2^-(m+1)/sqrt(3)``
      (3.61% for e4m3, 7.22% for e5m2; Gaussian data measure about 2.5% for e4m3 because most
      mantissas are above 1). Worst case per element: ``2^-(m+1)`` (6.25% for e4m3).
    * stochastic: ``E[e^2] = p(1-p) u^2 <= u^2/4``: relative RMS ``<= 2^-(m+1)``.

    Block scaling maps the block amax to ``fmt_max``, so only elements below ``2^emin`` times
    the scale (about 1e-4 of the block amax for e4m3) fall in the subnormal range; their share
    of the L2 norm is negligible for gradients. For a sum of W ranks with independent errors the
    ratio ``||Σ e_s|| / ||Σ x_s||`` is the same as for one rank when the ranks' gradients have
    equal spread; independent roundings add in quadrature, so ``roundings`` of them (all_reduce
    and the ``nccl`` transport: 2) multiply the bound by ``sqrt(roundings)``.
    """
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    half_ulp = 2.0 ** -(FORMATS[fmt].mbits + 1)
    per_rounding = half_ulp / 3 ** 0.5 if rounding == "nearest" else half_ulp
    return per_rounding * roundings ** 0.5


def fastest_transport(device: torch.device, group: dist.ProcessGroup | None = None) -> str:
    """``"p2p"`` when every rank of ``group`` runs on one machine, on CUDA, with direct access to
    the others' GPUs, else ``"all_to_all"``: the faster of the two fp32-summing transports (same
    results). A collective (every rank gets the same answer); call it once, at set-up."""
    return "p2p" if peer_access_problem(group, device) is None else "all_to_all"


def _not_a_member(group, collective: str) -> bool:
    """Whether this rank is outside ``group``; if so, warn as torch's collectives do."""
    if group != dist.GroupMember.NON_GROUP_MEMBER:
        return False
    warnings.warn(f"Running lpdist.comm.{collective} on global rank {dist.get_rank()} which does "
                  "not belong to the given group; nothing is done", stacklevel=3)
    return True


def _check_options(fmt: str, block: int, rounding: str, transport: str = "all_to_all") -> None:
    if fmt not in FP8_DTYPES:
        raise ValueError(f"fmt must be one of {sorted(FP8_DTYPES)}, got {fmt!r}")
    if isinstance(block, bool) or not isinstance(block, int) or not 1 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be an int in [1, {MAX_BLOCK}], got {block!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_transport_device(transport: str, name: str, t: torch.Tensor) -> None:
    if transport == "p2p" and not t.is_cuda:
        raise ValueError(f"transport='p2p' needs CUDA tensors, got {name} on {t.device}; "
                         "use transport='all_to_all'")


def _check_residual(residual: torch.Tensor | None, like: torch.Tensor) -> None:
    if residual is None:
        return
    if not isinstance(residual, torch.Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != like.shape or residual.device != like.device or not residual.is_contiguous():
        raise ValueError(f"residual must be a contiguous tensor shaped {tuple(like.shape)} on "
                         f"{like.device}, got {tuple(residual.shape)} on {residual.device}")
    if residual.dtype not in (torch.float32, like.dtype):
        raise TypeError(f"residual must be float32 or {like.dtype}, got {residual.dtype}")


def _check_reduce_scatter(output, input, group, fmt, block, rounding, transport, residual, pieces) -> None:
    _check_options(fmt, block, rounding, transport)
    _check_tensor("input", input)
    _check_tensor("output", output)
    if output.dtype != input.dtype or output.device != input.device:
        raise ValueError(f"output must match input's dtype and device ({input.dtype}, {input.device}), "
                         f"got ({output.dtype}, {output.device})")
    world = dist.get_world_size(group)
    if input.numel() != world * output.numel():
        raise ValueError(f"input must hold world_size * output.numel() = {world * output.numel()} "
                         f"elements, got {input.numel()}")
    _check_transport_device(transport, "input", input)
    if pieces is not None and (isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1):
        raise ValueError(f"pieces must be None or a positive int, got {pieces!r}")
    _check_residual(residual, input)


def _agree(group, collective: str, validate, *, input: torch.Tensor, output: torch.Tensor, fmt: str,
           block: int, transport: str, check_finite: bool, residual: torch.Tensor | None = None) -> None:
    """Run ``validate`` and, where ``needs_agreement``, agree across ranks (module ``agree``)."""
    if not needs_agreement(group, check_finite):
        validate()
        return

    def fingerprint() -> dict[str, int]:
        return {"collective": fingerprint_code(collective, ("reduce_scatter", "all_gather", "all_reduce")),
                "input.numel()": input.numel(), "output.numel()": output.numel(),
                "dtype": fingerprint_code(input.dtype, _FLOAT_DTYPES),
                "fmt": fingerprint_code(fmt, tuple(FP8_DTYPES)), "block": block,
                "transport": fingerprint_code(transport, TRANSPORTS)}

    agree(group, f"lpdist.comm.{collective}", validate, fingerprint,
          (lambda: [t for t in (input, residual) if t is not None]) if check_finite else None)


def _seed(rounding: str, generator: torch.Generator | None, group) -> int:
    """Per-call, per-rank seed of the stochastic-rounding hash (drawn on the CPU: no device sync)."""
    if rounding != "stochastic":
        return 0
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    return (base ^ (dist.get_rank(group) * _GOLDEN)) & 0xFFFFFFFF


def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None, *,
                   op: str | dist.ReduceOp = "sum",
                   fmt: str = "e4m3", block: int = 256, transport: str = "all_to_all",
                   rounding: str = "nearest", residual: torch.Tensor | None = None,
                   async_op: bool = False, generator: torch.Generator | None = None,
                   pieces: int | None = None, check_finite: bool = False) -> PendingCollective | None:
    """FP8 reduce-scatter of ``input`` (W chunks) into ``output`` (this rank's chunk).

    Args:
        op: ``"sum"``, ``"avg"`` or a torch ``ReduceOp`` (SUM, AVG, PREMUL_SUM(f)).
        fmt: ``"e4m3"`` or ``"e5m2"`` on the wire; ``block``: elements per fp32 scale (1..1024).
        transport: ``"all_to_all"``, ``"p2p"`` (CUDA, every rank on one machine with peer
            access; identical results, no NCCL call) or ``"nccl"`` (NCCL process group on sm90+,
            NCCL >= 2.24).
        rounding: ``"nearest"`` (RNE) or ``"stochastic"`` (unbiased; seeded from ``generator``).
        residual: error-feedback state shaped like ``input``, updated in place.
        async_op: return a handle whose ``wait()`` completes the call.
        pieces: pipeline depth of the all_to_all transport (default: by size; the other
            transports do not cut the call into pieces).
        check_finite: raise ``FloatingPointError`` on every rank, before sending, when any
            rank's input (plus residual) holds NaN/inf (one small all-reduce and a host sync).
    Returns:
        ``None``, or a handle with ``wait()`` when ``async_op``; ``None`` (and a warning) on a
        rank outside ``group``, which does nothing.
    """
    if _not_a_member(group, "reduce_scatter"):
        return None
    world = dist.get_world_size(group)

    def validate() -> None:
        _check_reduce_scatter(output, input, group, fmt, block, rounding, transport, residual, pieces)
        reduction_factor(op, world)

    _agree(group, "reduce_scatter", validate, input=input, output=output, fmt=fmt, block=block,
           transport=transport, check_finite=check_finite, residual=residual)
    return _reduce_scatter(output, input, group, op=op, fmt=fmt, block=block, transport=transport,
                           rounding=rounding, residual=residual, async_op=async_op,
                           generator=generator, pieces=pieces)


def _reduce_scatter(output, input, group, *, op, fmt, block, transport, rounding, residual, async_op,
                    generator, pieces) -> PendingCollective | None:
    """``reduce_scatter`` after its arguments were checked."""
    world = dist.get_world_size(group)
    factor = reduction_factor(op, world)
    seed = _seed(rounding, generator, group)
    common = dict(factor=factor, fmt=fmt, block=block, rounding=rounding, residual=residual,
                  seed=seed, async_op=async_op)
    if transport == "nccl":
        return reduce_scatter_shared_scale(output, input, group, **common)
    if transport == "p2p":
        return reduce_scatter_p2p(output, input, group, **common)
    return reduce_scatter_all_to_all(output, input, group, num_pieces=pieces, **common)


def _gather(output: torch.Tensor, input: torch.Tensor, group, *, fmt: str, block: int,
            rounding: str, seed: int, error: torch.Tensor | None,
            async_op: bool) -> PendingCollective | None:
    """Quantize ``input`` once, all-gather scales + codes, decode every row into ``output``.

    ``error`` (fp32, shaped like ``input``, zeroed) receives ``input - decode(Q(input))``.
    """
    world = dist.get_world_size(group)
    n = input.numel()
    layout = WireLayout(n, block)
    stats.record("all_gather", elements=n, bytes_sent=(world - 1) * layout.row_bytes)
    if n == 0:  # nothing to exchange (every rank agrees: sizes are checked or required equal)
        return finished(async_op)
    send = layout.empty(1, input.device)
    quantize_into(input.view(1, n), None if error is None else error.view(1, n), col0=0, cols=n,
                  block=block, fmt=fmt, payload=layout.payload(send), scales=layout.scales(send),
                  rounding=rounding, seed=seed)
    recv = layout.empty(world, input.device)
    work = all_gather_single(recv, send, group=group, async_op=True)

    def decode() -> None:
        dequant_into(layout.payload(recv), layout.scales(recv), sum_rows=1, block=block, fmt=fmt,
                     factor=1.0, out=output.view(world, n))

    handle = PendingCollective(decode, work=work)
    if async_op:
        return handle
    handle.wait()
    return None


def all_gather(output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None = None, *, fmt: str = "e4m3",
               block: int = 256, rounding: str = "nearest", async_op: bool = False,
               generator: torch.Generator | None = None,
               check_finite: bool = False) -> PendingCollective | None:
    """FP8 all-gather (like ``all_gather_into_tensor``): ``output`` = W decoded inputs, in rank order.

    Lossy: every rank (the sender included) receives ``decode(Q(input))``, identical everywhere.
    ``check_finite`` and a rank outside ``group`` (``None`` and a warning): as in ``reduce_scatter``.
    """
    if _not_a_member(group, "all_gather"):
        return None
    world = dist.get_world_size(group)

    def validate() -> None:
        _check_options(fmt, block, rounding)
        _check_tensor("input", input)
        _check_tensor("output", output)
        if output.dtype != input.dtype or output.device != input.device or output.numel() != world * input.numel():
            raise ValueError(f"output must be {input.dtype} on {input.device} with world_size * input.numel() = "
                             f"{world * input.numel()} elements, got {output.dtype} on {output.device} x "
                             f"{output.numel()}")

    _agree(group, "all_gather", validate, input=input, output=output, fmt=fmt, block=block,
           transport="all_to_all", check_finite=check_finite)
    return _gather(output, input, group, fmt=fmt, block=block, rounding=rounding,
                   seed=_seed(rounding, generator, group), error=None, async_op=async_op)


def all_reduce(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, *, op: str | dist.ReduceOp = "sum",
               fmt: str = "e4m3", block: int = 256,
               transport: str = "all_to_all", rounding: str = "nearest",
               residual: torch.Tensor | None = None, async_op: bool = False,
               generator: torch.Generator | None = None,
               check_finite: bool = False) -> PendingCollective | None:
    """FP8 all-reduce in place: quantized reduce-scatter, then quantized all-gather.

    Any numel works (the tensor is zero-padded to W equal chunks internally). With ``residual``
    both quantizations are error-fed-back (see the module docstring). ``check_finite`` and a
    rank outside ``group`` (``None`` and a warning): as in ``reduce_scatter``. With
    ``async_op=True`` only the all-gather half is left in flight: the reduce-scatter half
    completes within the call, since the all-gather quantizes its reduced shard.
    """
    if _not_a_member(group, "all_reduce"):
        return None

    def validate() -> None:
        _check_options(fmt, block, rounding, transport)
        _check_tensor("tensor", tensor)
        _check_transport_device(transport, "tensor", tensor)
        _check_residual(residual, tensor)
        reduction_factor(op, dist.get_world_size(group))

    _agree(group, "all_reduce", validate, input=tensor, output=tensor, fmt=fmt, block=block,
           transport=transport, check_finite=check_finite, residual=residual)
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    n = tensor.numel()
    chunk = -(-n // world)
    padded_n = chunk * world
    flat = tensor.view(-1)
    if padded_n != n:
        flat = torch.nn.functional.pad(flat, (0, padded_n - n))
    res = None if residual is None else residual.view(-1)
    if res is not None and padded_n != n:
        res = torch.nn.functional.pad(res, (0, padded_n - n))
    shard = torch.empty(chunk, dtype=tensor.dtype, device=tensor.device)
    _reduce_scatter(shard, flat, group, op=op, fmt=fmt, block=block, transport=transport,
                    rounding=rounding, residual=res, async_op=False, generator=generator, pieces=None)
    error = None if res is None else torch.zeros(chunk, dtype=torch.float32, device=tensor.device)
    factor = reduction_factor(op, world)

    def finish() -> None:
        if padded_n != n:
            tensor.view(-1).copy_(flat[:n])
        if res is not None and factor != 0:
            own = res[rank * chunk:(rank + 1) * chunk]
            own.copy_((own.float() + error / factor).to(own.dtype))
            if res.data_ptr() != residual.data_ptr():
                residual.view(-1).copy_(res[:n])

    handle = _gather(flat, shard, group, fmt=fmt, block=block, rounding=rounding,
                     seed=_seed(rounding, generator, group), error=error, async_op=True)
    if async_op:
        return PendingCollective(finish, work=handle)
    handle.wait()
    finish()
    return None
