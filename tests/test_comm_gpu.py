"""csrc/reduce.cu and reduce_fast.cu against their torch twin (lpdist.comm.codec), bit for bit, on one GPU."""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext

import pytest
import torch

from lpdist import kernels
from lpdist.comm import codec
from lpdist.comm.codec import block_amax_into, dequant_into, quantize_into, wire_order
from lpdist.comm.wire import WireLayout, pieces
from lpdist.quant import FORMATS

pytestmark = pytest.mark.gpu


@contextmanager
def torch_backend():
    """Run the torch twin on CUDA tensors (kernels.use_cupy is False inside)."""
    old = os.environ.get("LPDIST_BACKEND")
    os.environ["LPDIST_BACKEND"] = "torch"
    kernels._cupy.cache_clear()
    try:
        yield
    finally:
        if old is None:
            del os.environ["LPDIST_BACKEND"]
        else:
            os.environ["LPDIST_BACKEND"] = old
        kernels._cupy.cache_clear()


def _encode(x, residual, block, fmt, rounding, col0, cols, amax=None, target=1.0):
    layout = WireLayout(cols, block)
    buf = torch.zeros((x.shape[0], layout.row_bytes), dtype=torch.uint8, device=x.device)
    quantize_into(x, residual, col0=col0, cols=cols, block=block, fmt=fmt, payload=layout.payload(buf),
                  scales=layout.scales(buf), amax=amax, target=target, rounding=rounding, seed=99)
    return layout, buf


@pytest.mark.parametrize("dtype,res_dtype", [(torch.bfloat16, None), (torch.bfloat16, torch.float32),
                                             (torch.float32, torch.float32), (torch.float16, torch.float16),
                                             (torch.float16, None), (torch.float32, None)])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
@pytest.mark.parametrize("chunk,block", [(8192, 256), (1001, 256), (4096, 128), (777, 32)])
def test_quantize_and_dequant_kernels_match_twin(generator, dtype, res_dtype, fmt, rounding, chunk, block):
    assert kernels.backend() == "cupy"
    rows = 3
    x = (torch.randn(rows, chunk, generator=generator) * 3).to(dtype).cuda()
    r0 = None if res_dtype is None else (torch.randn(rows, chunk, generator=generator) * 0.01).to(res_dtype).cuda()
    for col0, cols in pieces(chunk, block, 2):
        r_gpu = None if r0 is None else r0.clone()
        layout, got = _encode(x, r_gpu, block, fmt, rounding, col0, cols)
        out_gpu = torch.empty(1, cols, dtype=dtype, device="cuda")
        dequant_into(layout.payload(got), layout.scales(got), sum_rows=rows, block=block, fmt=fmt,
                     factor=0.5, out=out_gpu)
        with torch_backend():
            r_ref = None if r0 is None else r0.clone()
            _, want = _encode(x, r_ref, block, fmt, rounding, col0, cols)
            out_ref = torch.empty(1, cols, dtype=dtype, device="cuda")
            dequant_into(layout.payload(want), layout.scales(want), sum_rows=rows, block=block, fmt=fmt,
                         factor=0.5, out=out_ref)
        assert torch.equal(got, want)
        assert torch.equal(out_gpu, out_ref)
        if r0 is not None:
            assert torch.equal(r_gpu, r_ref)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_shared_scale_and_amax_kernels_match_twin(generator, dtype):
    x = torch.randn(2, 3000, generator=generator).to(dtype).cuda()
    x[1, 2999] = float("inf")
    amax_gpu = torch.empty(2, 12, device="cuda")
    block_amax_into(x, None, col0=0, cols=3000, block=256, out=amax_gpu)
    with torch_backend():
        amax_ref = torch.empty(2, 12, device="cuda")
        block_amax_into(x, None, col0=0, cols=3000, block=256, out=amax_ref)
    assert torch.equal(amax_gpu, amax_ref) and amax_gpu[1, 11] == float("inf")
    x[1, 2999] = 0.0
    codes_gpu = torch.empty(2, 3000, dtype=torch.uint8, device="cuda")
    quantize_into(x, None, col0=0, cols=3000, block=256, fmt="e4m3", payload=codes_gpu, amax=amax_gpu, target=224.0)
    with torch_backend():
        codes_ref = torch.empty(2, 3000, dtype=torch.uint8, device="cuda")
        quantize_into(x, None, col0=0, cols=3000, block=256, fmt="e4m3", payload=codes_ref, amax=amax_gpu,
                      target=224.0)
    assert torch.equal(codes_gpu[0], codes_ref[0])
    assert torch.equal(codes_gpu[1, :2816], codes_ref[1, :2816])  # the inf block decodes to NaN either way


def test_non_finite_block_gives_nan_and_keeps_residual_on_gpu(generator):
    x = torch.randn(1, 512, generator=generator).cuda()
    x[0, 3] = float("nan")
    r = torch.full((1, 512), 0.25, device="cuda")
    layout, buf = _encode(x, r, 256, "e4m3", "nearest", 0, 512)
    out = torch.empty(1, 512, device="cuda")
    dequant_into(layout.payload(buf), layout.scales(buf), sum_rows=1, block=256, fmt="e4m3", factor=1.0, out=out)
    assert torch.isnan(out[0, :256]).all() and torch.isfinite(out[0, 256:]).all()
    assert (r[0, :256] == 0.25).all() and not (r[0, 256:] == 0.25).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block", [256, 512])
def test_own_row_wire_order_and_amax_decode_match_twin(generator, dtype, block):
    rows, cols = 3, 4096 + block
    x = torch.randn(rows, cols, generator=generator).to(dtype).cuda()
    amax = (torch.rand(1, cols // block, generator=generator) * 4).cuda()
    amax[0, 1] = 0.0
    assert kernels.backend() == "cupy"
    results = []
    for context in (nullcontext, torch_backend):  # kernels, then the torch twin
        with context():
            layout = WireLayout(cols, block)
            wire = torch.zeros((rows, layout.row_bytes), dtype=torch.uint8, device="cuda")
            quantize_into(x, None, col0=0, cols=cols, block=block, fmt="e4m3", payload=layout.payload(wire),
                          scales=layout.scales(wire), own_row=1)
            out = torch.empty(1, cols, dtype=dtype, device="cuda")
            received, own = wire[:rows - 1].clone(), wire[rows - 1:]
            dequant_into(layout.payload(received), layout.scales(received), sum_rows=rows, block=block,
                         fmt="e4m3", factor=0.5, out=out, own=(layout.payload(own), layout.scales(own)),
                         own_row=1)
            shared = torch.empty(1, cols, dtype=dtype, device="cuda")
            dequant_into(layout.payload(wire)[:1], amax, sum_rows=1, block=block, fmt="e4m3", factor=1.0,
                         out=shared, amax_target=224.0)
            results.append((wire, out, shared))
    (w_gpu, o_gpu, s_gpu), (w_ref, o_ref, s_ref) = results
    assert torch.equal(w_gpu, w_ref) and torch.equal(o_gpu, o_ref) and torch.equal(s_gpu, s_ref)


# (rows, own_row): the own row first, in the middle and last on the wire.
_WIRE_LAYOUTS = [(2, 0), (3, 1), (4, 3)]
# (mode, variant): "fast" is the case quantize_rows_fast handles; an error-feedback residual or
# stochastic rounding keeps the general quantize_rows kernel (the amax-only mode never rounds).
_QUANTIZE_CASES = [(mode, variant) for mode in ("own", "shared", "amax")
                   for variant in ("fast", "residual", "stochastic") if (mode, variant) != ("amax", "stochastic")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("block", [32, 128, 256])
@pytest.mark.parametrize("rows,own_row", _WIRE_LAYOUTS)
@pytest.mark.parametrize("mode,variant", _QUANTIZE_CASES)
def test_quantize_paths_match_general_kernel_and_twin(generator, monkeypatch, dtype, fmt, block, rows, own_row,
                                                      mode, variant):
    """Every quantize mode, through the dispatched kernel, the general kernel and the torch twin.

    Kernel bytes must equal the general kernel's everywhere (NaN/inf blocks included) and the
    twin's everywhere except the codes of non-finite blocks: the kernels clamp before rounding, so
    a NaN there becomes -max, while the twin keeps NaN; either way the block decodes non-finite.
    """
    col0, cols = block, 5 * block + 40  # a slice inside the rows; its last block holds 40 elements
    x = (torch.randn(rows, col0 + cols + 24, generator=generator) * 3).to(dtype).cuda()
    x[0, col0 + block + 3] = float("nan")  # block 1 of row 0
    x[rows - 1, col0 + cols - 5] = float("-inf")  # the partial last block of the last row
    x[1, col0 - 1] = float("nan")  # outside the slice: must change nothing
    r0 = (torch.randn(x.shape, generator=generator) * 0.01).cuda() if variant == "residual" else None
    stochastic = variant == "stochastic"
    layout = WireLayout(cols, block)
    probe = torch.zeros((rows, layout.row_bytes), dtype=torch.uint8, device="cuda")
    payload = None if mode == "amax" else layout.payload(probe)
    assert codec.fast_path_applies(x, r0, payload, col0=col0, cols=cols, block=block,
                                    stochastic=stochastic) == (variant == "fast")
    with torch_backend():
        amax = torch.empty(rows, layout.nblocks, device="cuda")
        block_amax_into(x, r0, col0=col0, cols=cols, block=block, out=amax)
    agreed = amax * 1.5  # as if another rank held larger values
    agreed[1, 0] = 0.0  # scale 1

    def run():
        wire = torch.zeros((rows, layout.row_bytes), dtype=torch.uint8, device="cuda")
        residual = None if r0 is None else r0.clone()
        amax_out = torch.zeros(rows, layout.nblocks, device="cuda")
        if mode == "amax":
            block_amax_into(x, residual, col0=col0, cols=cols, block=block, out=amax_out)
        else:
            quantize_into(x, residual, col0=col0, cols=cols, block=block, fmt=fmt, payload=layout.payload(wire),
                          scales=layout.scales(wire), amax=agreed if mode == "shared" else None,
                          target=FORMATS[fmt].max / rows, rounding="stochastic" if stochastic else "nearest",
                          seed=7, own_row=own_row)
        return wire, amax_out, residual

    got = run()
    with monkeypatch.context() as patch:
        patch.setattr(codec, "fast_path_applies", lambda *args, **kwargs: False)
        general = run()
    with torch_backend():
        want = run()
    for a, b in zip(got, general):
        assert a is None or torch.equal(a, b)
    wire, amax_out, residual = got
    finite = torch.isfinite(amax).repeat_interleave(block, dim=1)[:, :cols][wire_order(rows, own_row)]
    assert finite.any() and not finite.all()  # the injected NaN/inf landed in the slice
    assert torch.equal(wire[:, :layout.scale_bytes], want[0][:, :layout.scale_bytes])  # NaN scales too
    assert torch.equal(layout.payload(wire)[finite], layout.payload(want[0])[finite])
    assert torch.equal(amax_out, want[1])
    assert residual is None or torch.equal(residual, want[2])


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("fast", [True, False])
def test_tiny_blocks_match_twin(generator, monkeypatch, fmt, shared, fast):
    """Blocks whose amax runs down into the float32 subnormals: the kernels floor every scale at
    MIN_SCALE as the twin does (without it a reciprocal overflowed and zeros became -max codes)."""
    block, rows = 128, 2
    magnitudes = torch.tensor([1.0, 1e-30, 1e-34, 3e-36, 1e-37, 1e-39, 1e-40, 0.0])
    x = (torch.randn(rows, magnitudes.numel(), block, generator=generator) * magnitudes[:, None]).reshape(rows, -1)
    x = x.cuda()
    cols = x.shape[1]
    layout = WireLayout(cols, block)
    agreed = x.abs().view(rows, -1, block).amax(dim=2) * 1.5 if shared else None
    target = FORMATS[fmt].max / rows
    if not fast:
        monkeypatch.setattr(codec, "fast_path_applies", lambda *args, **kwargs: False)

    def run():
        wire = torch.zeros((rows, layout.row_bytes), dtype=torch.uint8, device="cuda")
        quantize_into(x, None, col0=0, cols=cols, block=block, fmt=fmt, payload=layout.payload(wire),
                      scales=layout.scales(wire), amax=agreed, target=target)
        out = torch.empty(1, cols, device="cuda")
        dequant_into(layout.payload(wire), agreed if shared else layout.scales(wire), sum_rows=rows, block=block,
                     fmt=fmt, factor=1.0, out=out, amax_target=target if shared else None)
        return wire, out

    assert codec.fast_path_applies(x, None, layout.payload(torch.zeros((rows, layout.row_bytes), dtype=torch.uint8,
                                                                        device="cuda")),
                                    col0=0, cols=cols, block=block, stochastic=False) == fast
    got = run()
    with torch_backend():
        want = run()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert bool(torch.isfinite(got[1]).all())


@pytest.mark.parametrize("cap", [1, 3])
def test_capped_grids_match_twin(generator, monkeypatch, cap):
    """quantize_rows_fast and dequant_rows under a grid cap of ``cap`` CTAs per SM: the slice is
    several times what such a grid covers in one pass (2 x 4M elements: 1024 CTAs of work for each
    kernel), so every CTA loops; the bytes must equal the torch twin's."""
    rows, chunk, block = 2, 1 << 22, 256
    x = (torch.randn(rows, chunk, generator=generator) * 3).to(torch.bfloat16).cuda()
    monkeypatch.setattr(codec, "grid_ctas_per_sm", cap)

    def run():
        layout, wire = _encode(x, None, block, "e4m3", "nearest", 0, chunk)
        out = torch.empty(1, chunk, dtype=torch.bfloat16, device="cuda")
        dequant_into(layout.payload(wire), layout.scales(wire), sum_rows=rows, block=block, fmt="e4m3",
                     factor=0.5, out=out)
        return wire, out

    probe = WireLayout(chunk, block).empty(rows, x.device)
    assert codec.fast_path_applies(x, None, WireLayout(chunk, block).payload(probe), col0=0, cols=chunk,
                                    block=block, stochastic=False)
    got = run()
    with torch_backend():
        want = run()
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("world,rank", [(2, 0), (3, 1), (4, 3)])
@pytest.mark.parametrize("chunk,block", [(8192, 256), (1000, 128), (4096, 16)])
def test_quantize_to_peers_kernel_writes_each_row_into_its_slot(generator, dtype, fmt, world, rank, chunk, block):
    """``quantize_rows_to_peers`` and the copies of its staged scales (the p2p transport's
    store-to-peers quantizer) on one GPU, with W
    local buffers standing in for the peers' workspaces: buffer d's slot ``rank`` holds exactly the
    bytes ``quantize_rows_fast`` writes for row d (a NaN block and an inf block included), the
    torch twin's scales and, in finite blocks, its codes (non-finite blocks: see
    ``test_quantize_paths_match_general_kernel_and_twin``), and no other byte of any buffer changes."""
    from types import SimpleNamespace

    from lpdist.comm import p2p
    from lpdist.comm.peer import FLAG_BYTES

    x = (torch.randn(world, chunk, generator=generator) * 3).to(dtype)
    x[0, 5] = float("nan")
    x[world - 1, chunk - 3] = float("inf")
    x = x.cuda()
    layout = WireLayout(chunk, block)
    assert codec.fast_path_applies(x, None, None, col0=0, cols=chunk, block=block, stochastic=False)
    buffers = [torch.full((FLAG_BYTES + world * layout.row_bytes,), 0xAB, dtype=torch.uint8, device="cuda")
               for _ in range(world)]
    untouched = [b.clone() for b in buffers]
    def copy_to(d: int, offset: int, src: torch.Tensor) -> None:  # PeerWorkspace.copy_to on the stand-ins
        buffers[d][FLAG_BYTES + offset:FLAG_BYTES + offset + src.nbytes].copy_(src.view(-1).view(torch.uint8))

    workspace = SimpleNamespace(base=torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64, device="cuda"),
                                data_offset=FLAG_BYTES, rank=rank, copy_to=copy_to,
                                derived=lambda key, make: make())
    p2p._quantize_to_peers(x, workspace, layout, block, fmt)
    _, want = _encode(x, None, block, fmt, "nearest", 0, chunk)
    with torch_backend():
        _, twin = _encode(x, None, block, fmt, "nearest", 0, chunk)
    padded = torch.nn.functional.pad(x.float(), (0, layout.nblocks * block - chunk))
    finite = torch.isfinite(padded).view(world, -1, block).all(dim=-1).repeat_interleave(block, dim=1)[:, :chunk]
    assert finite.any() and not finite.all()
    start = FLAG_BYTES + rank * layout.row_bytes
    for d, buf in enumerate(buffers):
        slot = buf[start:start + layout.row_bytes].view(1, -1)
        assert torch.equal(layout.payload(slot), layout.payload(want)[d:d + 1]), f"codes of row {d}"
        assert torch.equal(layout.scales(slot).view(torch.int32), layout.scales(twin)[d:d + 1].view(torch.int32)), \
            f"scales of row {d}"
        assert torch.equal(layout.payload(slot)[0, finite[d]], layout.payload(twin)[d, finite[d]]), \
            f"twin codes of row {d}"
        written = torch.zeros_like(buf, dtype=torch.bool)
        written[start:start + layout.scale_bytes][:4 * layout.nblocks] = True
        written[start + layout.scale_bytes:start + layout.scale_bytes + chunk] = True
        assert torch.equal(buf[~written], untouched[d][~written]), f"bytes outside slot {rank} of buffer {d}"
