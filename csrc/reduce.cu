// FP8 gradient communication kernels (lpdist.comm; ALGORITHMS.md §0 "FP8 gradient communication", §8).
//
// Two kernels, each with a pure-torch twin in lpdist/comm/codec.py (the oracle):
//
// * quantize_rows_<in>_<res>_v<VEC>: block-scaled FP8 quantization of a [rows, cols] slice of a
//   row-major tensor (row stride x_stride), optionally fused with error feedback:
//       v = x + r                                   (fp32; r = residual, may be absent)
//       s = amax_b / fmt_max      (own scale)   or   s = amax_shared_b / target (shared scale)
//       q = round(v * (1/s))      (saturating at +-fmt_max; RNE, or stochastic with a hashed
//                                  uniform u in [0,1): floor(v/s * 2^(m-e) + u) * 2^(e-m))
//       r <- v - decode(q) * s    (residual update)
//   A block holding NaN or +-inf gets a NaN scale (own scales) or keeps the caller's +inf amax
//   (shared scales), so the receiver sees NaN for that block; its residual is left unchanged.
//   mode 0: own scales, written to `scales`; mode 1: shared amax read from `amax_in`;
//   mode 2: only write the block amax of v to `amax_out` (+inf for a non-finite block).
//   One warp per block; each lane keeps its elements in registers between the amax and the
//   quantize pass (one read of x and r). Variant _k8 holds up to 8 elements per lane and block
//   (block <= 256) and handles BLOCKS_PER_WARP_K8 consecutive blocks per warp, _k32 holds 32
//   (block <= 1024), one block per warp. Memory-bound design: every lane first issues all its
//   16-byte loads of x (and r) for the blocks in flight, kept as raw bits (few registers) and
//   unpacked late, then reduces the amaxes of all of them with interleaved warp shuffles, then
//   converts two values per instruction and stores. Index math is 32-bit where it fits.
//   Wire order: input row `own_row` is written to the LAST payload/scale row and the rows after it
//   move up by one, so rows 0..rows-2 are what the other ranks receive, in rank order (own_row =
//   rows - 1 keeps the order). The amax arrays stay in input-row order.
//
// * dequant_rows_<out>_v<VEC>: out[o, c] = factor * sum_{s < sum_rows} decode(q[o + s, c]) *
//   scale[o + s, c / block], accumulated in fp32 in rank order, one rounding to the output dtype.
//   sum_rows = world size and one output row is the all-to-all reduce-scatter; sum_rows = 1 and
//   one output row per received row is the quantized all-gather.
//   Row `own_row` (>= 0) is read from `own_payload`/`own_scales` (this rank's own row, which never
//   travels) and the rows after it from one payload row earlier; own_row < 0: all rows from payload.
//   amax_target > 0: `scales` holds agreed block amaxes and the scale is amax / amax_target (1 where
//   the amax is 0), computed as the quantize kernel's mode 1 does (shared scales, no extra pass).
//   Each thread decodes DEQUANT_COLUMNS columns in runs of VEC and loads the codes of two summed
//   rows for all of them before accumulating: several independent loads in flight per thread.
//
// Payload and scale pointers carry their own row strides so the same kernels read the packed
// all-to-all buffer ([scales | codes] per destination row) and plain fp8 tensors (NCCL transport).

#include "lp_formats.cuh"

using lp::from_float;
using lp::idiv;
using lp::hashed_uniform;
using lp::to_float;

typedef unsigned char u8;
typedef unsigned int u32;
typedef long long i64;
typedef unsigned long long u64;


// Blocks of at most 256 elements one warp handles in the _k8 variants (the host sizes the grid
// by it), and how many of them have their loads in flight at once without / with a residual.
constexpr int BLOCKS_PER_WARP_K8 = 4;
constexpr int IN_FLIGHT = 4, IN_FLIGHT_RESIDUAL = 2;  // <= 80 registers (3 CTAs of 256 per SM)
// Columns per thread of the decode-sum kernel for VEC > 1 (VEC = 1: one; the host sizes the grid
// by it): 16 / VEC runs of VEC columns, a warp's runs 32 * VEC columns apart.
constexpr int DEQUANT_COLUMNS = 16;

// A register-friendly type of BYTES bytes, for raw loads that are unpacked late.
template <int BYTES> struct Bits;
template <> struct Bits<1> { typedef u8 type; };
template <> struct Bits<2> { typedef unsigned short type; };
template <> struct Bits<4> { typedef u32 type; };
template <> struct Bits<8> { typedef uint2 type; };
template <> struct Bits<16> { typedef uint4 type; };

// VEC values of T as loaded from memory: one access of up to 16 bytes per word.
template <typename T, int VEC> struct Raw {
    static constexpr int BYTES = (int)sizeof(T) * VEC;
    static constexpr int WORD = BYTES < 16 ? BYTES : 16;
    typedef typename Bits<WORD>::type Word;
    Word w[BYTES / WORD];
};

template <typename T, int VEC>
__device__ __forceinline__ void load_raw(const T* p, Raw<T, VEC>& r) {
    typedef typename Raw<T, VEC>::Word Word;
#pragma unroll
    for (int j = 0; j < (int)(sizeof(r.w) / sizeof(Word)); ++j) r.w[j] = reinterpret_cast<const Word*>(p)[j];
}

template <typename T, int VEC>
__device__ __forceinline__ void clear_raw(Raw<T, VEC>& r) {
#pragma unroll
    for (int j = 0; j < (int)sizeof(r.w); ++j) reinterpret_cast<u8*>(&r)[j] = 0;
}

template <typename T, int VEC>
__device__ __forceinline__ void unpack(const Raw<T, VEC>& r, float* out) {
    const T* e = reinterpret_cast<const T*>(&r);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_vec(T* p, const float* in) {
    Raw<T, VEC> r;
    T* e = reinterpret_cast<T*>(&r);
#pragma unroll
    for (int i = 0; i < VEC; ++i) e[i] = from_float<T>(in[i]);
    typedef typename Raw<T, VEC>::Word Word;
#pragma unroll
    for (int j = 0; j < (int)(sizeof(r.w) / sizeof(Word)); ++j) reinterpret_cast<Word*>(p)[j] = r.w[j];
}

// fmt: 0 = e4m3, 1 = e5m2 (a run-time switch over the shared format traits of lp_formats.cuh).
// Two values per conversion instruction: RNE, saturating; decoding is exact.
__device__ __forceinline__ u32 fp8x2_encode(float a, float b, int fmt) {
    return fmt == 0 ? lp::fp8x2_code<lp::E4M3>(a, b) : lp::fp8x2_code<lp::E5M2>(a, b);
}

__device__ __forceinline__ float2 fp8x2_decode(u32 codes, int fmt) {
    return fmt == 0 ? lp::fp8x2_value<lp::E4M3>((unsigned short)codes) : lp::fp8x2_value<lp::E5M2>((unsigned short)codes);
}

// Stochastic rounding of v (|v| <= fmt_max) onto the fp8 grid (lp::round_to_format).
__device__ __forceinline__ float round_stochastic(float v, float u, int fmt) {
    return fmt == 0 ? lp::round_to_format<lp::E4M3>(v, u) : lp::round_to_format<lp::E5M2>(v, u);
}

// fp8 codes of VEC values and their decoded values.
template <int VEC>
__device__ __forceinline__ void encode(const float* q, Raw<u8, VEC>& codes, int fmt) {
    if constexpr (VEC == 1) {
        codes.w[0] = (u8)fp8x2_encode(q[0], 0.0f, fmt);
    } else {
        u32* w = reinterpret_cast<u32*>(&codes);
#pragma unroll
        for (int h = 0; h < VEC / 4; ++h)
            w[h] = fp8x2_encode(q[4 * h], q[4 * h + 1], fmt) | (fp8x2_encode(q[4 * h + 2], q[4 * h + 3], fmt) << 16);
    }
}

template <int VEC>
__device__ __forceinline__ void decode(const Raw<u8, VEC>& codes, float* d, int fmt) {
    if constexpr (VEC == 1) {
        d[0] = fp8x2_decode(codes.w[0], fmt).x;
    } else {
        const u32* w = reinterpret_cast<const u32*>(&codes);
#pragma unroll
        for (int h = 0; h < VEC / 4; ++h) {
            const float2 a = fp8x2_decode(w[h], fmt), b = fp8x2_decode(w[h] >> 16, fmt);
            d[4 * h] = a.x; d[4 * h + 1] = a.y; d[4 * h + 2] = b.x; d[4 * h + 3] = b.y;
        }
    }
}

// Arguments of the quantize kernel (see the file comment).
template <typename T, typename R>
struct QuantizeArgs {
    const T* x; R* residual; i64 x_stride; int rows; i64 col0, cols; int block; i64 nblocks;
    u8* payload; i64 payload_stride; float* scales; i64 scale_stride;
    const float* amax_in; float* amax_out; i64 amax_stride; float target; int mode; int fmt;
    float fmt_max; u32 seed; int own_row;
};

// v = x (+ r) of one lane's VEC values.
template <typename T, typename R, int VEC, bool RES>
__device__ __forceinline__ void values(const Raw<T, VEC>& xr, const Raw<R, VEC>& rr, float* v) {
    unpack<T, VEC>(xr, v);
    if constexpr (RES) {
        float r[VEC];
        unpack<R, VEC>(rr, r);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] += r[i];
    }
}

// U consecutive blocks g0 .. g0+U-1 (those < total), K vectors of VEC elements per lane each.
template <typename T, typename R, int VEC, int K, int U, bool RES, bool STOCH>
__device__ __forceinline__ void quantize_blocks(const QuantizeArgs<T, R>& a, i64 g0, i64 total, int lane) {
    Raw<T, VEC> xr[U][K];
    Raw<R, VEC> rr[U][RES ? K : 1];
    i64 x_off[U];
    int len[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // issue every load first
        const i64 g = g0 + u;
        const i64 row = g < total ? idiv(g, a.nblocks) : 0;
        const i64 start = (g - row * a.nblocks) * a.block;
        len[u] = g < total ? (int)((a.cols - start) < a.block ? (a.cols - start) : a.block) : 0;
        x_off[u] = row * a.x_stride + a.col0 + start;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int p = (k * 32 + lane) * VEC;
            if (p < len[u]) {
                load_raw<T, VEC>(a.x + x_off[u] + p, xr[u][k]);
                if constexpr (RES) load_raw<R, VEC>(a.residual + x_off[u] + p, rr[u][k]);
            } else {
                clear_raw<T, VEC>(xr[u][k]);
                if constexpr (RES) clear_raw<R, VEC>(rr[u][k]);
            }
        }
    }
    float amax[U];
    bool finite[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        amax[u] = 0.0f;
        finite[u] = true;
#pragma unroll
        for (int k = 0; k < K; ++k) {
            float v[VEC];
            values<T, R, VEC, RES>(xr[u][k], rr[u][RES ? k : 0], v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float m = fabsf(v[i]);
                if (m <= 3.402823466e38f) amax[u] = fmaxf(amax[u], m);  // false for NaN and inf
                else finite[u] = false;
            }
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
#pragma unroll
        for (int u = 0; u < U; ++u) amax[u] = fmaxf(amax[u], __shfl_xor_sync(0xffffffffU, amax[u], off));
#pragma unroll
    for (int u = 0; u < U; ++u) finite[u] = __all_sync(0xffffffffU, finite[u]);

#pragma unroll
    for (int u = 0; u < U; ++u) {
        const i64 g = g0 + u;
        if (g >= total) break;  // uniform across the warp
        const i64 row = idiv(g, a.nblocks);
        const i64 b = g - row * a.nblocks;
        if (a.mode == 2) {
            if (lane == 0) a.amax_out[row * a.amax_stride + b] = finite[u] ? amax[u] : __int_as_float(0x7f800000);
            continue;
        }
        const i64 slot = row == a.own_row ? a.rows - 1 : row - (row > a.own_row ? 1 : 0);  // wire order
        float s;
        bool keep = finite[u];  // residual updated only for a finite block
        if (a.mode == 0) {
            s = keep ? (amax[u] > 0.0f ? amax[u] / a.fmt_max : 1.0f) : __int_as_float(0x7fc00000);
            if (lane == 0) a.scales[slot * a.scale_stride + b] = s;
        } else {
            const float m = a.amax_in[row * a.amax_stride + b];
            s = m > 0.0f ? m / a.target : 1.0f;  // m = +inf (a rank saw NaN/inf) gives s = inf
            keep = keep && (m <= 3.402823466e38f);
        }
        const float inv = 1.0f / s;  // one division per block, elements multiplied (as lpdist.quant)
        u8* q_row = a.payload + slot * a.payload_stride + (x_off[u] - row * a.x_stride - a.col0);
#pragma unroll
        for (int k = 0; k < K; ++k) {
            const int p = (k * 32 + lane) * VEC;
            if (p >= len[u]) continue;
            float v[VEC], q[VEC];
            values<T, R, VEC, RES>(xr[u][k], rr[u][RES ? k : 0], v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                q[i] = fminf(fmaxf(v[i] * inv, -a.fmt_max), a.fmt_max);
                if constexpr (STOCH) {
                    const u64 idx = (u64)(x_off[u] + p + i);
                    q[i] = round_stochastic(q[i], hashed_uniform(idx, a.seed), a.fmt);
                }
            }
            Raw<u8, VEC> codes;
            encode<VEC>(q, codes, a.fmt);
            *reinterpret_cast<Raw<u8, VEC>*>(q_row + p) = codes;
            if constexpr (RES) {
                if (keep) {
                    float d[VEC], err[VEC];
                    decode<VEC>(codes, d, a.fmt);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) err[i] = __fsub_rn(v[i], __fmul_rn(d[i], s));  // no FMA: as the twin
                    store_vec<R, VEC>(a.residual + x_off[u] + p, err);
                }
            }
        }
    }
}

// One warp's BLOCKS blocks, IN_FLIGHT (IN_FLIGHT_RESIDUAL) of them loaded at a time; one at a
// time for stochastic rounding (hashing is the cost there) and for the unaligned VEC = 1 path.
template <typename T, typename R, int VEC, int KV, int BLOCKS, bool RES, bool STOCH>
__device__ __forceinline__ void quantize_warp(const QuantizeArgs<T, R>& a, i64 g0, i64 total, int lane) {
    constexpr int WANT = (STOCH || VEC == 1) ? 1 : (RES ? IN_FLIGHT_RESIDUAL : IN_FLIGHT);
    constexpr int U = BLOCKS < WANT ? BLOCKS : WANT;
#pragma unroll
    for (int u = 0; u < BLOCKS; u += U) {
        if (g0 + u >= total) return;
        quantize_blocks<T, R, VEC, KV / VEC, U, RES, STOCH>(a, g0 + u, total, lane);
    }
}

template <typename T, typename R, int VEC, int KV, int BLOCKS, bool RES>
__device__ __forceinline__ void quantize_dispatch(const QuantizeArgs<T, R>& a, i64 g0, i64 total, int lane,
                                                  int stochastic) {
    if (stochastic) quantize_warp<T, R, VEC, KV, BLOCKS, RES, true>(a, g0, total, lane);
    else quantize_warp<T, R, VEC, KV, BLOCKS, RES, false>(a, g0, total, lane);
}

template <typename T, typename R, int VEC, int KV>
__device__ void quantize_rows(const QuantizeArgs<T, R>& a, int stochastic) {
    constexpr int BLOCKS = KV == 8 ? BLOCKS_PER_WARP_K8 : 1;
    const int lane = threadIdx.x & 31;
    const i64 warp = ((i64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const i64 total = (i64)a.rows * a.nblocks;
    const i64 g0 = warp * BLOCKS;
    if (g0 >= total) return;
    if (a.residual != nullptr) quantize_dispatch<T, R, VEC, KV, BLOCKS, true>(a, g0, total, lane, stochastic);
    else quantize_dispatch<T, R, VEC, KV, BLOCKS, false>(a, g0, total, lane, stochastic);
}

// Arguments of the decode-sum kernel (see the file comment).
struct DequantArgs {
    const u8* payload; i64 payload_stride; const float* scales; i64 scale_stride; int sum_rows;
    i64 cols; int block; float factor; i64 out_stride; const u8* own_payload; const float* own_scales;
    int own_row; float amax_target;
};

template <typename O, int VEC>
__device__ __forceinline__ void dequant_rows(const DequantArgs& a, O* __restrict__ out, int fmt) {
    constexpr int U = VEC == 1 ? 1 : DEQUANT_COLUMNS / VEC, S = 2;  // runs per thread, summed rows loaded at once
    const i64 o = blockIdx.y;
    i64 c[U], b[U];
    float acc[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        c[u] = (((i64)blockIdx.x * U + u) * blockDim.x + threadIdx.x) * VEC;
        b[u] = idiv(c[u], a.block);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[u][i] = 0.0f;
    }
    for (int s0 = 0; s0 < a.sum_rows; s0 += S) {
        Raw<u8, VEC> q[S][U];
        float sc[S][U];
#pragma unroll
        for (int j = 0; j < S; ++j) {  // issue every load first
            const int s = s0 + j;
            const i64 row = o + s;
            const bool own = row == a.own_row;
            const i64 slot = row - (a.own_row >= 0 && row > a.own_row ? 1 : 0);
            const u8* q_row = own ? a.own_payload : a.payload + slot * a.payload_stride;
            const float* s_row = own ? a.own_scales : a.scales + slot * a.scale_stride;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (s < a.sum_rows && c[u] < a.cols) {
                    load_raw<u8, VEC>(q_row + c[u], q[j][u]);
                    sc[j][u] = s_row[b[u]];
                }
            }
        }
#pragma unroll
        for (int j = 0; j < S; ++j) {
            if (s0 + j >= a.sum_rows) break;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (c[u] >= a.cols) continue;
                float sv = sc[j][u];
                if (a.amax_target > 0.0f) sv = sv > 0.0f ? sv / a.amax_target : 1.0f;  // as mode 1 of quantize
                float d[VEC];
                decode<VEC>(q[j][u], d, fmt);
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[u][i] = __fadd_rn(acc[u][i], __fmul_rn(d[i], sv));
            }
        }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (c[u] >= a.cols) continue;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[u][i] *= a.factor;
        store_vec<O, VEC>(out + o * a.out_stride + c[u], acc[u]);
    }
}

// ---- extern "C" entry points: quantize_rows_<x>_<residual>_v<VEC>_k<KV>, dequant_rows_<out>_v<VEC>

#define QUANTIZE_ENTRY(NAME, T, R, VEC, KV)                                                          \
    extern "C" __global__ void __launch_bounds__(256, KV == 8 ? 3 : 2) NAME(                          \
        const T* x, R* residual, i64 x_stride, int rows, i64 col0, i64 cols, int block,              \
        i64 nblocks, u8* payload, i64 payload_stride, float* scales, i64 scale_stride,               \
        const float* amax_in, float* amax_out, i64 amax_stride, float target, int mode, int fmt,     \
        float fmt_max, int stochastic, u32 seed, int own_row) {                                      \
        const QuantizeArgs<T, R> a{x, residual, x_stride, rows, col0, cols, block, nblocks,          \
                                   payload, payload_stride, scales, scale_stride, amax_in,           \
                                   amax_out, amax_stride, target, mode, fmt, fmt_max, seed, own_row};     \
        quantize_rows<T, R, VEC, KV>(a, stochastic);                                            \
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
    extern "C" __global__ void __launch_bounds__(256, 4) NAME(                                       \
        const u8* payload, i64 payload_stride, const float* scales, i64 scale_stride, int sum_rows,  \
        i64 cols, int block, float factor, O* out, i64 out_stride, int fmt, const u8* own_payload,   \
        const float* own_scales, int own_row, float amax_target) {                                   \
        const DequantArgs a{payload, payload_stride, scales, scale_stride, sum_rows, cols, block,    \
                            factor, out_stride, own_payload, own_scales, own_row, amax_target};      \
        dequant_rows<O, VEC>(a, out, fmt);                                                           \
    }

#define DEQUANT_VECS(ON, O)                           \
    DEQUANT_ENTRY(dequant_rows_##ON##_v1, O, 1)       \
    DEQUANT_ENTRY(dequant_rows_##ON##_v8, O, 8)       \
    DEQUANT_ENTRY(dequant_rows_##ON##_v16, O, 16)

DEQUANT_VECS(f32, float)
DEQUANT_VECS(bf16, __nv_bfloat16)
DEQUANT_VECS(f16, __half)
