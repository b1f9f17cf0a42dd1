// Element formats and rounding shared by lpdist's CUDA kernels.
//
// The arithmetic mirrors lpdist/quant/formats.py operation for operation, so that
// round-to-nearest results are bit-identical to the torch oracle:
//   spacing(v) = 2^(max(floor(log2|v|), emin) - M)
//   RNE:        rint(v / spacing) * spacing        (ties to even)
//   stochastic: floor(v / spacing + u) * spacing  (u ~ U[0,1), unbiased)
// with v clamped to +-max first (saturation) and NaN passed through.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

namespace lp {

struct E4M3 { static constexpr int M = 3; static constexpr int EMIN = -6;  static constexpr int EMAX = 8;  static constexpr bool FP4 = false; };
struct E5M2 { static constexpr int M = 2; static constexpr int EMIN = -14; static constexpr int EMAX = 15; static constexpr bool FP4 = false; };
struct E2M1 { static constexpr int M = 1; static constexpr int EMIN = 0;   static constexpr int EMAX = 2;  static constexpr bool FP4 = true; };

template <class F> __device__ __forceinline__ float fmt_max();
template <> __device__ __forceinline__ float fmt_max<E4M3>() { return 448.0f; }
template <> __device__ __forceinline__ float fmt_max<E5M2>() { return 57344.0f; }
template <> __device__ __forceinline__ float fmt_max<E2M1>() { return 6.0f; }

// Smallest block scale, 2^-126 (the smallest normal float32): a block whose amax is tiny never gets
// a subnormal or zero scale, whose reciprocal could be infinite (oracle: lpdist.quant.scaling.MIN_SCALE).
constexpr float MIN_SCALE = 1.17549435e-38f;

// Scale of a block: max(amax / divisor, MIN_SCALE), 1 for an all-zero block, +inf for amax = +inf
// (oracle: lpdist.quant.scaling.float_scale).
__device__ __forceinline__ float float_scale(float amax, float divisor) {
  return amax > 0.0f ? fmaxf(amax / divisor, MIN_SCALE) : 1.0f;
}

__device__ __forceinline__ int floor_log2(float v) { return ((__float_as_int(v) >> 23) & 0xFF) - 127; }
__device__ __forceinline__ float pow2i(int e) { return __int_as_float((e + 127) << 23); }
__device__ __forceinline__ bool is_nan(float v) { return v != v; }

// Round an already-scaled value onto F's grid. u < 0 selects round-to-nearest-even.
template <class F>
__device__ __forceinline__ float round_to_format(float v, float u) {
  const float mx = fmt_max<F>();
  if (!is_nan(v)) v = fminf(fmaxf(v, -mx), mx);
  const int e = max(floor_log2(v), F::EMIN);
  const float t = v * pow2i(F::M - e);
  const float r = (u < 0.0f) ? rintf(t) : floorf(t + u);
  return r * pow2i(e - F::M);
}

// 4-bit E2M1 code of a value already on the grid (sign in bit 3); NaN -> 0.
__device__ __forceinline__ unsigned e2m1_code(float q) {
  if (is_nan(q)) return 0u;
  const float m = fabsf(q);
  const float idx = m < 2.0f ? m * 2.0f : (m < 4.0f ? m + 2.0f : m * 0.5f + 4.0f);
  return (signbit(q) ? 8u : 0u) | (unsigned)idx;
}

__device__ __forceinline__ float e2m1_value(unsigned code) {
  const unsigned i = code & 7u;  // magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6
  const float m = i < 4u ? 0.5f * (float)i : (i == 7u ? 6.0f : (float)i - 2.0f);
  return (code & 8u) ? -m : m;
}

template <class F> __device__ __forceinline__ unsigned char fp8_code(float q);
template <> __device__ __forceinline__ unsigned char fp8_code<E4M3>(float q) {
  return (unsigned char)__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E4M3);
}
template <> __device__ __forceinline__ unsigned char fp8_code<E5M2>(float q) {
  return (unsigned char)__nv_cvt_float_to_fp8(q, __NV_SATFINITE, __NV_E5M2);
}

template <class F> __device__ __forceinline__ __nv_fp8_interpretation_t fp8_kind();
template <> __device__ __forceinline__ __nv_fp8_interpretation_t fp8_kind<E4M3>() { return __NV_E4M3; }
template <> __device__ __forceinline__ __nv_fp8_interpretation_t fp8_kind<E5M2>() { return __NV_E5M2; }

// Two values to two FP8 codes (RNE, saturating to +-max; first value in the low byte).
template <class F>
__device__ __forceinline__ unsigned short fp8x2_code(float a, float b) {
  return (unsigned short)__nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, fp8_kind<F>());
}

// v * inv, clamped to +-limit when CLAMP (as lpdist.comm's codec does before rounding: limit is
// fmt_max, or the shared-scale target). The clamp maps NaN to -limit (fmaxf(NaN, -limit) = -limit);
// a NaN there only occurs in a block whose scale is NaN or inf, which the receiver decodes as
// non-finite from the scale.
template <bool CLAMP>
__device__ __forceinline__ float scale_value(float v, float inv, float limit) {
  const float q = v * inv;
  return CLAMP ? fminf(fmaxf(q, -limit), limit) : q;
}

// Eight values times `inv` to eight FP8 codes (RNE, saturating at +-fmt_max; clamped to +-limit
// first when CLAMP; value j in byte j of the result).
template <class F, bool CLAMP = false>
__device__ __forceinline__ uint2 fp8x8_code(const float* v, float inv, float limit = fmt_max<F>()) {
  unsigned w[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const unsigned lo = fp8x2_code<F>(scale_value<CLAMP>(v[4 * h], inv, limit), scale_value<CLAMP>(v[4 * h + 1], inv, limit));
    const unsigned hi = fp8x2_code<F>(scale_value<CLAMP>(v[4 * h + 2], inv, limit), scale_value<CLAMP>(v[4 * h + 3], inv, limit));
    w[h] = lo | (hi << 16);
  }
  return make_uint2(w[0], w[1]);
}

// Two FP8 codes (low byte first) to floats, through the exact FP8 -> half conversion.
template <class F>
__device__ __forceinline__ float2 fp8x2_value(unsigned short codes) {
  const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)codes, fp8_kind<F>());
  return __half22float2(__half2(h));
}

template <class F> __device__ __forceinline__ float fp8_value(unsigned char c);
template <> __device__ __forceinline__ float fp8_value<E4M3>(unsigned char c) {
  __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, __NV_E4M3);
  return __half2float(__half(h));
}
template <> __device__ __forceinline__ float fp8_value<E5M2>(unsigned char c) {
  __half_raw h = __nv_cvt_fp8_to_halfraw((__nv_fp8_storage_t)c, __NV_E5M2);
  return __half2float(__half(h));
}

// Loads and stores of the three input/output dtypes.
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Integer hash (lowbias32). Torch twins compute the same 32-bit arithmetic
// (lpdist/quant/noise.py), so stochastic rounding can be reproduced bit for bit.
__device__ __forceinline__ unsigned mix32(unsigned x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

// Uniform in [0, 1) with 24 random bits for element `idx` of a call seeded with `seed`.
__device__ __forceinline__ float hashed_uniform(unsigned long long idx, unsigned seed) {
  const unsigned h = mix32((unsigned)idx ^ mix32((unsigned)(idx >> 32) ^ mix32(seed)));
  return (float)(h >> 8) * (1.0f / 16777216.0f);
}

// a / b for non-negative indices, in 32-bit arithmetic when both fit (far cheaper on the GPU).
__device__ __forceinline__ long long idiv(long long a, long long b) {
  return (a | b) < 0x7fffffffll ? (long long)((unsigned)a / (unsigned)b) : a / b;
}

// |v| if finite, else 0: the amax ignores NaN and +-inf (they are handled element-wise).
__device__ __forceinline__ float finite_abs(float v) {
  const float a = fabsf(v);
  return (a <= 3.402823466e38f) ? a : 0.0f;
}

// 8 elements as loaded from memory (16 bytes for 16-bit types, 32 for fp32), unpacked late so
// that several loads in flight per thread cost few registers.
template <typename T> struct Raw8 { uint4 a; };
template <> struct Raw8<float> { float4 a, b; };

template <typename T>
__device__ __forceinline__ void unpack8(const Raw8<T>& raw, float* v) {
  const T* e = reinterpret_cast<const T*>(&raw.a);
#pragma unroll
  for (int j = 0; j < 8; ++j) v[j] = to_float(e[j]);
}
template <>
__device__ __forceinline__ void unpack8<float>(const Raw8<float>& raw, float* v) {
  v[0] = raw.a.x; v[1] = raw.a.y; v[2] = raw.a.z; v[3] = raw.a.w;
  v[4] = raw.b.x; v[5] = raw.b.y; v[6] = raw.b.z; v[7] = raw.b.w;
}

// Max and any-of over a group of TPB consecutive lanes (TPB a power of two <= 32); every lane
// of the warp must take part (full-warp shuffles).
template <int TPB>
__device__ __forceinline__ float group_max(float v) {
#pragma unroll
  for (int o = TPB / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o, TPB));
  return v;
}

template <int TPB>
__device__ __forceinline__ bool group_any(bool b) {
  int any = b;  // no `||`: its short circuit would take a lane past a full-warp shuffle
#pragma unroll
  for (int o = TPB / 2; o > 0; o >>= 1) any |= __shfl_xor_sync(0xffffffffu, any, o, TPB);
  return any != 0;
}

}  // namespace lp
