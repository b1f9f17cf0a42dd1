// FP8 gradient communication kernels (lpdist.comm; ALGORITHMS.md §0 "FP8 gradient communication", §8).
//
// Two kernels, each with a pure-torch twin in lpdist/comm/codec.py (the oracle):
//
// * quantize_rows_<in>_<res>_v<VEC>: block-scaled FP8 quantization of a [rows, cols] slice of a
//   row-major tensor (row stride x_stride), optionally fused with error feedback:
//       v = x + r                                   (fp32; r = residual, may be absent)
//       s = amax_b / fmt_max      (own scale)   or   s = amax_shared_b / target (shared scale),
//           at least MIN_SCALE = 2^-126 (lp::float_scale; 1 for an all-zero block)
//       q = round(v * (1/s))      (saturating at +-fmt_max; RNE, or stochastic with a hashed
//                                  uniform u in [0,1): floor(v/s * 2^(m-e) + u) * 2^(e-m))
//       r <- v - decode(q) * s    (residual update)
//   A block holding NaN or +-inf gets a NaN scale (own scales) or keeps the caller's +inf amax
//   (shared scales), so the receiver sees NaN for that block; its residual is left unchanged.
//   mode 0: own scales, written to `scales`; mode 1: shared amax read from `amax_in`;
//   mode 2: only write the block amax of v to `amax_out` (+inf for a non-finite block).
//   One warp per block; each lane keeps its elements in registers between the amax and the
//   quantize pass (one read of x and r). Variant _k8 keeps 8 elements per lane (block <= 256,
//   few registers: full occupancy, which a memory-bound kernel needs), _k32 keeps 32 (block <= 1024).
//   Wire order: input row `own_row` is written to the LAST payload/scale row and the rows after it
//   move up by one, so rows 0..rows-2 are what the other ranks receive, in rank order (own_row =
//   rows - 1 keeps the order). The amax arrays stay in input-row order.
//   reduce_fast.cu's quantize_rows_fast computes the same bytes for the common case (no
//   residual, round to nearest, 8-aligned, block 16..256), built for bandwidth.
//
// * dequant_rows_<out>_v<VEC>: out[o, c] = factor * sum_{s < sum_rows} decode(q[o + s, c]) *
//   scale[o + s, c / block], accumulated in fp32 in rank order, one rounding to the output dtype.
//   sum_rows = world size and one output row is the all-to-all reduce-scatter; sum_rows = 1 and
//   one output row per received row is the quantized all-gather.
//   Row `own_row` (>= 0) is read from `own_payload`/`own_scales` (this rank's own row, which never
//   travels) and the rows after it from one payload row earlier; own_row < 0: all rows from payload.
//   amax_target > 0: `scales` holds agreed block amaxes and the scale is amax / amax_target (1 where
//   the amax is 0), computed as the quantize kernel's mode 1 does (shared scales, no extra pass).
//
// dequant_rows is a grid-stride loop over VEC-wide column steps, so the host may cap its grid
// (lpdist.comm.codec `grid_ctas_per_sm`, as for reduce_fast.cu's quantize) and leave SM slots to a
// NCCL kernel running beside it; quantize_rows launches one warp per block.
//
// Payload and scale pointers carry their own row strides so the same kernels read the packed
// all-to-all buffer ([scales | codes] per destination row) and plain fp8 tensors (NCCL transport).

#include "lp_formats.cuh"

using lp::from_float;
using lp::hashed_uniform;
using lp::to_float;

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;


// fmt: 0 = e4m3, 1 = e5m2 (a run-time switch over the shared format traits of lp_formats.cuh)
__device__ __forceinline__ float fp8_decode(u8 code, int fmt) {
    return fmt == 0 ? lp::fp8_value<lp::E4M3>(code) : lp::fp8_value<lp::E5M2>(code);
}

__device__ __forceinline__ u8 fp8_encode(float v, int fmt) {
    return fmt == 0 ? lp::fp8_code<lp::E4M3>(v) : lp::fp8_code<lp::E5M2>(v);
}

// Stochastic rounding of v (|v| <= fmt_max) onto the fp8 grid (lp::round_to_format).
__device__ __forceinline__ float round_stochastic(float v, float u, int fmt) {
    return fmt == 0 ? lp::round_to_format<lp::E4M3>(v, u) : lp::round_to_format<lp::E5M2>(v, u);
}

// VEC values moved as 16-byte (or narrower, when VEC values are fewer bytes) accesses.
template <typename T, int VEC> struct alignas(sizeof(T) * VEC < 16 ? sizeof(T) * VEC : 16) Vec { T v[VEC]; };

template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
    if (VEC == 1) {
        out[0] = to_float(p[0]);
    } else {
        Vec<T, VEC> w = *reinterpret_cast<const Vec<T, VEC>*>(p);
#pragma unroll
        for (int i = 0; i < VEC; ++i) out[i] = to_float(w.v[i]);
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
    if (VEC == 1) {
        p[0] = from_float<T>(in[0]);
    } else {
        Vec<T, VEC> w;
#pragma unroll
        for (int i = 0; i < VEC; ++i) w.v[i] = from_float<T>(in[i]);
        *reinterpret_cast<Vec<T, VEC>*>(p) = w;
    }
}

__device__ __forceinline__ u32 pack4(const u8* c) {
    return (u32)c[0] | ((u32)c[1] << 8) | ((u32)c[2] << 16) | ((u32)c[3] << 24);
}

__device__ __forceinline__ void unpack4(u32 w, u8* c) {
#pragma unroll
    for (int i = 0; i < 4; ++i) c[i] = (u8)(w >> (8 * i));
}

// fp8 codes move as one 1-, 4-, 8- or 16-byte access per lane.
template <int VEC>
__device__ __forceinline__ void store_codes(u8* p, const u8* c) {
    if (VEC == 1) p[0] = c[0];
    else if (VEC == 4) *reinterpret_cast<u32*>(p) = pack4(c);
    else *reinterpret_cast<uint2*>(p) = make_uint2(pack4(c), pack4(c + 4));
}

template <int VEC>
__device__ __forceinline__ void load_codes(const u8* p, u8* c) {
    if (VEC == 1) {
        c[0] = p[0];
    } else if (VEC == 4) {
        unpack4(*reinterpret_cast<const u32*>(p), c);
    } else if (VEC == 8) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        unpack4(w.x, c);
        unpack4(w.y, c + 4);
    } else {
        const uint4 w = *reinterpret_cast<const uint4*>(p);
        unpack4(w.x, c);
        unpack4(w.y, c + 4);
        unpack4(w.z, c + 8);
        unpack4(w.w, c + 12);
    }
}

// VEC elements per lane step, KV elements per lane in all (block <= 32 * KV); vector accesses
// require every row start, the slice start and the block length to be multiples of VEC (checked
// by the host), so no vector straddles a block end.
template <typename T, typename R, int VEC, int KV>
__device__ void quantize_rows(const T* __restrict__ x, R* __restrict__ residual, i64 x_stride,
                              int rows, i64 col0, i64 cols, int block, i64 nblocks,
                              u8* __restrict__ payload, i64 payload_stride,
                              float* __restrict__ scales, i64 scale_stride,
                              const float* __restrict__ amax_in, float* __restrict__ amax_out,
                              i64 amax_stride, float target, int mode, int fmt, float fmt_max,
                              int stochastic, u32 seed, int own_row) {
    constexpr int K = KV / VEC;
    const int lane = threadIdx.x & 31;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (warp >= (i64)rows * nblocks) return;
    const i64 row = warp / nblocks;
    const i64 b = warp - row * nblocks;
    const i64 start = b * block;  // column offset inside the slice
    const i64 len = (cols - start) < block ? (cols - start) : block;
    const i64 x_off = row * x_stride + col0 + start;
    const i64 slot = row == own_row ? rows - 1 : row - (row > own_row ? 1 : 0);  // wire order

    float v[K][VEC];
    float amax = 0.0f;
    bool finite = true;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 p = ((i64)k * 32 + lane) * VEC;
        if (p < len) {
            load_vec<T, VEC>(x + x_off + p, v[k]);
            if (residual != nullptr) {
                float r[VEC];
                load_vec<R, VEC>(residual + x_off + p, r);
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[k][i] += r[i];
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float a = fabsf(v[k][i]);
                if (a <= 3.402823466e38f) amax = fmaxf(amax, a);  // false for NaN and inf
                else finite = false;
            }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffU, amax, off));
    finite = __all_sync(0xffffffffU, finite);

    if (mode == 2) {
        if (lane == 0) amax_out[row * amax_stride + b] = finite ? amax : __int_as_float(0x7f800000);
        return;
    }
    float s;
    if (mode == 0) {
        s = finite ? lp::float_scale(amax, fmt_max) : __int_as_float(0x7fc00000);
        if (lane == 0) scales[slot * scale_stride + b] = s;
    } else {
        const float a = amax_in[row * amax_stride + b];
        s = lp::float_scale(a, target);  // a = +inf (a rank saw NaN/inf) gives s = inf
        finite = finite && (a <= 3.402823466e38f);
    }
    const float inv = 1.0f / s;  // one division per block, elements multiplied (as lpdist.quant)
    const float limit = mode == 1 ? target : fmt_max;  // shared scales: |q| <= target, so W sum to <= fmt_max
    const i64 q_off = slot * payload_stride + start;
#pragma unroll
    for (int k = 0; k < K; ++k) {
        const i64 p = ((i64)k * 32 + lane) * VEC;
        if (p < len) {
            u8 codes[VEC];
            float err[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float q = fminf(fmaxf(v[k][i] * inv, -limit), limit);
                if (stochastic) {
                    const u64 idx = (u64)(x_off + p + i);
                    q = round_stochastic(q, hashed_uniform(idx, seed), fmt);
                }
                codes[i] = fp8_encode(q, fmt);
                err[i] = __fsub_rn(v[k][i], __fmul_rn(fp8_decode(codes[i], fmt), s));  // no FMA: as the twin
            }
            store_codes<VEC>(payload + q_off + p, codes);
            if (residual != nullptr && finite) store_vec<R, VEC>(residual + x_off + p, err);
        }
    }
}

// The VEC outputs at column c of output row o.
template <typename O, int VEC>
__device__ __forceinline__ void dequant_vec(const u8* __restrict__ payload, i64 payload_stride,
                                            const float* __restrict__ scales, i64 scale_stride,
                                            int sum_rows, int block, float factor, O* __restrict__ out,
                                            i64 out_stride, int fmt, const u8* __restrict__ own_payload,
                                            const float* __restrict__ own_scales, int own_row,
                                            float amax_target, i64 o, i64 c) {
    const i64 b = c / block;
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] = 0.0f;
#pragma unroll 4
    for (int s = 0; s < sum_rows; ++s) {
        const i64 row = o + s;
        const bool own = row == own_row;
        const i64 slot = row - (own_row >= 0 && row > own_row ? 1 : 0);
        float sc = own ? own_scales[b] : scales[slot * scale_stride + b];
        if (amax_target > 0.0f) sc = lp::float_scale(sc, amax_target);  // as mode 1 of quantize
        const u8* q = own ? own_payload + c : payload + slot * payload_stride + c;
        u8 codes[VEC];
        load_codes<VEC>(q, codes);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = __fadd_rn(acc[i], __fmul_rn(fp8_decode(codes[i], fmt), sc));
    }
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[i] *= factor;
    store_vec<O, VEC>(out + o * out_stride + c, acc);
}

template <typename O, int VEC>
__device__ void dequant_rows(const u8* __restrict__ payload, i64 payload_stride,
                             const float* __restrict__ scales, i64 scale_stride, int sum_rows,
                             i64 cols, int block, float factor, O* __restrict__ out, i64 out_stride,
                             int fmt, const u8* __restrict__ own_payload,
                             const float* __restrict__ own_scales, int own_row, float amax_target) {
    const i64 o = blockIdx.y;
    const i64 step = (i64)gridDim.x * blockDim.x * VEC;  // grid-stride: the host may cap the grid
    for (i64 c = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * VEC; c < cols; c += step)
        dequant_vec<O, VEC>(payload, payload_stride, scales, scale_stride, sum_rows, block, factor, out,
                            out_stride, fmt, own_payload, own_scales, own_row, amax_target, o, c);
}

// ---- extern "C" entry points: quantize_rows_<x>_<residual>_v<VEC>_k<KV>, dequant_rows_<out>_v<VEC>

#define QUANTIZE_ENTRY(NAME, T, R, VEC, KV)                                                          \
    extern "C" __global__ void __launch_bounds__(256, KV == 8 ? 8 : 4) NAME(const T* x, R* residual, i64 x_stride, int rows, i64 col0,       \
                                    i64 cols, int block, i64 nblocks, u8* payload,                   \
                                    i64 payload_stride, float* scales, i64 scale_stride,             \
                                    const float* amax_in, float* amax_out, i64 amax_stride,          \
                                    float target, int mode, int fmt, float fmt_max, int stochastic,  \
                                    u32 seed, int own_row) {                                         \
        quantize_rows<T, R, VEC, KV>(x, residual, x_stride, rows, col0, cols, block, nblocks,        \
                                     payload, payload_stride, scales, scale_stride, amax_in,         \
                                     amax_out, amax_stride, target, mode, fmt, fmt_max, stochastic,  \
                                     seed, own_row);                                                 \
    }

#define QUANTIZE_VECS(TN, T, RN, R, WIDE)                                \
    QUANTIZE_ENTRY(quantize_rows_##TN##_##RN##_v1_k8, T, R, 1, 8)        \
    QUANTIZE_ENTRY(quantize_rows_##TN##_##RN##_v1_k32, T, R, 1, 32)      \
    QUANTIZE_ENTRY(quantize_rows_##TN##_##RN##_v##WIDE##_k8, T, R, WIDE, 8) \
    QUANTIZE_ENTRY(quantize_rows_##TN##_##RN##_v##WIDE##_k32, T, R, WIDE, 32)

QUANTIZE_VECS(f32, float, f32, float, 4)
QUANTIZE_VECS(bf16, __nv_bfloat16, bf16, __nv_bfloat16, 8)
QUANTIZE_VECS(bf16, __nv_bfloat16, f32, float, 8)
QUANTIZE_VECS(f16, __half, f16, __half, 8)
QUANTIZE_VECS(f16, __half, f32, float, 8)

#define DEQUANT_ENTRY(NAME, O, VEC)                                                                  \
    extern "C" __global__ void NAME(const u8* payload, i64 payload_stride, const float* scales,     \
                                    i64 scale_stride, int sum_rows, i64 cols, int block,             \
                                    float factor, O* out, i64 out_stride, int fmt,                   \
                                    const u8* own_payload, const float* own_scales, int own_row,     \
                                    float amax_target) {                                             \
        dequant_rows<O, VEC>(payload, payload_stride, scales, scale_stride, sum_rows, cols, block,  \
                             factor, out, out_stride, fmt, own_payload, own_scales, own_row,         \
                             amax_target);                                                           \
    }

#define DEQUANT_VECS(ON, O)                           \
    DEQUANT_ENTRY(dequant_rows_##ON##_v1, O, 1)       \
    DEQUANT_ENTRY(dequant_rows_##ON##_v8, O, 8)       \
    DEQUANT_ENTRY(dequant_rows_##ON##_v16, O, 16)

DEQUANT_VECS(f32, float)
DEQUANT_VECS(bf16, __nv_bfloat16)
DEQUANT_VECS(f16, __half)
