// Fast FP8 quantize kernel of the gradient communication (lpdist.comm.codec; ALGORITHMS.md §8).
//
// A separate file from reduce.cu because it is a template compiled by NVRTC per (input type,
// format, block) on first use: this file alone keeps each such compile short.

#include "lp_formats.cuh"

typedef unsigned char u8;
typedef long long i64;

// Where the codes and the scale of row `row` go (`codes(row)[c]`, `scale_row(row)[b]`).
// WireRows: one packed send buffer in wire order (codec.wire_order: row own_row last), as
// quantize_rows writes it; the row-major group order keeps each thread's stores in one row.
struct WireRows {
    u8* payload;
    i64 payload_stride;
    float* scales;
    i64 scale_stride;
    int rows;
    int own_row;
    static constexpr bool interleave = false;
    __device__ i64 slot(i64 row) const { return row == own_row ? rows - 1 : row - (row > own_row ? 1 : 0); }
    __device__ u8* codes(i64 row) const { return payload + slot(row) * payload_stride; }
    __device__ float* scale_row(i64 row) const { return scales + slot(row) * scale_stride; }
};

// PeerRows: row d's codes go to rank d's workspace (lpdist/comm/peer.py), `slot_offset` bytes into
// it (this rank's packed row there: fp32 scales, then the codes `scale_bytes` later). base[d] is
// rank d's workspace as mapped into this process, so the stores of every row but this rank's own
// cross NVLink. The groups are interleaved across rows (group g: row g % rows), so at any time
// every SM stores to every peer and to local memory at once instead of one destination after
// another. The scales go to local memory (row r at staged + r * nblocks) and the host copies each
// row's scales to its slot in one piece afterwards: stored one by one across the link, 4 bytes per
// link write, they made the call 5% slower (two H200s, 256M elements).
struct PeerRows {
    const i64* base;
    i64 slot_offset;
    i64 scale_bytes;
    float* staged;
    i64 nblocks;
    static constexpr bool interleave = true;
    __device__ u8* codes(i64 row) const { return reinterpret_cast<u8*>(base[row]) + slot_offset + scale_bytes; }
    __device__ float* scale_row(i64 row) const { return staged + row * nblocks; }
};

// Fast path of quantize_rows for the common case (lpdist/comm/codec.py `fast_path_applies`): no
// residual, round to nearest, rows / slice start / slice length 8-aligned, block = 8 * TPB with
// TPB a power of two in 2..32 (TPB = 1 is correct too but spills registers). Same math, NaN/inf
// handling and wire order as quantize_rows, bit for bit: s = amax_b / fmt_max (mode 0) or
// amax_in / target (mode 1), code = RNE(clamp(v * (1/s), +-fmt_max)) (fp8x8_code<F, true>: the
// paired hardware conversion, the same instruction as the scalar one); in mode 1 the clamp is to
// +-target, as in quantize_rows (so W ranks' codes sum to at most fmt_max, and a NaN in a block
// whose agreed amax is inf becomes the same -target code). The layout is what a
// memory-bound kernel needs:
//   * a group of TPB lanes holds one block, 8 elements (one 16-byte load; two for fp32) per lane,
//     so no lane idles (quantize_rows gives a whole warp to a block; at block 128 half of it waits);
//   * each thread loads U groups (grid-stride apart) before reducing any of them, so U loads are in
//     flight instead of one load followed by a dependent shuffle chain; the loads stay packed
//     (lp::Raw8, 4 registers for 16-bit inputs) until used, which keeps the kernel at 4 CTAs of
//     256 threads per SM;
//   * the grid is persistent (the host caps it; every lane of a warp runs the same number of
//     iterations, so the group shuffles always have all 32 lanes).
// Mode 1 skips the amax reduction (the scale comes from amax_in; without a residual `finite` is
// not needed). A lane past the end of a partial last block loads zeros and stores nothing.
// `Dest` (WireRows or PeerRows) says where each row's codes and scales go.
template <typename T, class F, int TPB, int U, class Dest>
__device__ void quantize_groups(const T* __restrict__ x, i64 x_stride, int rows, i64 col0, i64 cols,
                                i64 nblocks, const Dest dest, const float* __restrict__ amax_in,
                                float* __restrict__ amax_out, i64 amax_stride, float target, int mode) {
    constexpr int BLOCK = 8 * TPB;
    const i64 groups = (i64)rows * nblocks;  // group g: row g / nblocks, block g % nblocks (or interleaved)
    const int lane = threadIdx.x % TPB;
    const i64 group0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) / TPB;
    const i64 gstride = ((i64)gridDim.x * blockDim.x) / TPB;
    const i64 iters = (groups + gstride * U - 1) / (gstride * U);  // the same for every lane
    auto row_of = [&](i64 g) { return Dest::interleave ? g % rows : lp::idiv(g, nblocks); };
    for (i64 it = 0; it < iters; ++it) {
        lp::Raw8<T> raw[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const i64 g = group0 + (it * U + u) * gstride;
            const i64 row = g < groups ? row_of(g) : 0;
            const i64 b = Dest::interleave ? lp::idiv(g, rows) : g - row * nblocks;
            const i64 c = b * BLOCK + lane * 8;  // this lane's first column
            raw[u] = g < groups && c < cols
                         ? *reinterpret_cast<const lp::Raw8<T>*>(x + row * x_stride + col0 + c)
                         : lp::Raw8<T>{};
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float v[8];
            lp::unpack8<T>(raw[u], v);
            float amax = 0.0f;
            bool finite = true;
            if (mode != 1) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    amax = fmaxf(amax, lp::finite_abs(v[j]));
                    finite = finite && fabsf(v[j]) <= 3.402823466e38f;  // false for NaN and inf
                }
                amax = lp::group_max<TPB>(amax);
                finite = !lp::group_any<TPB>(!finite);
            }
            const i64 g = group0 + (it * U + u) * gstride;
            if (g >= groups) continue;  // only after the shuffles, which need every lane
            const i64 row = row_of(g);
            const i64 b = Dest::interleave ? lp::idiv(g, rows) : g - row * nblocks;
            const i64 c = b * BLOCK + lane * 8;
            if (mode == 2) {
                if (lane == 0) amax_out[row * amax_stride + b] = finite ? amax : __int_as_float(0x7f800000);
                continue;
            }
            float s;
            if (mode == 0) {
                s = finite ? lp::float_scale(amax, lp::fmt_max<F>()) : __int_as_float(0x7fc00000);
                if (lane == 0) dest.scale_row(row)[b] = s;
            } else {
                const float a = amax_in[row * amax_stride + b];
                s = lp::float_scale(a, target);  // a = +inf (a rank saw NaN/inf) gives s = inf
            }
            if (c < cols)
                *reinterpret_cast<uint2*>(dest.codes(row) + c) =
                    lp::fp8x8_code<F, true>(v, 1.0f / s, mode == 1 ? target : lp::fmt_max<F>());
        }
    }
}

// quantize_rows_fast<T, F, TPB>: compiled on demand by NVRTC through its name expression, e.g.
// "quantize_rows_fast<__nv_bfloat16, lp::E4M3, 16>" (block 128); U = 4 groups per thread in flight
// (the host sizes the grid with it: 256 / TPB * 4 groups per CTA per round).
template <typename T, class F, int TPB>
__global__ void __launch_bounds__(256, 4)
quantize_rows_fast(const T* x, i64 x_stride, int rows, i64 col0, i64 cols, i64 nblocks, u8* payload,
                   i64 payload_stride, float* scales, i64 scale_stride, const float* amax_in,
                   float* amax_out, i64 amax_stride, float target, int mode, int own_row) {
    const WireRows dest{payload, payload_stride, scales, scale_stride, rows, own_row};
    quantize_groups<T, F, TPB, 4>(x, x_stride, rows, col0, cols, nblocks, dest, amax_in, amax_out,
                                  amax_stride, target, mode);
}

// quantize_rows_to_peers<T, F, TPB>: own block scales (mode 0) of all `rows` = W rows of x, row d
// stored straight into rank d's workspace (PeerRows); the exchange of the all-to-all without a
// copy. Same bytes as quantize_rows_fast.
template <typename T, class F, int TPB>
__global__ void __launch_bounds__(256, 4)
quantize_rows_to_peers(const T* x, i64 x_stride, int rows, i64 cols, i64 nblocks, const i64* base,
                       i64 slot_offset, i64 scale_bytes, float* staged) {
    const PeerRows dest{base, slot_offset, scale_bytes, staged, nblocks};
    quantize_groups<T, F, TPB, 4>(x, x_stride, rows, 0, cols, nblocks, dest, nullptr, nullptr, 0, 1.0f, 0);
}
