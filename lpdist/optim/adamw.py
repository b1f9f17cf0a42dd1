"""Low-precision AdamW: block-scaled FP8/FP16/BF16 moments, one fused kernel per step.

Math: AdamW (Loshchilov & Hutter, decoupled weight decay, arXiv 1711.05101) exactly as
``torch.optim.AdamW``; moments stored as in ``lpdist.optim.moments`` (E4M3 ``m`` and E5M2
``sqrt(v)`` for "fp8", after Fishman et al., ALGORITHMS.md §2.4, with block scales as in
bitsandbytes, §9.1); the fused step is ``lpdist.optim.fused`` / ``csrc/adam.cu``. bf16/fp16
parameters are written with stochastic rounding, or kept as fp32 master copies in the optimizer
state (``master_weights=True``, FP8-LM's precision decoupling, arXiv 2310.18313;
ALGORITHMS.md §6.4).

State per parameter (on the parameter's local shard, so it is sharded under FSDP2 and ZeRO):
``step`` (fp32 CPU scalar, as in torch), ``exp_avg_codes``/``exp_avg_scales``,
``exp_avg_sq_codes``/``exp_avg_sq_scales`` (flat codes and fp32 per-block scales),
``quant_block`` and optionally ``master_param``. ``state_dict()`` exposes torch's format instead
(dequantized ``exp_avg``/``exp_avg_sq`` shaped and placed like the parameter, DTensors for DTensor
parameters), so checkpoints load into ``torch.optim.AdamW`` and back and reshard through
``torch.distributed.checkpoint``. State in torch's format that reaches ``self.state`` by any route
(``load_state_dict``, ZeroRedundancyOptimizer, DCP) is requantized before it is used.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist

from .. import kernels
from .fused import PARAM_FORMAT_CODES, FusedLauncher, Hyper, Slot, nonfinite_flag, reference_step
from .moments import MOMENT_FORMATS, MomentFormat, MomentStore, decode, encode, parse_moments, sqrt_rn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()  # type: ignore[assignment,misc]

__all__ = ["AdamW", "clip_coefficient"]

MAX_BLOCK = 1024
NONFINITE_POLICIES = ("raise", "skip")
#: Seed of the stochastic rounding of bf16/fp16 parameters. The noise is a hash of (seed, step,
#: parameter, element), so a fixed seed gives every data-parallel replica the same rounding
#: whatever its RNG state (a seed drawn from each rank's RNG would let replicas drift apart).
STOCHASTIC_ROUNDING_SEED = 0x5EED
_LPDIST_GROUP_KEYS = ("moments", "block", "master_weights")
#: Per-parameter state entries in torch's format that a load keeps in fp32 (torch would cast them
#: to the parameter's dtype: fp32 moments rounded to bf16, fp16 second moments flushed to zero).
_FP32_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master_param")
#: Values of the step's device flag: gradients finite / some gradient NaN or inf / a tensor lr
#: that is NaN, inf or negative (both checked on the device, read with the step's one host sync).
_FLAG_NONFINITE_GRAD, _FLAG_BAD_LR = 1, 2
_FORMAT_OF_DTYPE = {f.dtype: f for f in MOMENT_FORMATS.values()}


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _like_param(param: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """Shape a flat local tensor like ``param`` (a DTensor with the same layout if it is one)."""
    local = flat.view(_local(param).shape)
    if isinstance(param, DTensor):
        return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                  shape=param.shape, stride=param.stride())
    return local


def _table_key(bucket_key: tuple) -> tuple:
    """A bucket's key without its step count: the launch table does not depend on the step."""
    return bucket_key[:3] + bucket_key[4:]


def _check_block(block: Any) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block % 128 or not 128 <= block <= MAX_BLOCK:
        raise ValueError(f"block must be a multiple of 128 between 128 and {MAX_BLOCK}, got {block!r}")


def _non_negative_finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _check_hyper(lr: Any, betas: Any, eps: Any, weight_decay: Any) -> None:
    """Hyper-parameters are checked at construction and before every step (NaN/inf refused).
    A tensor ``lr`` on the CPU is checked here; on a GPU its value is checked on the device by
    the step itself (``_FLAG_BAD_LR``), so a scheduler may change it without a host sync."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"lr must be a float or a 1-element floating-point tensor, got "
                             f"{lr.dtype} of shape {tuple(lr.shape)}")
        if lr.device.type == "cpu" and not _non_negative_finite(float(lr)):
            raise ValueError(f"lr must be non-negative and finite, got the tensor value {float(lr)!r}")
    elif not _non_negative_finite(lr):
        raise ValueError(f"lr must be a non-negative finite float or a tensor, got {lr!r}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2
            and all(_non_negative_finite(b) and b < 1.0 for b in betas)):
        raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
    if not _non_negative_finite(eps):
        raise ValueError(f"eps must be a non-negative finite float, got {eps!r}")
    if not _non_negative_finite(weight_decay):
        raise ValueError(f"weight_decay must be a non-negative finite float, got {weight_decay!r}")


def _check_gradient(p: torch.Tensor) -> None:
    """A gradient the step can use: dense, with its parameter's dtype and shape (checked on the
    tensors themselves: for DTensors their global shapes, without a ``to_local`` per step)."""
    grad = p.grad
    if grad.is_sparse:
        raise TypeError("lpdist.optim.AdamW does not support sparse gradients")
    if grad.dtype != p.dtype or grad.shape != p.shape:
        raise TypeError(f"gradient {grad.dtype}{tuple(grad.shape)} does not match its "
                        f"parameter {p.dtype}{tuple(p.shape)}")


def _check_step_options(grads_finite: Any, grad_scale: Any) -> None:
    """TypeError (ValueError for a non-finite float ``grad_scale``) naming the argument, before
    the step touches any state. ``None`` is allowed for both."""
    if grads_finite is not None and not isinstance(grads_finite, bool) and (
            not isinstance(grads_finite, torch.Tensor) or grads_finite.numel() != 1
            or grads_finite.is_floating_point() or grads_finite.is_complex()):
        raise TypeError("grads_finite must be a bool or a 1-element bool/integer tensor, got "
                        f"{grads_finite!r}")
    if grad_scale is None or isinstance(grad_scale, torch.Tensor) and grad_scale.numel() == 1 \
            and grad_scale.is_floating_point():
        return
    if not isinstance(grad_scale, (int, float)) or isinstance(grad_scale, bool):
        raise TypeError(f"grad_scale must be a float or a 1-element floating-point tensor, got {grad_scale!r}")
    if not math.isfinite(grad_scale):
        raise ValueError(f"grad_scale must be finite, got {grad_scale!r}: step not taken")


def _flag_from(grads_finite: bool | torch.Tensor, home: torch.device) -> torch.Tensor:
    """The step's int32 non-finite flag (1 = some gradient is not finite) from a checked
    ``grads_finite`` (one comparison kernel for a flag already on ``home``: this runs before
    every step)."""
    if isinstance(grads_finite, bool):  # a fill, not a copy from the host (that would wait for the stream)
        return torch.full((), 0 if grads_finite else _FLAG_NONFINITE_GRAD, dtype=torch.int32, device=home)
    if grads_finite.device != home:
        grads_finite = grads_finite.to(home)
    flag = torch.empty((), dtype=torch.int32, device=home)  # 1 (_FLAG_NONFINITE_GRAD) where it is 0
    return torch.eq(grads_finite.reshape(()) if grads_finite.dim() else grads_finite, 0, out=flag)


def _grad_scale_from(grad_scale: float | torch.Tensor, home: torch.device) -> torch.Tensor:
    """A checked ``grad_scale`` as an fp32 0-dim tensor on ``home`` (a float by a fill, not a copy
    from the host, which would wait for the stream)."""
    if isinstance(grad_scale, torch.Tensor):
        return grad_scale.detach().reshape(()).to(device=home, dtype=torch.float32)
    return torch.full((), float(grad_scale), dtype=torch.float32, device=home)


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor ``torch.nn.utils.clip_grad_norm_`` multiplies the gradients by:
    ``min(1, max_norm / (total_norm + 1e-6))``, as a tensor on ``total_norm``'s device (no host
    sync). Pass it as ``AdamW.step(grad_scale=...)`` to clip inside the fused step instead of in
    a separate pass over the gradients."""
    return torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)


class AdamW(torch.optim.Optimizer):
    """AdamW with low-precision, block-scaled moments and a fused multi-tensor CUDA step.

    Args:
        params: parameters or parameter groups (groups may override every option below except
            ``nonfinite``); fp32, bf16 or fp16 tensors or FSDP2 DTensors.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; ``lr`` may be a tensor (a CUDA
            tensor is read by the kernel, so a scheduler can change it without a host sync; a
            NaN, inf or negative value makes ``step()`` raise ``ValueError`` and change nothing).
        moments: ``"fp32" | "bf16" | "fp16" | "fp8"`` or an ``(m, v)`` tuple of
            ``"fp32" | "bf16" | "fp16" | "e4m3" | "e5m2" | "fp8"``; ``"fp8"`` is
            ``("e4m3", "e5m2")``, so in a tuple it means E4M3 for m and E5M2 for v.
        block: elements per scale of block-scaled moments (multiple of 128, at most 1024).
        master_weights: keep an fp32 copy of bf16/fp16 parameters in the state (else those
            parameters are written with stochastic rounding, the same on every rank:
            ``STOCHASTIC_ROUNDING_SEED``).
        nonfinite: ``"raise"`` (``FloatingPointError``) or ``"skip"`` (the step is skipped and
            counted in ``skipped_steps``) when a gradient holds NaN/inf; in both cases nothing
            (parameters, state) is changed. One device-side check and one host sync per step;
            ``step(grads_finite=...)`` replaces the check by a flag the caller already has.
        maximize: ascend instead of descend. ``amsgrad=True`` raises (not supported).
    """

    def __init__(self, params: Iterable[Any], lr: float | torch.Tensor = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, moments: str | tuple[str, str] = "fp8",
                 block: int = 128, master_weights: bool = False, nonfinite: str = "raise",
                 maximize: bool = False, amsgrad: bool = False) -> None:
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._seed = STOCHASTIC_ROUNDING_SEED
        self._launcher = FusedLauncher()
        self._flag_host: tuple[torch.Tensor, torch.cuda.Event] | None = None
        self._stashed_load: dict[int, dict[str, torch.Tensor]] = {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        moments=moments, block=block, master_weights=master_weights,
                        maximize=maximize, amsgrad=amsgrad)
        super().__init__(params, defaults)
        self.register_state_dict_post_hook(AdamW._export_state_dict)
        self.register_load_state_dict_pre_hook(AdamW._prepare_load)
        self.register_load_state_dict_post_hook(AdamW._finish_load)

    # ----------------------------------------------------------------------------- groups
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._validate_group(group)
        except (ValueError, TypeError):
            self.param_groups.pop()
            raise

    @staticmethod
    def _validate_group(group: dict[str, Any]) -> None:
        AdamW._validate_options(group)
        for p in group["params"]:
            if p.dtype not in PARAM_FORMAT_CODES:
                raise TypeError(f"parameters must be float32, bfloat16 or float16, got {p.dtype}")

    @staticmethod
    def _validate_options(group: dict[str, Any]) -> None:
        """Everything of a group but its parameters (also usable on a state dict's groups)."""
        _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        parse_moments(group["moments"])
        _check_block(group["block"])
        if group.get("amsgrad", False):
            raise ValueError("amsgrad=True is not supported by lpdist.optim.AdamW "
                             "(it needs a third moment); use torch.optim.AdamW for AMSGrad")
        for key in ("master_weights", "maximize"):
            if not isinstance(group[key], bool):
                raise TypeError(f"{key} must be a bool, got {group[key]!r}")

    # ----------------------------------------------------------------------------- state
    def _moment_stores(self, p: torch.Tensor, group: dict[str, Any],
                       formats: tuple[MomentFormat, MomentFormat] | None = None
                       ) -> tuple[MomentStore, MomentStore]:
        """The parameter's moments in the group's formats (``formats``: the group's parsed
        ``moments``, when the caller has them), converting or creating the state."""
        st = self.state[p]
        m_fmt, v_fmt = formats or parse_moments(group["moments"])
        block = group["block"]
        if "exp_avg_codes" not in st:
            self._import_state(st, _local(p), m_fmt, v_fmt, block, group)
        stores = self._stores(st)
        if (stores[0].fmt, stores[1].fmt, stores[0].block) != (m_fmt, v_fmt, block):
            m, v = self._values(stores)
            self._set_stores(st, m, v, m_fmt, v_fmt, block)
            stores = self._stores(st)
        return stores

    @staticmethod
    def _stores(st: dict[str, Any]) -> tuple[MomentStore, MomentStore]:
        block = st["quant_block"]
        return (MomentStore(_FORMAT_OF_DTYPE[st["exp_avg_codes"].dtype], block,
                            st["exp_avg_codes"], st["exp_avg_scales"]),
                MomentStore(_FORMAT_OF_DTYPE[st["exp_avg_sq_codes"].dtype], block,
                            st["exp_avg_sq_codes"], st["exp_avg_sq_scales"]))

    @staticmethod
    def _values(stores: tuple[MomentStore, MomentStore]) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantized flat fp32 ``(m, v)``."""
        m_store, v_store = stores
        m = decode(m_store.codes, m_store.scales, m_store.fmt, m_store.block)
        v = decode(v_store.codes, v_store.scales, v_store.fmt, v_store.block)
        return m, (v if v_store.fmt.name == "fp32" else v * v)

    @staticmethod
    def _set_stores(st: dict[str, Any], m: torch.Tensor, v: torch.Tensor, m_fmt: MomentFormat,
                    v_fmt: MomentFormat, block: int) -> None:
        st["exp_avg_codes"], st["exp_avg_scales"] = encode(m, m_fmt, block, positive_floor=False)
        root = v_fmt.name != "fp32"
        st["exp_avg_sq_codes"], st["exp_avg_sq_scales"] = encode(
            sqrt_rn(v.clamp_min(0)) if root else v, v_fmt, block, positive_floor=root)
        st["exp_avg_codes"] = st["exp_avg_codes"].clone()
        st["exp_avg_sq_codes"] = st["exp_avg_sq_codes"].clone()
        st["quant_block"] = block

    def _import_state(self, st: dict[str, Any], local: torch.Tensor, m_fmt: MomentFormat,
                      v_fmt: MomentFormat, block: int, group: dict[str, Any]) -> None:
        """Fresh state, or state in torch's format (``exp_avg``, ``exp_avg_sq``) requantized."""
        n = local.numel()

        def flat(key: str) -> torch.Tensor:
            if key not in st:
                return torch.zeros(n, dtype=torch.float32, device=local.device)
            value = _local(st.pop(key)).detach().to(device=local.device, dtype=torch.float32)
            if value.numel() != n:
                raise ValueError(f"state {key!r} has {value.numel()} elements, its parameter {n}")
            return value.reshape(-1)

        self._set_stores(st, flat("exp_avg"), flat("exp_avg_sq"), m_fmt, v_fmt, block)
        st["step"] = torch.tensor(float(st.get("step", 0.0)), dtype=torch.float32)
        master = st.pop("master_param", None)
        if group["master_weights"] and local.dtype != torch.float32:
            if master is not None:
                master = _local(master).detach().to(device=local.device, dtype=torch.float32).reshape(local.shape)
                if not torch.equal(master.to(local.dtype), local):
                    warnings.warn("a loaded fp32 master copy does not round to its parameter (the parameter "
                                  "changed after the state was saved, e.g. another optimizer trained it): the "
                                  "master copy is taken from the parameter instead", stacklevel=3)
                    master = None
            source = local if master is None else master
            st["master_param"] = source.detach().to(device=local.device, dtype=torch.float32).clone()

    def _export_state(self, p: torch.Tensor, st: dict[str, Any]) -> dict[str, Any]:
        """torch.optim.AdamW's per-parameter format: dequantized moments shaped like ``p``."""
        if "exp_avg_codes" not in st:
            return st
        m, v = self._values(self._stores(st))
        out = {"step": st["step"].clone(), "exp_avg": _like_param(p, m), "exp_avg_sq": _like_param(p, v)}
        if "master_param" in st:
            out["master_param"] = _like_param(p, st["master_param"].clone().reshape(-1))
        return out

    def _params_in_order(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @staticmethod
    def _export_state_dict(self: "AdamW", state_dict: dict[str, Any]) -> dict[str, Any]:
        params = self._params_in_order()
        state_dict["state"] = {i: self._export_state(params[i], st) for i, st in state_dict["state"].items()}
        return state_dict

    @staticmethod
    def _prepare_load(self: "AdamW", state_dict: dict[str, Any]) -> dict[str, Any]:
        """Check the state dict before torch's ``load_state_dict`` changes anything (a refused
        load leaves the optimizer as it was), fill group keys that a ``torch.optim.AdamW`` state
        dict lacks from the current groups, and keep the moments and master copies out of
        torch's cast to the parameter dtype (``_FP32_STATE_KEYS``).

        State entries are keyed by index or, through ``torch.distributed.checkpoint``, by
        parameter name; both are the ids listed in the groups' ``params``, in parameter order."""
        groups = []
        for saved, current in zip(state_dict["param_groups"], self.param_groups):
            saved = dict(saved)
            for key in _LPDIST_GROUP_KEYS:
                saved.setdefault(key, current[key])
            self._validate_options(saved)
            groups.append(saved)
        params = self._params_in_order()
        position = {pid: n for n, pid in enumerate(pid for g in groups for pid in g["params"])}
        if len(position) != len(params):
            return state_dict  # torch refuses it (groups of other sizes) before changing anything
        state, stashed = {}, {}
        for pid, st in state_dict["state"].items():
            st, n = dict(st), position.get(pid)
            if n is not None:
                numel = _local(params[n]).numel()
                kept = {key: st.pop(key) for key in _FP32_STATE_KEYS if key in st}
                for key, value in kept.items():
                    if _local(value).numel() != numel:
                        raise ValueError(f"state {key!r} of parameter {pid!r} has {_local(value).numel()} "
                                         f"elements, the parameter {numel}: state dict not loaded")
                stashed[n] = kept
            state[pid] = st
        self._stashed_load = stashed
        return {**state_dict, "state": state, "param_groups": groups}

    @staticmethod
    def _finish_load(self: "AdamW") -> None:
        params = self._params_in_order()
        for n, kept in self._stashed_load.items():
            self.state[params[n]].update(kept)
        self._stashed_load = {}
        self._import_all()

    def _import_all(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p in self.state:
                    self._moment_stores(p, group)

    def memory_bytes(self) -> int:
        """Bytes of optimizer state on this rank: moment codes, block scales, master copies."""
        self._import_all()
        total = 0
        for st in self.state.values():
            m, v = self._stores(st)
            total += m.nbytes + v.nbytes
            if "master_param" in st:
                total += st["master_param"].numel() * 4
        return total

    # ----------------------------------------------------------------------------- step
    def _slots(self) -> tuple[dict[tuple, list[Slot]], list[torch.Tensor], list[Any], list[torch.Tensor]]:
        """Bucket the parameters with gradients: ``{(group, dtype, device, step, fused, master): slots}``,
        with the parameters whose state this call created, the DTensor meshes met and the
        parameters' ``step`` tensors. Every group and gradient is validated before any state is
        created or converted; a call that raises later removes the state it created."""
        for group in self.param_groups:
            self._validate_group(group)
            for p in group["params"]:
                if p.grad is not None:
                    _check_gradient(p)
        buckets: dict[tuple, list[Slot]] = {}
        created: list[torch.Tensor] = []
        meshes: list[Any] = []
        steps: list[torch.Tensor] = []
        salt = 0
        kernels_available = kernels.use_cupy()  # the per-parameter test is then is_cuda alone
        try:
            for gi, group in enumerate(self.param_groups):
                formats = parse_moments(group["moments"])
                for p in group["params"]:
                    salt += 1
                    if p.grad is None:
                        continue
                    if p not in self.state:
                        created.append(p)
                    m, v = self._moment_stores(p, group, formats)
                    slot_key, slot, step = self._slot(gi, p, m, v, salt, kernels_available)
                    if isinstance(p, DTensor) and p.device_mesh not in meshes:
                        meshes.append(p.device_mesh)
                    buckets.setdefault(slot_key, []).append(slot)
                    steps.append(step)
        except BaseException:
            for p in created:  # a step that raises leaves no state behind
                self.state.pop(p, None)
            raise
        return buckets, created, meshes, steps

    def _slot(self, gi: int, p: torch.Tensor, m: MomentStore, v: MomentStore, salt: int,
              kernels_available: bool) -> tuple[tuple, Slot, torch.Tensor]:
        """The parameter's bucket key, slot (local shards, master copy, moments) and ``step``."""
        st = self.state[p]
        param, grad = _local(p), _local(p.grad)
        master = st.get("master_param")
        fused = (kernels_available and param.is_cuda and grad.is_cuda
                 and param.is_contiguous() and grad.is_contiguous())
        step = st["step"]
        key = (gi, param.dtype, param.device, int(step), fused, master is not None)
        return key, Slot(param, grad, master, m, v, salt), step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *,
             grads_finite: bool | torch.Tensor | None = None,
             grad_scale: float | torch.Tensor | None = None) -> Any:
        """One AdamW step for every parameter with a gradient (see the class docstring).

        ``grad_scale``: a factor every gradient element is multiplied by (in fp32) before the
        update, inside the same kernel; e.g. gradient clipping's
        ``clip_coefficient(total_norm, max_norm)``, which then costs no pass over the gradients
        of its own (``clip_grad_norm_`` multiplies them in place: a read and a write of every
        gradient). The ``.grad`` tensors are left as they are. A float, or a 1-element
        floating-point tensor on any device (read on the device; a NaN or infinite one counts as
        a non-finite gradient and the ``nonfinite`` policy applies).

        ``grads_finite``: whether every gradient of this step is finite, when the caller knows
        it already, e.g. ``torch.isfinite(total_norm)`` from ``torch.nn.utils.clip_grad_norm_``
        (a norm is finite exactly when all gradients are, or conservatively False when the
        sum of squares overflows). A bool or a 1-element bool/integer tensor on any device
        (read on the device). The optimizer then skips its own gradient scan, which
        reads every gradient once more (4 of the ~20 bytes per fp32 parameter a fused step
        moves with fp8 moments); when False, the ``nonfinite`` policy applies as usual.
        """
        _check_step_options(grads_finite, grad_scale)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets, created, meshes, steps = self._slots()
        if not buckets:
            return loss
        home = next(iter(buckets))[2]
        scale = None if grad_scale is None else _grad_scale_from(grad_scale, home)
        if grads_finite is None:
            flag = self._scan_gradients(buckets, home)
        else:
            flag = _flag_from(grads_finite, home)
        if isinstance(grad_scale, torch.Tensor):  # a float was checked on the host
            flag = torch.maximum(flag, (~torch.isfinite(scale)).to(torch.int32) * _FLAG_NONFINITE_GRAD)
        flag = self._flag_bad_lr(flag, buckets, home)
        for mesh in meshes:
            for dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))

        hypers = {key: self._hyper(key, scale) for key in buckets}
        if home.type == "cuda":
            seen, ready = self._flag_reader()
            seen.copy_(flag, non_blocking=True)
            ready.record(torch.cuda.current_stream(home))
            for key, slots in buckets.items():
                if key[4]:  # gated on the device by the flag: writes nothing if it is set
                    self._launcher.step(_table_key(key), slots, self.param_groups[key[0]]["block"], hypers[key],
                                        flag if key[2] == home else flag.to(key[2]))
            ready.synchronize()
            code = int(seen.item())
        else:
            code = int(flag.item())
        if code:
            for p in created:
                del self.state[p]
            if code >= _FLAG_BAD_LR:
                raise ValueError("lr of a parameter group is NaN, inf or negative (a tensor lr on the GPU, "
                                 "checked there): step not taken, parameters and state unchanged")
            if self.nonfinite == "raise":
                raise FloatingPointError("non-finite (NaN or inf) gradient: lpdist.optim.AdamW step "
                                         "not taken, parameters and state unchanged")
            self.skipped_steps += 1
            return loss
        for key, slots in buckets.items():
            if not key[4]:
                for slot in slots:
                    reference_step(slot, hypers[key])
        torch._foreach_add_(steps, 1.0)
        return loss

    def _flag_reader(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        """A pinned host int32 scalar that receives the step's flag and the event that says it
        arrived; made once and reused (every step waits for the event before it returns)."""
        if self._flag_host is None:
            self._flag_host = (torch.empty((), dtype=torch.int32, pin_memory=True), torch.cuda.Event())
        return self._flag_host

    def _scan_gradients(self, buckets: dict[tuple, list[Slot]], home: torch.device) -> torch.Tensor:
        """int32 0-dim flag on ``home``: 1 if any gradient element is NaN or ±inf."""
        flag = torch.zeros((), dtype=torch.int32, device=home)
        for key, slots in buckets.items():
            if key[4]:
                self._launcher.check(_table_key(key), slots, self.param_groups[key[0]]["block"], flag)
            else:
                flag = torch.maximum(flag, nonfinite_flag([s.grad for s in slots]).to(home))
        return flag

    def _flag_bad_lr(self, flag: torch.Tensor, buckets: dict[tuple, list[Slot]], home: torch.device) -> torch.Tensor:
        """``flag`` raised to ``_FLAG_BAD_LR`` if the tensor lr of a stepped group is NaN, inf or
        negative; only for lr tensors off the CPU (CPU ones are checked on the host, and reading
        a GPU one there would cost a host sync of its own)."""
        for gi in {key[0] for key in buckets}:
            lr = self.param_groups[gi]["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                bad = ~(torch.isfinite(lr) & (lr >= 0))
                flag = torch.maximum(flag, bad.reshape(()).to(device=home, dtype=torch.int32) * _FLAG_BAD_LR)
        return flag

    def _hyper(self, key: tuple, grad_scale: torch.Tensor | None) -> Hyper:
        group = self.param_groups[key[0]]
        return Hyper.for_step(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                              key[3] + 1, group["maximize"], self._seed, grad_scale)
