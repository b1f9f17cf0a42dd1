"""Cross-rank agreement before a quantized collective sends anything.

A collective whose ranks disagree (another tensor size, dtype, wire format or block; a rank
whose arguments were refused) would exchange misaligned bytes: gloo delivers them without
complaint (silently wrong numbers), NCCL may hang until the timeout. ``agree`` runs one small
MAX all-reduce of an int64 vector holding, per rank,

    [local error flag, non-finite flag, fingerprint..., -fingerprint...]

so every rank learns at once whether any rank failed its own checks, whether any input holds
NaN/inf, and whether all fingerprints are equal (max == -min element-wise). Then every rank
raises the same kind of error, or none does:

* a rank whose own arguments were invalid re-raises its ``ValueError``/``TypeError``; the
  others raise ``ValueError`` saying another rank refused its arguments;
* different fingerprints: ``ValueError`` naming the differing fields;
* a non-finite input anywhere (``check_finite=True``): ``FloatingPointError``.

Cost: one tiny all-reduce and one host read of its result. Collectives run it always on
non-NCCL groups (gloo on CPU, where it is cheap next to the exchange) and on NCCL groups
when ``check_finite=True``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

__all__ = ["agree", "needs_agreement", "fingerprint_code", "FIELDS"]

#: Fingerprint fields, the same for every collective so the agreement vector has one length.
FIELDS = ("collective", "input.numel()", "output.numel()", "dtype", "fmt", "block", "transport")


def needs_agreement(group: dist.ProcessGroup | None, check_finite: bool) -> bool:
    """Whether a collective on ``group`` runs ``agree`` (see the module docstring)."""
    return bool(check_finite) or dist.get_backend(group) != "nccl"


def fingerprint_code(value: object, choices: tuple) -> int:
    """Index of ``value`` in ``choices`` (-1 when absent), an integer a fingerprint can hold."""
    return choices.index(value) if value in choices else -1


def _flag_device(group) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(group: dist.ProcessGroup | None, what: str, validate: Callable[[], None],
          fingerprint: Callable[[], dict[str, int]],
          finite_inputs: Callable[[], list[torch.Tensor]] | None) -> None:
    """Validate locally, then agree across ``group`` (one all-reduce) before ``what`` runs.

    ``validate`` raises ``ValueError``/``TypeError`` for this rank's bad arguments;
    ``fingerprint`` (called only when they are valid) gives ``FIELDS``, which must be equal on
    every rank; ``finite_inputs`` (None: no check) the tensors that must hold no NaN/inf.
    """
    error: Exception | None = None
    try:
        validate()
        fields = fingerprint()
    except (ValueError, TypeError) as exc:
        error, fields = exc, {}
    names = FIELDS
    device = _flag_device(group)
    values = torch.tensor([fields.get(name, 0) for name in names], dtype=torch.int64)
    flags = torch.zeros(2 + 2 * len(names), dtype=torch.int64, device=device)
    flags[0] = error is not None
    if finite_inputs is not None and error is None:
        for t in finite_inputs():
            if t.numel():
                flags[1] = torch.maximum(flags[1], (~torch.isfinite(t)).any().to(device, torch.int64))
    if error is None:
        flags[2:] = torch.cat([values, -values]).to(device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    result = flags.tolist()
    if error is not None:
        raise error
    if result[0]:
        raise ValueError(f"{what}: another rank refused its arguments (see its error); "
                         "nothing was sent")
    highest, lowest = result[2:2 + len(names)], [-v for v in result[2 + len(names):]]
    differing = [f"{name} (this rank {fields[name]}, range {lo}..{hi})"
                 for name, hi, lo in zip(names, highest, lowest) if hi != lo]
    if differing:
        raise ValueError(f"{what}: ranks disagree on {', '.join(differing)}; every rank must pass "
                         "the same sizes, dtype and options; nothing was sent")
    if result[1]:
        raise FloatingPointError(f"{what}: an input holds NaN or inf on at least one rank "
                                 "(check_finite=True); nothing was sent")
