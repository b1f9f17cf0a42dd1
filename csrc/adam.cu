// Fused low-precision AdamW step over a list of parameter tensors (one launch per list).
//
// Twin of the torch reference `lpdist.optim.fused.reference_step`; compiled with --fmad=false so
// that every a*b+c below is two correctly rounded fp32 operations, exactly like the reference,
// and the two are bit-identical (ALGORITHMS.md §0, §2.4, §9.1).
//
// Work split: one warp owns one quantization block of 128*C consecutive elements of one tensor
// (C = 1..8); each lane handles C chunks of 4 consecutive elements with 16-byte (fp32), 8-byte
// (16-bit) or 4-byte (fp8) vector accesses when every pointer involved is aligned. In one pass
// a warp dequantizes the old moments, computes the new ones in fp32 registers, writes the
// parameter, reduces the block amax of |m| and sqrt(v) with warp shuffles, and requantizes the
// moments with fresh block scales. Per step this moves 4+4+4 bytes (param read/write, grad) plus
// 1+1 bytes per fp8 moment and 8 bytes of scales per block.
//
// Tensor table (int64, TABLE_COLS per tensor, built once on the host and cached):
//   0 param read pointer (fp32 master copy when present, else the parameter)
//   1 m codes   2 m block scales (fp32, unused for unscaled formats)
//   3 v codes   4 v block scales
//   5 low-precision parameter written from the master copy (0 when there is no master copy)
//   6 numel     7 index of the tensor's first quantization block in the launch
//   8 tensor index: the high bits of the stochastic-rounding counter (element index below 2^40)
// Gradient pointers change between steps, so they are a separate int64 array.
//
// Moment storage formats: fp32 (v kept as v), bf16 (sqrt(v), unscaled), fp16/e4m3/e5m2 (block
// scaled: scale = amax/fmt_max per block, codes = RNE(x/scale), saturating; sqrt(v) stored).
// sqrt(v) > 0 never rounds to 0: values under the smallest subnormal code become that code, so
// m / (sqrt(v) + eps) cannot blow up on a flushed second moment (ALGORITHMS.md §0).

#include "lp_formats.cuh"

#define FMT_F32 0
#define FMT_BF16 1
#define FMT_F16 2
#define FMT_E4M3 3
#define FMT_E5M2 4
#define TABLE_COLS 9
#define FLT_MIN_NORMAL 1.17549435e-38f

__device__ __forceinline__ int elem_bytes(int fmt) {
    return fmt == FMT_F32 ? 4 : (fmt == FMT_BF16 || fmt == FMT_F16) ? 2 : 1;
}

__device__ __forceinline__ bool is_scaled(int fmt) { return fmt >= FMT_F16; }

__device__ __forceinline__ float fmt_max(int fmt) {
    return fmt == FMT_F16 ? 65504.0f : fmt == FMT_E4M3 ? 448.0f : 57344.0f;
}

// Smallest positive value of the storage format.
__device__ __forceinline__ float fmt_min_subnormal(int fmt) {
    switch (fmt) {
        case FMT_BF16: return __int_as_float(0x00010000);  // 2^-133
        case FMT_F16: return 5.9604644775390625e-08f;      // 2^-24
        case FMT_E4M3: return 0.001953125f;                // 2^-9
        default: return 1.52587890625e-05f;            // 2^-16
    }
}

__device__ __forceinline__ float decode(const void* base, long long i, int fmt) {
    switch (fmt) {
        case FMT_F32: return ((const float*)base)[i];
        case FMT_BF16: return __bfloat162float(((const __nv_bfloat16*)base)[i]);
        case FMT_F16: return __half2float(((const __half*)base)[i]);
        case FMT_E4M3: return lp::fp8_value<lp::E4M3>(((const unsigned char*)base)[i]);
        default: return lp::fp8_value<lp::E5M2>(((const unsigned char*)base)[i]);
    }
}

// Round-to-nearest-even store (saturating for fp8).
__device__ __forceinline__ void encode(void* base, long long i, int fmt, float x) {
    switch (fmt) {
        case FMT_F32: ((float*)base)[i] = x; break;
        case FMT_BF16: ((__nv_bfloat16*)base)[i] = __float2bfloat16_rn(x); break;
        case FMT_F16: ((__half*)base)[i] = __float2half_rn(x); break;
        case FMT_E4M3: ((unsigned char*)base)[i] = lp::fp8_code<lp::E4M3>(x); break;
        default: ((unsigned char*)base)[i] = lp::fp8_code<lp::E5M2>(x); break;
    }
}

// Load 4 consecutive elements starting at i (zeros past n); one vector access when `vec`.
__device__ __forceinline__ void load4(const void* base, long long i, long long n, int fmt, bool vec, float out[4]) {
    if (vec) {
        const int bytes = elem_bytes(fmt);
        if (bytes == 4) {
            float4 r = *(const float4*)((const float*)base + i);
            out[0] = r.x; out[1] = r.y; out[2] = r.z; out[3] = r.w;
            return;
        }
        unsigned int w[2];
        if (bytes == 2) {
            uint2 r = *(const uint2*)((const unsigned short*)base + i);
            w[0] = r.x; w[1] = r.y;
        } else {
            w[0] = *(const unsigned int*)((const unsigned char*)base + i);
            w[1] = 0;
        }
        const void* lanes = (const void*)w;
#pragma unroll
        for (int k = 0; k < 4; k++) out[k] = decode(lanes, k, fmt);
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) out[k] = (i + k < n) ? decode(base, i + k, fmt) : 0.0f;
}

__device__ __forceinline__ void store4(void* base, long long i, long long n, int fmt, bool vec, const float x[4]) {
    if (vec) {
        const int bytes = elem_bytes(fmt);
        if (bytes == 4) {
            *(float4*)((float*)base + i) = make_float4(x[0], x[1], x[2], x[3]);
            return;
        }
        unsigned int w[2] = {0u, 0u};
#pragma unroll
        for (int k = 0; k < 4; k++) encode((void*)w, k, fmt, x[k]);
        if (bytes == 2) *(uint2*)((unsigned short*)base + i) = make_uint2(w[0], w[1]);
        else *(unsigned int*)((unsigned char*)base + i) = w[0];
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++)
        if (i + k < n) encode(base, i + k, fmt, x[k]);
}

__device__ __forceinline__ bool aligned4(long long ptr, int fmt) {
    return ptr % (4 * elem_bytes(fmt)) == 0;
}

// Stochastic rounding of fp32 x to bf16/fp16 (ALGORITHMS.md §1.5): lo = x rounded toward zero,
// hi = the next value away from zero, P(hi) = (|x| - |lo|) / (|hi| - |lo|); u uniform in [0, 1).
__device__ __forceinline__ float round_stochastic(float x, int fmt, float u) {
    unsigned short lo_bits = fmt == FMT_BF16 ? __bfloat16_as_ushort(__float2bfloat16_rz(x)) : __half_as_ushort(__float2half_rz(x));
    unsigned short hi_bits = lo_bits + 1;
    float lo = fmt == FMT_BF16 ? __bfloat162float(__ushort_as_bfloat16(lo_bits)) : __half2float(__ushort_as_half(lo_bits));
    if (lo == x) return x;
    float hi = fmt == FMT_BF16 ? __bfloat162float(__ushort_as_bfloat16(hi_bits)) : __half2float(__ushort_as_half(hi_bits));
    float p = (fabsf(x) - fabsf(lo)) / (fabsf(hi) - fabsf(lo));
    return u < p ? hi : lo;
}

__device__ __forceinline__ float block_scale(float amax, int fmt) {
    float s = amax > 0.0f ? amax / fmt_max(fmt) : 1.0f;
    return fmaxf(s, FLT_MIN_NORMAL);
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
    return x;
}

__device__ __forceinline__ int find_tensor(const long long* table, int n_tensors, long long qblock) {
    int lo = 0, hi = n_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (table[mid * TABLE_COLS + 7] <= qblock) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// PF/MF/VF >= 0 fix the parameter / moment formats at compile time (the hot combinations);
// RUNTIME takes them from the arguments.
#define RUNTIME -1

template <int C, int PF, int MF, int VF>
__device__ __forceinline__ void adamw_block(
    const long long* __restrict__ table, int n_tensors, const long long* __restrict__ grads,
    long long total_blocks, int param_fmt_arg, int m_fmt_arg, int v_fmt_arg,
    float lr_value, const float* lr_ptr, float beta1, float one_minus_beta1, float beta2,
    float one_minus_beta2, float eps, float weight_decay, float bias_correction1,
    float bias_correction2_sqrt, int maximize, unsigned int seed, const int* skip_flag) {
    const int param_fmt = PF == RUNTIME ? param_fmt_arg : PF;
    const int m_fmt = MF == RUNTIME ? m_fmt_arg : MF;
    const int v_fmt = VF == RUNTIME ? v_fmt_arg : VF;
    const int lane = threadIdx.x & 31;
    const long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks || *skip_flag) return;
    const int t = find_tensor(table, n_tensors, qblock);
    const long long* row = table + (long long)t * TABLE_COLS;
    void* param = (void*)row[0];
    void* m_codes = (void*)row[1];
    float* m_scales = (float*)row[2];
    void* v_codes = (void*)row[3];
    float* v_scales = (float*)row[4];
    void* lowp_param = (void*)row[5];
    const void* grad = (const void*)grads[t];
    const long long n = row[6];
    const long long local_block = qblock - row[7];
    const long long start = local_block * (128 * C);
    const bool has_master = lowp_param != 0;
    const int read_fmt = has_master ? FMT_F32 : param_fmt;
    const bool aligned = aligned4(row[0], read_fmt) && aligned4((long long)grad, param_fmt) &&
                         aligned4(row[1], m_fmt) && aligned4(row[3], v_fmt) &&
                         (!has_master || aligned4(row[5], param_fmt));
    const unsigned long long counter = (unsigned long long)row[8] << 40;

    const float lr = lr_ptr ? *lr_ptr : lr_value;
    const float decay = 1.0f - lr * weight_decay;
    const float step_size = lr / bias_correction1;
    const float m_scale = is_scaled(m_fmt) ? m_scales[local_block] : 1.0f;
    const float v_scale = is_scaled(v_fmt) ? v_scales[local_block] : 1.0f;

    float m_new[4 * C], v_stored[4 * C];
    float m_amax = 0.0f, v_amax = 0.0f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long i = start + c * 128 + lane * 4;
        const bool vec = aligned && i + 4 <= n;
        float p[4], g[4], m[4], v[4];
        load4(param, i, n, read_fmt, vec, p);
        load4(grad, i, n, param_fmt, vec, g);
        load4(m_codes, i, n, m_fmt, vec, m);
        load4(v_codes, i, n, v_fmt, vec, v);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const float gk = maximize ? -g[k] : g[k];
            const float m_old = m[k] * m_scale;
            float v_old;
            if (v_fmt == FMT_F32) {
                v_old = v[k];
            } else {
                const float root = v[k] * v_scale;
                v_old = root * root;
            }
            const float mk = beta1 * m_old + one_minus_beta1 * gk;
            const float vk = beta2 * v_old + one_minus_beta2 * (gk * gk);
            const float root = sqrtf(vk);
            const float denom = root / bias_correction2_sqrt + eps;
            p[k] = p[k] * decay - step_size * (mk / denom);
            m_new[c * 4 + k] = mk;
            v_stored[c * 4 + k] = v_fmt == FMT_F32 ? vk : root;
            m_amax = fmaxf(m_amax, fabsf(mk));
            v_amax = fmaxf(v_amax, root);
        }
        if (has_master) {
            store4(param, i, n, FMT_F32, vec, p);
            store4(lowp_param, i, n, param_fmt, vec, p);
        } else {
            if (param_fmt != FMT_F32) {
#pragma unroll
                for (int k = 0; k < 4; k++) p[k] = round_stochastic(p[k], param_fmt, lp::hashed_uniform(counter + i + k, seed));
            }
            store4(param, i, n, param_fmt, vec, p);
        }
    }

    float m_scale_new = 1.0f, v_scale_new = 1.0f;
    if (is_scaled(m_fmt)) m_scale_new = block_scale(warp_max(m_amax), m_fmt);
    if (is_scaled(v_fmt)) v_scale_new = block_scale(warp_max(v_amax), v_fmt);
    const float v_floor = fmt_min_subnormal(v_fmt);
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long i = start + c * 128 + lane * 4;
        const bool vec = aligned && i + 4 <= n;
        float m[4], v[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            m[k] = is_scaled(m_fmt) ? m_new[c * 4 + k] / m_scale_new : m_new[c * 4 + k];
            float y = is_scaled(v_fmt) ? v_stored[c * 4 + k] / v_scale_new : v_stored[c * 4 + k];
            if (v_fmt != FMT_F32 && y > 0.0f && y < v_floor) y = v_floor;
            v[k] = y;
        }
        store4(m_codes, i, n, m_fmt, vec, m);
        store4(v_codes, i, n, v_fmt, vec, v);
    }
    if (lane == 0) {
        if (is_scaled(m_fmt)) m_scales[local_block] = m_scale_new;
        if (is_scaled(v_fmt)) v_scales[local_block] = v_scale_new;
    }
}

#define ADAMW_KERNEL(NAME, C, PF, MF, VF)                                                           \
    extern "C" __global__ void __launch_bounds__(256) NAME(                                          \
        const long long* table, int n_tensors, const long long* grads, long long total_blocks,      \
        int param_fmt, int m_fmt, int v_fmt, float lr_value, const float* lr_ptr, float beta1,       \
        float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float weight_decay,   \
        float bias_correction1, float bias_correction2_sqrt, int maximize, unsigned int seed,        \
        const int* skip_flag) {                                                                      \
        adamw_block<C, PF, MF, VF>(table, n_tensors, grads, total_blocks, param_fmt, m_fmt, v_fmt, \
                                   lr_value, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, \
                                   eps, weight_decay, bias_correction1, bias_correction2_sqrt,      \
                                   maximize, seed, skip_flag);                                      \
    }

// Any formats, quantization block = 128*C.
ADAMW_KERNEL(adamw_c1, 1, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c2, 2, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c3, 3, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c4, 4, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c5, 5, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c6, 6, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c7, 7, RUNTIME, RUNTIME, RUNTIME)
ADAMW_KERNEL(adamw_c8, 8, RUNTIME, RUNTIME, RUNTIME)
// The default moments ("fp8": FMT_E4M3 m, FMT_E5M2 sqrt(v), block 128) on fp32 and bf16 parameters.
ADAMW_KERNEL(adamw_c1_f32_e4m3_e5m2, 1, FMT_F32, FMT_E4M3, FMT_E5M2)
ADAMW_KERNEL(adamw_c1_bf16_e4m3_e5m2, 1, FMT_BF16, FMT_E4M3, FMT_E5M2)

// Sets *flag = 1 if any gradient element of the listed tensors is NaN or +-inf. Same table and
// block split as the step kernel (one warp per `block` elements), reading only the gradients.
extern "C" __global__ void __launch_bounds__(256) grads_nonfinite(
    const long long* table, int n_tensors, const long long* grads, long long total_blocks, int block,
    int grad_fmt, int* flag) {
    const int lane = threadIdx.x & 31;
    const long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks) return;
    const int t = find_tensor(table, n_tensors, qblock);
    const long long* row = table + (long long)t * TABLE_COLS;
    const void* grad = (const void*)grads[t];
    const long long n = row[6];
    const long long start = (qblock - row[7]) * block;
    const bool aligned = aligned4((long long)grad, grad_fmt);
    bool bad = false;
    for (int c = 0; c < block / 128; c++) {
        const long long i = start + c * 128 + lane * 4;
        float g[4];
        load4(grad, i, n, grad_fmt, aligned && i + 4 <= n, g);
#pragma unroll
        for (int k = 0; k < 4; k++) bad |= !isfinite(g[k]);
    }
    if (bad) *flag = 1;
}
