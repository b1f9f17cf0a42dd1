"""Per-layer quantization telemetry kept on the device, read only when asked.

A low-precision layer owns a small fp32 buffer of ``STATS_LEN`` slots. Its forward and backward
write into it in place (``copy_``, traceable by ``torch.compile``, no host sync): the amax of
the input, weight and output gradient, and for the forward and the backward casts the number
of values clipped at the format maximum, the number of non-zero values flushed to zero, and
how many values were cast. :meth:`StatsMixin.last_stats` converts them into a dict of floats;
that is the only host synchronization. ``track_stats=False`` skips all of it.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..quant.formats import Format

__all__ = ["STAT_KEYS", "STATS_LEN", "StatsMixin", "record_forward", "record_backward",
           "clip_threshold"]

STAT_KEYS = ("input_amax", "weight_amax", "grad_amax", "saturated_frac", "underflow_frac")
_IN_AMAX, _W_AMAX, _G_AMAX, _FWD, _BWD = 0, 1, 2, 3, 6  # _FWD/_BWD: (saturated, underflow, count)
STATS_LEN = 9


def clip_threshold(fmt: Format) -> float:
    """Scaled magnitude above which a value counts as saturated: the format maximum plus half
    its top grid step (beyond it, rounding alone could not have produced ``±max``)."""
    return fmt.max + 2.0 ** (fmt.emax - fmt.mbits - 1)


def record_forward(stats: torch.Tensor, input_amax: torch.Tensor, weight_amax: torch.Tensor,
                   saturated: torch.Tensor, underflow: torch.Tensor, count: int) -> None:
    """Write the forward statistics of one step into ``stats`` (in place, on its device)."""
    with torch.no_grad():
        stats[_IN_AMAX:_G_AMAX].copy_(torch.stack((input_amax.float(), weight_amax.float())))
        stats[_G_AMAX].fill_(float("nan"))  # no backward seen for this forward yet
        values = torch.stack((saturated.float(), underflow.float(),
                              torch.full((), float(count), device=stats.device)))
        stats[_FWD:_BWD].copy_(values)
        stats[_BWD:].zero_()


def record_backward(stats: torch.Tensor, grad_amax: torch.Tensor, saturated: torch.Tensor,
                    underflow: torch.Tensor, count: int) -> None:
    """Write the backward statistics of one step into ``stats`` (in place, on its device)."""
    with torch.no_grad():
        stats[_G_AMAX].copy_(grad_amax.float())
        values = torch.stack((saturated.float(), underflow.float(),
                              torch.full((), float(count), device=stats.device)))
        stats[_BWD:].copy_(values)


class StatsMixin:
    """Adds the ``_lp_stats`` buffer and :meth:`last_stats` to a low-precision ``nn.Module``.

    The buffer is non-persistent (``state_dict`` keys stay those of ``nn.Linear``) and always
    fp32: its element counts must stay exact integers (fp16 overflows at 65504, bf16 rounds
    above 256), so module dtype casts (``.half()``, ``.to(torch.bfloat16)``) move it to the new
    device but leave its dtype and values alone.
    """

    track_stats: bool
    #: Buffers kept in fp32 whatever the module's dtype (subclasses add theirs).
    _fp32_buffers: tuple[str, ...] = ("_lp_stats",)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        before = {name: getattr(self, name) for name in self._fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = getattr(self, name)
            if old is not None and new.dtype != old.dtype:
                setattr(self, name, old.to(new.device))
        return self

    def _init_stats(self, track_stats: bool, device: torch.device | str | None) -> None:
        if not isinstance(track_stats, bool):
            raise TypeError(f"track_stats must be a bool, got {type(track_stats).__name__}")
        self.track_stats = track_stats
        self.register_buffer("_lp_stats", torch.full((STATS_LEN,), float("nan"), device=device),
                             persistent=False)

    def last_stats(self) -> dict[str, float]:
        """Statistics of the last step: amax of input, weight and output gradient (NaN until
        seen), and the fraction of cast values clipped at the format maximum
        (``saturated_frac``) or flushed to zero (``underflow_frac``) over forward and backward.
        Empty when ``track_stats`` is False."""
        if not self.track_stats:
            return {}
        s = self._lp_stats.detach().double().cpu().tolist()
        count = s[_FWD + 2] + s[_BWD + 2]
        frac = (lambda i: (s[_FWD + i] + s[_BWD + i]) / count) if count > 0 else (lambda i: float("nan"))
        return dict(zip(STAT_KEYS, (s[_IN_AMAX], s[_W_AMAX], s[_G_AMAX], frac(0), frac(1)), strict=True))


def set_tracking(model: torch.nn.Module, enabled: bool) -> int:
    """Switch :meth:`StatsMixin.last_stats` telemetry on or off in every low-precision layer of
    ``model``; returns how many layers were switched. Tracking costs extra passes over each
    layer's operands, so trainers keep it off except on the steps they sample."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    layers = [m for m in model.modules() if isinstance(m, StatsMixin)]
    for layer in layers:
        layer.track_stats = enabled
    return len(layers)
