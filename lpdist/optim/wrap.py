"""``wrap(optimizer)``: low-precision optimizer state for an existing torch optimizer.

* Adam / AdamW (torch's or lpdist's) become :class:`lpdist.optim.AdamW` with the same parameter
  groups and hyper-parameters, existing state requantized.
* Any other optimizer keeps its update rule: :class:`QuantizedState` stores its floating-point
  state tensors block-scaled between steps (``lpdist.optim.moments``: signed tensors such as
  momentum buffers in the first format, non-negative ones such as Adagrad's sum of squares as
  ``sqrt`` in the second, never flushed to zero) and unpacks them to fp32 just for ``step()``.
* ``shard="zero"`` builds either inside ``torch.distributed.optim.ZeroRedundancyOptimizer``, so
  every data-parallel rank keeps the state of its share of the parameters only (ZeRO-1).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from .adamw import AdamW, _check_block
from .moments import MomentFormat, MomentStore, decode, encode, parse_moments, sqrt_rn

__all__ = ["wrap", "QuantizedState"]

_ADAMW_GROUP_KEYS = ("lr", "betas", "eps", "weight_decay", "maximize", "amsgrad", "master_weights")
SHARD_MODES = (None, "zero")
#: State tensors of torch.optim's optimizers by sign: never negative (stored as sqrt in the second
#: format) or signed (first format), whatever their values at one step (a momentum buffer may be
#: all positive for a while). Keys of other optimizers are classified by their values.
_NON_NEGATIVE_STATE = frozenset({"sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "acc_delta",
                                 "step_size"})
_SIGNED_STATE = frozenset({"momentum_buffer", "exp_avg", "grad_avg", "prev", "ax"})


class _Packed:
    """One state tensor stored block-scaled; ``root``: the stored values are ``sqrt(x)``."""

    def __init__(self, x: torch.Tensor, fmts: tuple[MomentFormat, MomentFormat], block: int, root: bool) -> None:
        flat = x.detach().reshape(-1).float()
        self.root = root
        fmt = fmts[1] if self.root else fmts[0]
        codes, scales = encode(sqrt_rn(flat) if self.root else flat, fmt, block, positive_floor=self.root,
                               keep_nonfinite=True)
        self.store = MomentStore(fmt, block, codes.clone(), scales)
        self.shape, self.dtype = x.shape, x.dtype

    def unpack(self) -> torch.Tensor:
        s = self.store
        x = decode(s.codes, s.scales, s.fmt, s.block)
        return (x * x if self.root else x).view(self.shape).to(self.dtype)


class QuantizedState(torch.optim.Optimizer):
    """Runs ``inner.step()`` unchanged, keeping ``inner``'s floating state quantized in between.

    Shares ``param_groups`` (so LR schedulers and GradScaler act on the inner optimizer) and
    ``state`` with ``inner``; packed tensors are held in ``packed`` and put back into
    ``inner.state`` for the duration of ``step()``, ``state_dict()`` and ``load_state_dict()``.
    """

    def __init__(self, inner: torch.optim.Optimizer, *, moments: str | tuple[str, str] = "fp8",
                 block: int = 128) -> None:
        self.formats = parse_moments(moments)
        _check_block(block)
        self.inner = inner
        self.block = block
        self.packed: dict[torch.Tensor, dict[str, _Packed]] = {}
        super().__init__([p for g in inner.param_groups for p in g["params"]], inner.defaults)
        self.param_groups = inner.param_groups
        self.state = inner.state
        self._pack()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "inner") and self.param_groups is self.inner.param_groups:
            self.inner.add_param_group(param_group)
        else:  # during Optimizer.__init__, before the groups are shared
            super().add_param_group(param_group)

    def _pack(self) -> None:
        entries = [(p, key, value) for p, st in self.inner.state.items() for key, value in st.items()
                   if isinstance(value, torch.Tensor) and value.is_floating_point() and value.numel() > 1]
        for (p, key, value), root in zip(entries, self._stored_as_root(entries)):
            self.packed.setdefault(p, {})[key] = _Packed(value, self.formats, self.block, root)
            del self.inner.state[p][key]

    def _stored_as_root(self, entries: list[tuple[torch.Tensor, str, torch.Tensor]]) -> list[bool]:
        """Whether each state tensor is kept as ``sqrt`` in the second format: by its key for
        torch.optim's optimizers, else when every value is non-negative (the tensors classified
        by value are all read in one host transfer per call, not one each)."""
        named = _NON_NEGATIVE_STATE | _SIGNED_STATE if type(self.inner).__module__.startswith("torch.optim") else ()
        known = [(key in _NON_NEGATIVE_STATE) if key in named else None for _, key, _ in entries]
        unknown = [value for (_, _, value), root in zip(entries, known) if root is None]
        if unknown:
            signs = iter(torch.stack([(v >= 0).all().to(unknown[0].device) for v in unknown]).tolist())
            known = [next(signs) if root is None else root for root in known]
        return known

    def _unpack(self) -> None:
        """Put the packed tensors back into ``inner.state``, except where a full tensor is there
        already: state loaded straight into ``inner.state`` since the packing (as
        ZeroRedundancyOptimizer's ``load_state_dict`` does) wins over the older packed copy."""
        for p, entries in self.packed.items():
            live = self.inner.state[p]
            live.update({k: v.unpack() for k, v in entries.items() if k not in live})
        self.packed = {}

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._unpack()
        try:
            return self.inner.step(closure)
        finally:
            self._pack()

    def state_dict(self) -> dict[str, Any]:
        """``inner``'s ordinary state dict, with dequantized state tensors."""
        self._unpack()
        try:
            state_dict = self.inner.state_dict()
            # torch's state dict shares the per-parameter dicts that packing empties again
            state_dict["state"] = {i: dict(st) for i, st in state_dict["state"].items()}
            return state_dict
        finally:
            self._pack()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._unpack()
        try:
            self.inner.load_state_dict(state_dict)
        finally:
            # torch's load replaces inner's group list and state dict: share the new ones
            self.param_groups = self.inner.param_groups
            self.state = self.inner.state
            self._pack()

    def memory_bytes(self) -> int:
        """Bytes of the packed state tensors (codes and block scales)."""
        return sum(pk.store.nbytes for entries in self.packed.values() for pk in entries.values())


def _adamw_groups(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    groups = []
    for group in optimizer.param_groups:
        l2 = isinstance(optimizer, torch.optim.Adam) and not group.get("decoupled_weight_decay", False)
        if l2 and group["weight_decay"] != 0:
            raise ValueError("torch.optim.Adam with weight_decay != 0 adds the decay to the gradient "
                             "(L2), which lpdist's AdamW does not do; use torch.optim.AdamW, "
                             "Adam(decoupled_weight_decay=True) or weight_decay=0")
        groups.append({"params": list(group["params"]), **{k: group[k] for k in _ADAMW_GROUP_KEYS if k in group}})
    return groups


def _constructor_defaults(optimizer: torch.optim.Optimizer, cls: type, keys: tuple[str, ...] | None = None
                          ) -> dict[str, Any]:
    """``optimizer.defaults`` that ``cls`` takes as keyword arguments (``keys``: only those), so
    that groups added to the wrapped optimizer get the settings the user built it with."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in optimizer.defaults.items()
            if k in accepted and k != "params" and (keys is None or k in keys)}


def _carry_state(state: dict[torch.Tensor, dict[str, Any]], target: torch.optim.Optimizer) -> None:
    """Copy ``state`` (torch or lpdist format) for ``target``'s parameters, then normalize it."""
    owned = {p for g in target.param_groups for p in g["params"]}
    for p, st in state.items():
        if p in owned:
            target.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()}
    if isinstance(target, AdamW):
        target._import_all()
    else:
        target._pack()


def _original_state(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, dict[str, Any]]:
    if isinstance(optimizer, QuantizedState):
        optimizer._unpack()
        return optimizer.inner.state
    return optimizer.state


def wrap(optimizer: torch.optim.Optimizer, *, moments: str | tuple[str, str] = "fp8", block: int = 128,
         shard: str | None = None) -> torch.optim.Optimizer:
    """A low-precision-state version of ``optimizer`` (see the module docstring).

    Args:
        optimizer: a constructed torch optimizer (its state, if any, is carried over).
        moments: storage formats, as for :class:`lpdist.optim.AdamW`; for other optimizers the
            first format stores signed state tensors, the second non-negative ones (as sqrt).
        block: elements per block scale (a multiple of 128, at most 1024).
        shard: ``None`` or ``"zero"`` (partition the state over the default process group with
            ``torch.distributed.optim.ZeroRedundancyOptimizer``; the parameters must be
            replicated, e.g. a DDP model).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if shard not in SHARD_MODES:
        raise ValueError(f"shard must be one of {SHARD_MODES}, got {shard!r}")
    parse_moments(moments)
    state = _original_state(optimizer)
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, AdamW)):
        groups = _adamw_groups(optimizer)
        options = dict(_constructor_defaults(optimizer, AdamW, _ADAMW_GROUP_KEYS), moments=moments, block=block)
        if isinstance(optimizer, AdamW):
            options["nonfinite"] = optimizer.nonfinite
        make: Callable[..., torch.optim.Optimizer] = lambda params, **kw: AdamW(params, **{**options, **kw})
    else:
        inner = optimizer.inner if isinstance(optimizer, QuantizedState) else optimizer
        inner_cls = type(inner)
        groups = [dict(g) for g in optimizer.param_groups]
        defaults = _constructor_defaults(inner, inner_cls)
        make = lambda params, **kw: QuantizedState(inner_cls(params, **{**defaults, **kw}), moments=moments,
                                                   block=block)
    if shard == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer

        wrapped = ZeroRedundancyOptimizer(groups, optimizer_class=make)
        _carry_state(state, wrapped.optim)
        return wrapped
    wrapped = make(groups)
    _carry_state(state, wrapped)
    return wrapped
