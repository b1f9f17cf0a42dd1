"""Block Hadamard rotations (Quartet, ALGORITHMS.md §4.1-4.2; NVFP4 random Hadamard transform,
ALGORITHMS.md §5).

``H_n`` is the Sylvester Hadamard matrix (``H_1 = [1]``, ``H_2n = [[H, H], [H, -H]]``), so
``H_n H_nᵀ = n I``. A block rotation multiplies every group of ``n`` consecutive elements of the
last dim by ``R = diag(r) H_n / √n`` (``r ∈ {±1}ⁿ``; ``r = 1`` for the plain transform), which is
orthonormal: ``R Rᵀ = I``. Rotating both GEMM operands along their reduction dim with the same
``R`` leaves the product unchanged, ``(X R)(W R)ᵀ = X Wᵀ``, while spreading outliers over the
block before quantization. A last partial block is zero-padded (zeros do not change the
product); the inverse rotation :func:`unrotate` multiplies by ``Rᵀ`` and drops the padding.

The random signs of the recipes come from :func:`signs_like`, an opaque operator that depends
on a tensor of the pass that uses them. Under ``torch.compile`` a plain ``torch.randint`` has no
inputs, so AOT autograd may hoist the rotation of a saved operand into the forward graph and
draw the signs again in the backward graph (or recompute a forward draw there): the two
operands of one GEMM would then be rotated with different signs and the transform would not
cancel (gradients off by ~100%). The opaque op is drawn once, in the graph of its input.
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard_matrix", "rotation", "rotate", "rotate_transposed", "unrotate", "random_signs", "signs_like"]


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix of ±1 (``n`` a power of two)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of two, got {n!r}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    for _ in range(int(math.log2(n))):
        h = torch.cat((torch.cat((h, h), dim=1), torch.cat((h, -h), dim=1)), dim=0)
    return h


def random_signs(n: int, *, device: torch.device | str | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent uniform signs ±1 (float32)."""
    bits = torch.randint(0, 2, (n,), device=device, generator=generator)
    return (bits * 2 - 1).to(torch.float32)


# Declared with torch.library.Library, as lpdist::fp8_gemm is, so that each call costs a
# dispatcher call and not custom_op's per-call wrappers (host time per layer and step). It is
# called only in backward passes, where autograd is off, so it needs no autograd kernel.
_LIBRARY = torch.library.Library("lpdist", "FRAGMENT")
_LIBRARY.define("signs_like(Tensor anchor, int n) -> Tensor",
                tags=(torch.Tag.nondeterministic_seeded,))


def _signs_like_kernel(anchor: torch.Tensor, n: int) -> torch.Tensor:
    return random_signs(n, device=anchor.device)


_LIBRARY.impl("signs_like", _signs_like_kernel, "CompositeExplicitAutograd")


@torch.library.register_fake("lpdist::signs_like", lib=_LIBRARY)
def _(anchor: torch.Tensor, n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.float32, device=anchor.device)


def signs_like(anchor: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` fresh uniform signs ±1 on ``anchor``'s device, drawn where ``anchor`` is computed
    (an opaque op: never duplicated, hoisted or recomputed by ``torch.compile``; see above)."""
    return torch.ops.lpdist.signs_like.default(anchor, n)


def rotation(n: int, signs: torch.Tensor | None = None, *, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal ``R = diag(signs) H_n / √n`` (``signs=None``: all +1)."""
    r = hadamard_matrix(n, dtype=dtype, device=device) / math.sqrt(n)
    if signs is not None:
        if signs.shape != (n,):
            raise ValueError(f"signs must have shape ({n},), got {tuple(signs.shape)}")
        r = signs.to(dtype).unsqueeze(1) * r
    return r


def _blocks(x: torch.Tensor, n: int) -> torch.Tensor:
    pad = -x.shape[-1] % n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, n)


def rotate(x: torch.Tensor, n: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with each ``n``-block of the last dim multiplied by ``R``; the last dim is padded to a
    multiple of ``n``."""
    r = rotation(n, signs, dtype=x.dtype, device=x.device)
    out = _blocks(x, n) @ r
    return out.reshape(*x.shape[:-1], -1)


def rotate_transposed(stored: torch.Tensor, n: int, signs: torch.Tensor | None = None) -> torch.Tensor:
    """``rotate(stored.t(), n, signs)`` for a 2-D ``stored`` (a backward GEMM operand reduced over
    its first dim), without the transposed copy a batched product of ``stored.t()`` makes: row
    blocks of ``stored.t()`` times ``R`` are column blocks of ``stored`` times ``Rᵀ`` from the left,
    ``(Xᵀ R)ᵀ = Rᵀ X`` per ``n``-block of rows. Returns a transposed view. The caller states the
    transposition (a stride test would be traced as a guard, which dynamic-shape backward graphs
    of torch.compile do not support)."""
    rows, cols = stored.shape
    if rows % n:
        return rotate(stored.t(), n, signs)
    r = rotation(n, signs, dtype=stored.dtype, device=stored.device)
    return (r.t() @ stored.reshape(rows // n, n, cols)).reshape(rows, cols).t()


def unrotate(y: torch.Tensor, n: int, signs: torch.Tensor | None = None,
             size: int | None = None) -> torch.Tensor:
    """Inverse of :func:`rotate`: multiply each ``n``-block by ``Rᵀ``, keep the first ``size``."""
    r = rotation(n, signs, dtype=y.dtype, device=y.device)
    out = (_blocks(y, n) @ r.t()).reshape(*y.shape[:-1], -1)
    return out if size is None else out[..., :size]
