"""``LowPrecisionLinear``: what ``Float8Linear`` and ``FP4Linear`` share with ``nn.Linear``.

Same parameters and ``state_dict`` keys as ``nn.Linear``, ``from_linear`` (shares the given
layer's parameters), telemetry (:class:`~lpdist.nn.telemetry.StatsMixin`), and a forward that
flattens the batch dims, picks the output dtype (the autocast dtype when autocast is on, else the
input's) and adds the bias in that dtype after the subclass's ``_matmul(x2d, out_dtype)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .telemetry import StatsMixin

if TYPE_CHECKING:
    from typing_extensions import Self  # typing.Self from Python 3.11

__all__ = ["LowPrecisionLinear", "check_features", "output_dtype", "INPUT_DTYPES"]

#: Input dtypes of the low-precision linears (the dtypes ``nn.Linear`` trains in, and fp64 for
#: references). FP8 tensors are refused: they are already quantized, without their scales.
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The layer output dtype: the autocast dtype when autocast is on, else ``x``'s dtype."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def check_features(in_features: int, out_features: int) -> None:
    """Refuse layer sizes that are not positive ints (ValueError naming the argument). Subclasses
    call it before their own checks that compute with the sizes (divisibility by a block)."""
    for name, value in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class LowPrecisionLinear(StatsMixin, nn.Linear):
    """Base of the low-precision linears; subclasses implement ``_matmul(x2d, out_dtype)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool, *, track_stats: bool,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        check_features(in_features, out_features)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_stats(track_stats, self.weight.device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> Self:
        """A layer of this class that shares ``linear``'s weight and bias parameters (no copy) and
        its train/eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        new.weight = linear.weight
        new.bias = linear.bias
        device = linear.weight.device
        for name, buffer in new.named_buffers(recurse=False):  # made on the meta device above
            setattr(new, name, torch.zeros_like(buffer, device=device))
        new._lp_stats.fill_(float("nan"))
        return new.train(linear.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim must be in_features={self.in_features}, got {x.shape[-1]}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"input must be a float32/bfloat16/float16/float64 tensor, got {x.dtype}")
        out_dtype = output_dtype(x)
        if x.numel() == 0:  # no rows to scale: nn.Linear's (empty) result and gradients
            return nn.functional.linear(x.to(out_dtype), self.weight.to(out_dtype),
                                        None if self.bias is None else self.bias.to(out_dtype))
        y = self._matmul(x.reshape(-1, self.in_features), out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        # 2-D inputs return the autograd output itself (not a view), as FSDP2 prefers.
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
