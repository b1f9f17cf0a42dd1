// Block-scaled quantize / dequantize for FP8 (E4M3, E5M2) and packed FP4 (E2M1).
//
// Twin of lpdist/quant/qtensor.py (the oracle); ALGORITHMS.md §1. Layout: the input is
// `rows x n` contiguous; quantization blocks of `k` elements run along each row (a last
// partial block is allowed). A group of TPB threads (a power of two <= 32) handles one block:
// it reduces the block amax with warp shuffles, derives the scale, then rounds and stores its
// elements. FP4 codes are packed two per byte, low nibble first, rows padded to even length.
//
// Scale modes (argument `mode`):
//   0 FLOAT     scale = amax / fmt_max per block (1 for an all-zero block)
//   1 E8M0_FLOOR / 2 E8M0_CEIL  power-of-two MX scales, stored as E8M0 codes
//   3 NVFP4     E4M3 block scale times the fp32 tensor scale derived from `tensor_amax`
//   4 GIVEN     effective scales read from `given` (one per block, or one if given_stride == 0)
//   5 TENSOR    one scale for the tensor from `tensor_amax` (amax / fmt_max)
// `tensor_amax` points at {amax of finite |x|, NaN flag} written by lp_amax.
#include "lp_formats.cuh"

using namespace lp;

namespace {

constexpr int MODE_FLOAT = 0, MODE_E8M0_FLOOR = 1, MODE_E8M0_CEIL = 2, MODE_NVFP4 = 3,
              MODE_GIVEN = 4, MODE_TENSOR = 5;

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* __restrict__ x, long long i, long long end, float* v) {
  if constexpr (VEC == 8 && sizeof(T) == 2) {
    const uint4 raw = *reinterpret_cast<const uint4*>(x + i);
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = to_float(e[j]);
  } else if constexpr (VEC == 8) {
    const float4 a = *reinterpret_cast<const float4*>(x + i);
    const float4 b = *reinterpret_cast<const float4*>(x + i + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = (i + j < end) ? to_float(x[i + j]) : 0.0f;
  }
}

// The smallest E4M3 value >= v for v >= 0, capped at 448 (oracle: lpdist.quant.scaling._e4m3_ceil).
__device__ __forceinline__ float e4m3_ceil(float v) {
  const float nearest = round_to_format<E4M3>(v, -1.0f);
  const float step = pow2i(max(floor_log2(nearest), E4M3::EMIN) - E4M3::M);
  return fminf(nearest < v ? nearest + step : nearest, fmt_max<E4M3>());
}

// Effective scale of a block and its stored form (float bits, E8M0 code, or E4M3 code).
template <class F>
__device__ __forceinline__ float block_scale(int mode, float amax, bool has_nan, bool stochastic,
                                             const float* tensor_amax, const float* given,
                                             long long b, long long given_stride, unsigned* stored) {
  float eff;
  if (mode == MODE_FLOAT || mode == MODE_TENSOR) {
    if (mode == MODE_TENSOR) amax = tensor_amax[0];
    eff = float_scale(amax, fmt_max<F>());
    if (F::FP4 && has_nan) eff = __int_as_float(0x7fc00000);
    *stored = __float_as_uint(eff);
  } else if (mode == MODE_GIVEN) {
    eff = given[b * given_stride];
    if (F::FP4 && has_nan) eff = __int_as_float(0x7fc00000);
    *stored = __float_as_uint(eff);
  } else if (mode == MODE_E8M0_FLOOR || mode == MODE_E8M0_CEIL) {
    int e;
    if (mode == MODE_E8M0_FLOOR) {
      e = floor_log2(amax) - F::EMAX;
    } else {
      const float r = amax / fmt_max<F>();
      e = floor_log2(r) + ((__float_as_int(r) & 0x7FFFFF) != 0 ? 1 : 0);
    }
    if (!(amax > 0.0f)) e = 0;
    e = min(max(e, -127), 127);
    eff = ldexpf(1.0f, e);
    unsigned code = (unsigned)(e + 127);
    if (F::FP4 && has_nan) { eff = __int_as_float(0x7fc00000); code = 255u; }
    *stored = code;
  } else {  // NVFP4: s_g = amax_t / (6*448); s_hat = q_E4M3((amax_b [*17/16]) / 6 / s_g)
    const float t_amax = tensor_amax[0];
    const float s_g = float_scale(t_amax, 2688.0f);
    const float target = stochastic ? amax * 1.0625f : amax;
    float s_hat = round_to_format<E4M3>((target / 6.0f) / s_g, -1.0f);
    if (!(s_hat > 0.0f)) s_hat = 1.0f;
    // With stochastic rounding no block may clip: a subnormal s_hat the 17/16 headroom does not
    // cover (fixed step 2^-9) is rounded up instead (oracle: nvfp4_block_scale).
    if (stochastic) {
      const float needed = (amax / 6.0f) / s_g;
      if (s_hat < needed) s_hat = e4m3_ceil(needed);
    }
    if (has_nan) s_hat = __int_as_float(0x7fc00000);
    eff = s_hat * s_g;
    *stored = fp8_code<E4M3>(s_hat);
  }
  return eff;
}

// Store a block's scale in its stored form (E8M0/E4M3 byte, or float bits; one for the tensor).
__device__ __forceinline__ void write_scale(void* scale_out, int mode, long long given_stride, long long g,
                                            unsigned stored) {
  if (mode == MODE_E8M0_FLOOR || mode == MODE_E8M0_CEIL || mode == MODE_NVFP4)
    reinterpret_cast<unsigned char*>(scale_out)[g] = (unsigned char)stored;
  else if (mode == MODE_FLOAT || (mode == MODE_GIVEN && given_stride != 0))
    reinterpret_cast<unsigned*>(scale_out)[g] = stored;
  else if (g == 0)
    reinterpret_cast<unsigned*>(scale_out)[0] = stored;
}

template <typename T, class F, int VEC, int TPB>
__device__ void quantize_blocks(const T* __restrict__ x, unsigned char* __restrict__ data,
                                void* __restrict__ scale_out, const float* __restrict__ tensor_amax,
                                const float* __restrict__ given, long long given_stride,
                                long long rows, long long n, long long k, int mode,
                                int stochastic, unsigned seed) {
  const long long nb = (n + k - 1) / k;
  const long long groups = rows * nb;
  const int lane = threadIdx.x % TPB;
  const long long group0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / TPB;
  const long long gstride = ((long long)gridDim.x * blockDim.x) / TPB;
  const long long row_bytes = F::FP4 ? (n + 1) / 2 : n;
  // All lanes of a group iterate together (group count is uniform per warp), keeping shuffles legal.
  for (long long g = group0; g < groups + (gstride - groups % gstride) % gstride; g += gstride) {
    const bool active = g < groups;
    const long long r = active ? idiv(g, nb) : 0, c0 = active ? (g - r * nb) * k : 0;
    const long long c1 = active ? min(c0 + k, n) : 0;
    const T* xr = x + r * n;
    float first[VEC];
    float amax = 0.0f;
    bool has_nan = false;
    for (long long c = c0 + (long long)lane * VEC; c < c1; c += (long long)TPB * VEC) {
      float v[VEC];
      load<T, VEC>(xr, c, c1, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        amax = fmaxf(amax, finite_abs(v[j]));
        has_nan |= is_nan(v[j]);
        if (c == c0 + (long long)lane * VEC) first[j] = v[j];
      }
    }
    amax = group_max<TPB>(amax);
    has_nan = group_any<TPB>(has_nan);
    if (!active) continue;  // shuffles above need every lane; nothing below does
    if (F::FP4 && (mode == MODE_TENSOR || (mode == MODE_GIVEN && given_stride == 0)))
      has_nan = tensor_amax[1] != 0.0f;
    unsigned stored;
    const float eff = block_scale<F>(mode, amax, has_nan, stochastic != 0, tensor_amax, given, g,
                                     given_stride, &stored);
    const float inv = 1.0f / eff;  // elements are multiplied by the reciprocal, as in the oracle
    if (lane == 0) write_scale(scale_out, mode, given_stride, g, stored);
    for (long long c = c0 + (long long)lane * VEC; c < c1; c += (long long)TPB * VEC) {
      float v[VEC];
      if (c == c0 + (long long)lane * VEC) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] = first[j];
      } else {
        load<T, VEC>(xr, c, c1, v);
      }
      if constexpr (F::FP4) {
        float q[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const float u = stochastic ? hashed_uniform((unsigned long long)(r * n + c + j), seed) : -1.0f;
          q[j] = round_to_format<F>(v[j] * inv, u);
        }
        unsigned char* out = data + r * row_bytes + c / 2;
        if constexpr (VEC == 8) {
          unsigned word = 0;
#pragma unroll
          for (int j = 0; j < 8; ++j) word |= e2m1_code(q[j]) << (4 * j);
          *reinterpret_cast<unsigned*>(out) = word;
        } else {
#pragma unroll
          for (int j = 0; j < VEC; j += 2) {
            if (c + j >= c1) break;
            const unsigned hi = (c + j + 1 < c1) ? e2m1_code(q[j + 1]) : 0u;
            out[j / 2] = (unsigned char)(e2m1_code(q[j]) | (hi << 4));
          }
        }
      } else {
        // FP8: the hardware conversion (RNE, saturating) equals the generic rounding for
        // nearest; stochastic rounding goes through round_to_format first.
        unsigned char code[VEC];
        if (stochastic) {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            code[j] = fp8_code<F>(round_to_format<F>(
                v[j] * inv, hashed_uniform((unsigned long long)(r * n + c + j), seed)));
        } else {
#pragma unroll
          for (int j = 0; j < VEC; j += 2) {
            const unsigned short pair = fp8x2_code<F>(v[j] * inv, (j + 1 < VEC) ? v[j + 1] * inv : 0.0f);
            code[j] = (unsigned char)(pair & 0xFF);
            if (j + 1 < VEC) code[j + 1] = (unsigned char)(pair >> 8);
          }
        }
        unsigned char* out = data + r * row_bytes + c;
        if constexpr (VEC == 8) {
          *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(code);
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j)
            if (c + j < c1) out[j] = code[j];
        }
      }
    }
  }
}

// Fast path for the common case: FP8 output, round-to-nearest, 8-aligned rows and blocks of at
// most TPB*8 elements (one 16-byte vector per lane). Each thread keeps U independent groups in
// flight: all U loads are issued before any reduction, which hides memory latency. Same
// arithmetic as quantize_blocks (and the oracle): scale from the block amax, multiply by its
// reciprocal, hardware RNE conversion with saturation.
template <typename T, class F, int TPB, int U>
__device__ void quantize_fp8_fast(const T* __restrict__ x, unsigned char* __restrict__ data,
                                  void* __restrict__ scale_out, const float* __restrict__ tensor_amax,
                                  const float* __restrict__ given, long long given_stride,
                                  long long rows, long long n, long long k, int mode) {
  const long long nb = (n + k - 1) / k;
  const long long groups = rows * nb;
  const int lane = threadIdx.x % TPB;
  const long long group0 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / TPB;
  const long long gstride = ((long long)gridDim.x * blockDim.x) / TPB;
  const long long iters = (groups + gstride * U - 1) / (gstride * U);  // uniform across the warp
  for (long long it = 0; it < iters; ++it) {
    Raw8<T> raw[U];
    long long off[U];  // element offset of this lane's 8 values (input and fp8 output alike)
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long g = group0 + (it * U + u) * gstride;
      const long long r = g < groups ? idiv(g, nb) : 0;
      const long long c0 = (g - r * nb) * k, c = c0 + lane * 8;
      off[u] = (g < groups && c < min(c0 + k, n)) ? r * n + c : -1;
      if (off[u] >= 0) raw[u] = *reinterpret_cast<const Raw8<T>*>(x + off[u]);
      else raw[u] = Raw8<T>{};
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float v[8];
      unpack8<T>(raw[u], v);
      float amax = 0.0f;
#pragma unroll
      for (int j = 0; j < 8; ++j) amax = fmaxf(amax, finite_abs(v[j]));
      amax = group_max<TPB>(amax);
      const long long g = group0 + (it * U + u) * gstride;
      if (g >= groups) continue;
      unsigned stored;
      const float eff = block_scale<F>(mode, amax, false, false, tensor_amax, given, g, given_stride, &stored);
      if (lane == 0) write_scale(scale_out, mode, given_stride, g, stored);
      if (off[u] < 0) continue;
      const float inv = 1.0f / eff;
      *reinterpret_cast<uint2*>(data + off[u]) = fp8x8_code<F>(v, inv);
    }
  }
}

// {amax of finite |x|, NaN flag} of a whole tensor. VEC8: the tensor is 16-byte aligned and
// numel % 8 == 0, so every thread reads whole 8-element vectors, U of them in flight.
template <typename T, bool VEC8>
__device__ void amax_kernel(const T* __restrict__ x, long long numel, float* __restrict__ out) {
  constexpr int U = 4;
  float m = 0.0f;
  bool nan = false;
  const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const long long stride = (long long)gridDim.x * blockDim.x;
  if constexpr (VEC8) {
    const long long chunks = numel / 8;
    for (long long c0 = tid; c0 < chunks; c0 += stride * U) {
      Raw8<T> raw[U];
#pragma unroll
      for (int u = 0; u < U; ++u)
        raw[u] = (c0 + u * stride < chunks) ? *reinterpret_cast<const Raw8<T>*>(x + (c0 + u * stride) * 8)
                                            : Raw8<T>{};
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float v[8];
        unpack8<T>(raw[u], v);
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          m = fmaxf(m, finite_abs(v[j]));
          nan |= is_nan(v[j]);
        }
      }
    }
  } else {
    for (long long i = tid; i < numel; i += stride) {
      const float v = to_float(x[i]);
      m = fmaxf(m, finite_abs(v));
      nan |= is_nan(v);
    }
  }
  m = group_max<32>(m);
  nan = group_any<32>(nan);
  if ((threadIdx.x & 31) == 0) {
    atomicMax(reinterpret_cast<int*>(out), __float_as_int(m));  // non-negative floats order as ints
    if (nan) out[1] = 1.0f;
  }
}

__device__ __forceinline__ float stored_scale(const void* scale, const float* tensor_scale,
                                              int scale_kind, long long b) {
  if (scale_kind == 0) return reinterpret_cast<const float*>(scale)[b];
  const unsigned code = reinterpret_cast<const unsigned char*>(scale)[b];
  if (scale_kind == 1) return code == 255u ? __int_as_float(0x7fc00000) : ldexpf(1.0f, (int)code - 127);
  return fp8_value<E4M3>((unsigned char)code) * tensor_scale[0];
}

// Store 8 consecutive outputs with 16-byte accesses (the caller guarantees alignment).
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const T* o) {
  if constexpr (sizeof(T) == 2) {
    *reinterpret_cast<uint4*>(p) = *reinterpret_cast<const uint4*>(o);
  } else {
    reinterpret_cast<float4*>(p)[0] = reinterpret_cast<const float4*>(o)[0];
    reinterpret_cast<float4*>(p)[1] = reinterpret_cast<const float4*>(o)[1];
  }
}

// Fast path of dequantize for FP8 with 8-aligned rows and blocks: each thread keeps U 8-byte
// loads in flight before expanding them (same arithmetic as dequantize_kernel).
template <typename T, class F, int U>
__device__ void dequantize_fp8_fast(const unsigned char* __restrict__ data, const void* __restrict__ scale,
                                    const float* __restrict__ tensor_scale, int scale_kind,
                                    long long scale_stride, T* __restrict__ out, long long rows,
                                    long long n, long long k) {
  const long long nb = (n + k - 1) / k;
  const long long chunks = rows * n / 8;
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long c0 = (long long)blockIdx.x * blockDim.x + threadIdx.x; c0 < chunks; c0 += stride * U) {
    uint2 w[U];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (c0 + u * stride < chunks) w[u] = *reinterpret_cast<const uint2*>(data + (c0 + u * stride) * 8);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const long long i = (c0 + u * stride) * 8;
      if (i >= chunks * 8) break;
      const long long r = idiv(i, n), c = i - r * n;
      const float s = stored_scale(scale, tensor_scale, scale_kind, (r * nb + idiv(c, k)) * scale_stride);
      T o[8];
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 a = fp8x2_value<F>((unsigned short)(w[u].x >> (16 * j)));
        const float2 b = fp8x2_value<F>((unsigned short)(w[u].y >> (16 * j)));
        o[2 * j] = from_float<T>(a.x * s); o[2 * j + 1] = from_float<T>(a.y * s);
        o[4 + 2 * j] = from_float<T>(b.x * s); o[4 + 2 * j + 1] = from_float<T>(b.y * s);
      }
      store8<T>(out + i, o);
    }
  }
}

// Each thread expands VEC consecutive elements of one block (VEC == 8 needs n % 8 == 0 and
// k % 8 == 0, so the 8 elements share a row and a scale).
template <typename T, class F, int VEC>
__device__ void dequantize_kernel(const unsigned char* __restrict__ data, const void* __restrict__ scale,
                                  const float* __restrict__ tensor_scale, int scale_kind,
                                  long long scale_stride, T* __restrict__ out, long long rows,
                                  long long n, long long k) {
  const long long nb = (n + k - 1) / k;
  const long long row_bytes = F::FP4 ? (n + 1) / 2 : n;
  const long long total = rows * n;
  for (long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * VEC; i < total;
       i += (long long)gridDim.x * blockDim.x * VEC) {
    const long long r = idiv(i, n), c = i - r * n;
    const float s = stored_scale(scale, tensor_scale, scale_kind, (r * nb + idiv(c, k)) * scale_stride);
    float v[VEC];
    if constexpr (VEC == 8 && F::FP4) {
      const unsigned word = *reinterpret_cast<const unsigned*>(data + r * row_bytes + c / 2);
#pragma unroll
      for (int j = 0; j < 8; ++j) v[j] = e2m1_value((word >> (4 * j)) & 15u);
    } else if constexpr (VEC == 8) {
      const uint2 w = *reinterpret_cast<const uint2*>(data + r * row_bytes + c);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float2 a = fp8x2_value<F>((unsigned short)(w.x >> (16 * j)));
        const float2 b = fp8x2_value<F>((unsigned short)(w.y >> (16 * j)));
        v[2 * j] = a.x; v[2 * j + 1] = a.y; v[4 + 2 * j] = b.x; v[4 + 2 * j + 1] = b.y;
      }
    } else if constexpr (F::FP4) {
      const unsigned byte = data[r * row_bytes + c / 2];
      v[0] = e2m1_value((c & 1) ? (byte >> 4) : (byte & 15u));
    } else {
      v[0] = fp8_value<F>(data[r * row_bytes + c]);
    }
    if constexpr (VEC == 8) {
      T o[8];
#pragma unroll
      for (int j = 0; j < 8; ++j) o[j] = from_float<T>(v[j] * s);
      store8<T>(out + i, o);
    } else {
      out[i] = from_float<T>(v[0] * s);
    }
  }
}

}  // namespace

// Entry points: templates compiled on demand by NVRTC through name expressions, e.g.
// "lp_quantize<__nv_bfloat16, lp::E4M3, 8, 16>" (lpdist/kernels/quant.py picks them).
template <typename T, class F, int VEC, int TPB>
__global__ void lp_quantize(const T* x, unsigned char* data, void* scale_out, const float* tensor_amax,
                            const float* given, long long given_stride, long long rows, long long n,
                            long long k, int mode, int stochastic, unsigned seed) {
  quantize_blocks<T, F, VEC, TPB>(x, data, scale_out, tensor_amax, given, given_stride, rows, n, k, mode,
                                  stochastic, seed);
}

template <typename T, class F, int TPB>
__global__ void __launch_bounds__(256, 4) lp_quantize_fp8_fast(const T* x, unsigned char* data, void* scale_out, const float* tensor_amax,
                                     const float* given, long long given_stride, long long rows, long long n,
                                     long long k, int mode) {
  quantize_fp8_fast<T, F, TPB, 4>(x, data, scale_out, tensor_amax, given, given_stride, rows, n, k, mode);
}

template <typename T, bool VEC8>
__global__ void lp_amax(const T* x, long long numel, float* out) { amax_kernel<T, VEC8>(x, numel, out); }

template <typename T, class F, int VEC>
__global__ void lp_dequantize(const unsigned char* data, const void* scale, const float* tensor_scale,
                              int scale_kind, long long scale_stride, T* out, long long rows, long long n,
                              long long k) {
  dequantize_kernel<T, F, VEC>(data, scale, tensor_scale, scale_kind, scale_stride, out, rows, n, k);
}

template <typename T, class F>
__global__ void lp_dequantize_fp8_fast(const unsigned char* data, const void* scale, const float* tensor_scale,
                                       int scale_kind, long long scale_stride, T* out, long long rows,
                                       long long n, long long k) {
  dequantize_fp8_fast<T, F, 4>(data, scale, tensor_scale, scale_kind, scale_stride, out, rows, n, k);
}
