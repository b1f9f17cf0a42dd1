// Fused low-precision AdamW step over a list of parameter tensors (one launch per list).
//
// Twin of the torch reference `lpdist.optim.fused.reference_step`; compiled with --fmad=false so
// that every a*b+c below is two correctly rounded fp32 operations, exactly like the reference,
// and the two are bit-identical (ALGORITHMS.md §0, §2.4, §9.1).
//
// Work split: one warp owns one quantization block of 128*C consecutive elements of one tensor
// at a time (C = 1..8); each lane handles C chunks of 4 consecutive elements with 16-byte (fp32),
// 8-byte (16-bit) or 4-byte (fp8) vector accesses when every pointer involved is aligned. The
// general kernels launch one warp per block; the specialised fp8-moment kernels (block 128) are
// persistent (adamw_persistent: grid-stride loop per warp, two-stage load pipeline). In one pass
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

// Raw bits of element i (zero-extended).
__device__ __forceinline__ unsigned int load_bits(const void* base, long long i, int fmt) {
    const int bytes = elem_bytes(fmt);
    if (bytes == 4) return ((const unsigned int*)base)[i];
    if (bytes == 2) return ((const unsigned short*)base)[i];
    return ((const unsigned char*)base)[i];
}

// Value of one element from its raw bits (the low elem_bytes(fmt) bytes of `bits`).
__device__ __forceinline__ float decode_bits(unsigned int bits, int fmt) {
    switch (fmt) {
        case FMT_F32: return __uint_as_float(bits);
        case FMT_BF16: return __bfloat162float(__ushort_as_bfloat16((unsigned short)bits));
        case FMT_F16: return __half2float(__ushort_as_half((unsigned short)bits));
        case FMT_E4M3: return lp::fp8_value<lp::E4M3>((unsigned char)bits);
        default: return lp::fp8_value<lp::E5M2>((unsigned char)bits);
    }
}

// Raw bits of 4 consecutive elements starting at i, packed little-endian into w (element k of a
// 4-byte format in w[k], of a 2-byte format in half k&1 of w[k>>1], of fp8 in byte k of w[0]);
// zeros past n (zero bits decode to 0 in every format). One vector access when `vec`.
__device__ __forceinline__ void load_raw4(const void* base, long long i, long long n, int fmt, bool vec, unsigned int w[4]) {
    const int bytes = elem_bytes(fmt);
    if (vec) {
        if (bytes == 4) {
            const uint4 r = *(const uint4*)((const unsigned int*)base + i);
            w[0] = r.x; w[1] = r.y; w[2] = r.z; w[3] = r.w;
        } else if (bytes == 2) {
            const uint2 r = *(const uint2*)((const unsigned short*)base + i);
            w[0] = r.x; w[1] = r.y; w[2] = 0u; w[3] = 0u;
        } else {
            w[0] = *(const unsigned int*)((const unsigned char*)base + i);
            w[1] = 0u; w[2] = 0u; w[3] = 0u;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) w[k] = 0u;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        if (i + k >= n) continue;
        const unsigned int bits = load_bits(base, i + k, fmt);
        if (bytes == 4) w[k] = bits;
        else if (bytes == 2) w[k >> 1] |= bits << (16 * (k & 1));
        else w[0] |= bits << (8 * k);
    }
}

// Values of the 4 elements packed by load_raw4.
__device__ __forceinline__ void decode_raw4(const unsigned int w[4], int fmt, float out[4]) {
    const int bytes = elem_bytes(fmt);
#pragma unroll
    for (int k = 0; k < 4; k++)
        out[k] = decode_bits(bytes == 4 ? w[k] : bytes == 2 ? w[k >> 1] >> (16 * (k & 1)) : w[0] >> (8 * k), fmt);
}

// Load 4 consecutive elements starting at i (zeros past n); one vector access when `vec`.
__device__ __forceinline__ void load4(const void* base, long long i, long long n, int fmt, bool vec, float out[4]) {
    if (vec) {
        unsigned int w[4];
        load_raw4(base, i, n, fmt, true, w);
        decode_raw4(w, fmt, out);
        return;
    }
#pragma unroll
    for (int k = 0; k < 4; k++) out[k] = (i + k < n) ? decode_bits(load_bits(base, i + k, fmt), fmt) : 0.0f;
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

// Index of the tensor owning qblock: the last t in [lo, n_tensors) whose first block is <= qblock.
__device__ __forceinline__ int find_tensor(const long long* table, int lo, int n_tensors, long long qblock) {
    int hi = n_tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (table[mid * TABLE_COLS + 7] <= qblock) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Per-step scalars shared by every element.
struct StepScalars {
    float decay, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2_sqrt;
    int maximize;
};

__device__ __forceinline__ StepScalars step_scalars(
    float lr_value, const float* lr_ptr, float beta1, float one_minus_beta1, float beta2,
    float one_minus_beta2, float eps, float weight_decay, float bias_correction1,
    float bias_correction2_sqrt, int maximize) {
    const float lr = lr_ptr ? *lr_ptr : lr_value;
    StepScalars s;
    s.decay = 1.0f - lr * weight_decay;
    s.step_size = lr / bias_correction1;
    s.beta1 = beta1;
    s.one_minus_beta1 = one_minus_beta1;
    s.beta2 = beta2;
    s.one_minus_beta2 = one_minus_beta2;
    s.eps = eps;
    s.bias_correction2_sqrt = bias_correction2_sqrt;
    s.maximize = maximize;
    return s;
}

// One tensor's table row (plus its gradient pointer and the end of its block range).
struct TensorRow {
    void* param;
    void* m_codes;
    float* m_scales;
    void* v_codes;
    float* v_scales;
    void* lowp_param;
    const void* grad;
    long long n, first_block, end_block;
    unsigned long long counter;
    bool has_master, aligned;
};

__device__ __forceinline__ TensorRow load_row(const long long* table, int n_tensors, const long long* grads,
                                              long long total_blocks, int t, int param_fmt, int m_fmt, int v_fmt) {
    const long long* row = table + (long long)t * TABLE_COLS;
    TensorRow r;
    r.param = (void*)row[0];
    r.m_codes = (void*)row[1];
    r.m_scales = (float*)row[2];
    r.v_codes = (void*)row[3];
    r.v_scales = (float*)row[4];
    r.lowp_param = (void*)row[5];
    r.grad = (const void*)grads[t];
    r.n = row[6];
    r.first_block = row[7];
    r.end_block = t + 1 < n_tensors ? row[TABLE_COLS + 7] : total_blocks;
    r.counter = (unsigned long long)row[8] << 40;
    r.has_master = row[5] != 0;
    const int read_fmt = r.has_master ? FMT_F32 : param_fmt;
    r.aligned = aligned4(row[0], read_fmt) && aligned4((long long)r.grad, param_fmt) &&
                aligned4(row[1], m_fmt) && aligned4(row[3], v_fmt) &&
                (!r.has_master || aligned4(row[5], param_fmt));
    return r;
}

// AdamW on 4 elements (the exact operation order of reference_step): p is updated in place,
// the new m and the stored second moment (v, or sqrt(v) for reduced formats) are written to
// m_new / v_stored, and the block amax of |m| and of the stored second moment are accumulated.
__device__ __forceinline__ void adam_update4(const StepScalars& s, int v_fmt, float m_scale, float v_scale,
                                             float p[4], const float g[4], const float m[4], const float v[4],
                                             float m_new[4], float v_stored[4], float& m_amax, float& v_amax) {
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float gk = s.maximize ? -g[k] : g[k];
        const float m_old = m[k] * m_scale;
        float v_old;
        if (v_fmt == FMT_F32) {
            v_old = v[k];
        } else {
            const float root = v[k] * v_scale;
            v_old = root * root;
        }
        const float mk = s.beta1 * m_old + s.one_minus_beta1 * gk;
        const float vk = s.beta2 * v_old + s.one_minus_beta2 * (gk * gk);
        const float root = sqrtf(vk);
        const float denom = root / s.bias_correction2_sqrt + s.eps;
        p[k] = p[k] * s.decay - s.step_size * (mk / denom);
        m_new[k] = mk;
        v_stored[k] = v_fmt == FMT_F32 ? vk : root;
        m_amax = fmaxf(m_amax, fabsf(mk));
        v_amax = fmaxf(v_amax, root);
    }
}

// Writes 4 updated parameters: fp32 master + round-to-nearest low-precision image, or the
// parameter itself (stochastic rounding for bf16/fp16).
template <class Row>
__device__ __forceinline__ void write_param4(const Row& r, long long i, int param_fmt, bool vec,
                                             unsigned int seed, float p[4]) {
    if (r.has_master) {
        store4(r.param, i, r.n, FMT_F32, vec, p);
        store4(r.lowp_param, i, r.n, param_fmt, vec, p);
    } else {
        if (param_fmt != FMT_F32) {
#pragma unroll
            for (int k = 0; k < 4; k++) p[k] = round_stochastic(p[k], param_fmt, lp::hashed_uniform(r.counter + i + k, seed));
        }
        store4(r.param, i, r.n, param_fmt, vec, p);
    }
}

// Requantizes 4 new moments with the block's fresh scales (sqrt(v) floored at the smallest
// positive code) and stores them.
template <class Row>
__device__ __forceinline__ void write_moments4(const Row& r, long long i, int m_fmt, int v_fmt, bool vec,
                                               float m_scale_new, float v_scale_new,
                                               const float m_new[4], const float v_stored[4]) {
    const float v_floor = fmt_min_subnormal(v_fmt);
    float m[4], v[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        m[k] = is_scaled(m_fmt) ? m_new[k] / m_scale_new : m_new[k];
        float y = is_scaled(v_fmt) ? v_stored[k] / v_scale_new : v_stored[k];
        if (v_fmt != FMT_F32 && y > 0.0f && y < v_floor) y = v_floor;
        v[k] = y;
    }
    store4(r.m_codes, i, r.n, m_fmt, vec, m);
    store4(r.v_codes, i, r.n, v_fmt, vec, v);
}

// Fresh block scales from the lanes' partial amaxes (1 for unscaled formats).
__device__ __forceinline__ void new_block_scales(int m_fmt, int v_fmt, float m_amax, float v_amax,
                                                 float& m_scale_new, float& v_scale_new) {
    m_scale_new = is_scaled(m_fmt) ? block_scale(warp_max(m_amax), m_fmt) : 1.0f;
    v_scale_new = is_scaled(v_fmt) ? block_scale(warp_max(v_amax), v_fmt) : 1.0f;
}

template <class Row>
__device__ __forceinline__ void store_block_scales(const Row& r, long long local_block, int lane, int m_fmt,
                                                   int v_fmt, float m_scale_new, float v_scale_new) {
    if (lane == 0) {
        if (is_scaled(m_fmt)) r.m_scales[local_block] = m_scale_new;
        if (is_scaled(v_fmt)) r.v_scales[local_block] = v_scale_new;
    }
}

// PF/MF/VF >= 0 fix the parameter / moment formats at compile time (the hot combinations);
// RUNTIME takes them from the arguments.
#define RUNTIME -1

// One warp per quantization block of 128*C elements (any formats).
template <int C, int PF, int MF, int VF>
__device__ __forceinline__ void adamw_block(
    const long long* __restrict__ table, int n_tensors, const long long* __restrict__ grads,
    long long total_blocks, int param_fmt_arg, int m_fmt_arg, int v_fmt_arg, const StepScalars& s,
    unsigned int seed, const int* skip_flag) {
    const int param_fmt = PF == RUNTIME ? param_fmt_arg : PF;
    const int m_fmt = MF == RUNTIME ? m_fmt_arg : MF;
    const int v_fmt = VF == RUNTIME ? v_fmt_arg : VF;
    const int lane = threadIdx.x & 31;
    const long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks || *skip_flag) return;
    const TensorRow r = load_row(table, n_tensors, grads, total_blocks, find_tensor(table, 0, n_tensors, qblock),
                                 param_fmt, m_fmt, v_fmt);
    const long long local_block = qblock - r.first_block;
    const long long start = local_block * (128 * C);
    const int read_fmt = r.has_master ? FMT_F32 : param_fmt;
    const float m_scale = is_scaled(m_fmt) ? r.m_scales[local_block] : 1.0f;
    const float v_scale = is_scaled(v_fmt) ? r.v_scales[local_block] : 1.0f;

    float m_new[4 * C], v_stored[4 * C];
    float m_amax = 0.0f, v_amax = 0.0f;
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long i = start + c * 128 + lane * 4;
        const bool vec = r.aligned && i + 4 <= r.n;
        float p[4], g[4], m[4], v[4];
        load4(r.param, i, r.n, read_fmt, vec, p);
        load4(r.grad, i, r.n, param_fmt, vec, g);
        load4(r.m_codes, i, r.n, m_fmt, vec, m);
        load4(r.v_codes, i, r.n, v_fmt, vec, v);
        adam_update4(s, v_fmt, m_scale, v_scale, p, g, m, v, m_new + c * 4, v_stored + c * 4, m_amax, v_amax);
        write_param4(r, i, param_fmt, vec, seed, p);
    }
    float m_scale_new, v_scale_new;
    new_block_scales(m_fmt, v_fmt, m_amax, v_amax, m_scale_new, v_scale_new);
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long i = start + c * 128 + lane * 4;
        write_moments4(r, i, m_fmt, v_fmt, r.aligned && i + 4 <= r.n, m_scale_new, v_scale_new,
                       m_new + c * 4, v_stored + c * 4);
    }
    store_block_scales(r, local_block, lane, m_fmt, v_fmt, m_scale_new, v_scale_new);
}

// The inputs of one lane's 4 elements of a block of 128, as loaded (raw bits, decoded later so
// that the loads of the next block are in flight while this one is computed).
struct RawBlock {
    unsigned int p[4], g[4], m[4], v[4];
    float m_scale, v_scale;
};

template <int PF, int MF, int VF, class Row>
__device__ __forceinline__ void load_block128(const Row& r, long long local_block, int lane, RawBlock& b) {
    const long long i = local_block * 128 + lane * 4;
    const bool vec = r.aligned && i + 4 <= r.n;
    load_raw4(r.param, i, r.n, r.has_master ? FMT_F32 : PF, vec, b.p);
    load_raw4(r.grad, i, r.n, PF, vec, b.g);
    load_raw4(r.m_codes, i, r.n, MF, vec, b.m);
    load_raw4(r.v_codes, i, r.n, VF, vec, b.v);
    b.m_scale = is_scaled(MF) ? r.m_scales[local_block] : 1.0f;
    b.v_scale = is_scaled(VF) ? r.v_scales[local_block] : 1.0f;
}

template <int PF, int MF, int VF, class Row>
__device__ __forceinline__ void finish_block128(const Row& r, long long local_block, int lane,
                                                const RawBlock& b, const StepScalars& s, unsigned int seed) {
    const long long i = local_block * 128 + lane * 4;
    const bool vec = r.aligned && i + 4 <= r.n;
    float p[4], g[4], m[4], v[4], m_new[4], v_stored[4];
    decode_raw4(b.p, r.has_master ? FMT_F32 : PF, p);
    decode_raw4(b.g, PF, g);
    decode_raw4(b.m, MF, m);
    decode_raw4(b.v, VF, v);
    float m_amax = 0.0f, v_amax = 0.0f;
    adam_update4(s, VF, b.m_scale, b.v_scale, p, g, m, v, m_new, v_stored, m_amax, v_amax);
    write_param4(r, i, PF, vec, seed, p);
    float m_scale_new, v_scale_new;
    new_block_scales(MF, VF, m_amax, v_amax, m_scale_new, v_scale_new);
    write_moments4(r, i, MF, VF, vec, m_scale_new, v_scale_new, m_new, v_stored);
    store_block_scales(r, local_block, lane, MF, VF, m_scale_new, v_scale_new);
}

// Threads per CTA of every step kernel (one warp per quantization block at a time).
#define STEP_THREADS 256

// Copies a row into a warp's shared-memory slot.
__device__ __forceinline__ void store_row(volatile TensorRow& dst, const TensorRow& src) {
    dst.param = src.param;
    dst.m_codes = src.m_codes;
    dst.m_scales = src.m_scales;
    dst.v_codes = src.v_codes;
    dst.v_scales = src.v_scales;
    dst.lowp_param = src.lowp_param;
    dst.grad = src.grad;
    dst.n = src.n;
    dst.first_block = src.first_block;
    dst.end_block = src.end_block;
    dst.counter = src.counter;
    dst.has_master = src.has_master;
    dst.aligned = src.aligned;
}

// Persistent variant for the hot formats, quantization block 128: the grid is sized to the
// resident CTAs (PERSISTENT_CTAS_PER_SM per SM) and every warp walks the launch's blocks with a
// grid stride. The tensor row is fetched once per tensor the warp visits and kept in the warp's
// shared-memory slot (read at each use, volatile, so that it does not occupy registers), the
// skip flag and the step scalars are read once per warp, and the next block's inputs are loaded
// before the current block is reduced and requantized (a two-stage pipeline within each tensor).
// Per element the arithmetic is adam_update4's, so the result equals adamw_block's bit for bit.
template <int PF, int MF, int VF>
__device__ __forceinline__ void adamw_persistent(
    const long long* __restrict__ table, int n_tensors, const long long* __restrict__ grads,
    long long total_blocks, const StepScalars& s, unsigned int seed, const int* skip_flag) {
    __shared__ TensorRow rows[STEP_THREADS / 32];
    volatile TensorRow& row = rows[threadIdx.x >> 5];
    const int lane = threadIdx.x & 31;
    const long long stride = (long long)gridDim.x * (blockDim.x >> 5);
    long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks || *skip_flag) return;
    int t = 0;
    while (qblock < total_blocks) {
        t = find_tensor(table, t, n_tensors, qblock);
        const TensorRow fresh = load_row(table, n_tensors, grads, total_blocks, t, PF, MF, VF);
        const long long first_block = fresh.first_block, end_block = fresh.end_block;
        __syncwarp();  // every lane is done with the previous tensor's row
        store_row(row, fresh);
        RawBlock current, next;
        load_block128<PF, MF, VF>(row, qblock - first_block, lane, current);
        for (;;) {
            const long long following = qblock + stride;
            const bool same_tensor = following < end_block;
            if (same_tensor) load_block128<PF, MF, VF>(row, following - first_block, lane, next);
            finish_block128<PF, MF, VF>(row, qblock - first_block, lane, current, s, seed);
            qblock = following;
            if (!same_tensor) break;
            current = next;
        }
    }
}

#define ADAMW_ARGS                                                                                  \
    const long long *table, int n_tensors, const long long *grads, long long total_blocks,          \
        int param_fmt, int m_fmt, int v_fmt, float lr_value, const float *lr_ptr, float beta1,      \
        float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float weight_decay,   \
        float bias_correction1, float bias_correction2_sqrt, int maximize, unsigned int seed,       \
        const int *skip_flag
#define STEP_SCALARS                                                                                \
    step_scalars(lr_value, lr_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, \
                 bias_correction1, bias_correction2_sqrt, maximize)

#define ADAMW_KERNEL(NAME, C)                                                                       \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS) NAME(ADAMW_ARGS) {                   \
        adamw_block<C, RUNTIME, RUNTIME, RUNTIME>(table, n_tensors, grads, total_blocks, param_fmt, \
                                                  m_fmt, v_fmt, STEP_SCALARS, seed, skip_flag);     \
    }

// Resident CTAs of STEP_THREADS threads per SM for the persistent kernels: caps them at 64 registers.
#define PERSISTENT_CTAS_PER_SM 4
#define ADAMW_PERSISTENT_KERNEL(NAME, PF, MF, VF)                                                   \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, PERSISTENT_CTAS_PER_SM) NAME(ADAMW_ARGS) { \
        adamw_persistent<PF, MF, VF>(table, n_tensors, grads, total_blocks, STEP_SCALARS, seed,     \
                                     skip_flag);                                                    \
    }

// Any formats, quantization block = 128*C.
ADAMW_KERNEL(adamw_c1, 1)
ADAMW_KERNEL(adamw_c2, 2)
ADAMW_KERNEL(adamw_c3, 3)
ADAMW_KERNEL(adamw_c4, 4)
ADAMW_KERNEL(adamw_c5, 5)
ADAMW_KERNEL(adamw_c6, 6)
ADAMW_KERNEL(adamw_c7, 7)
ADAMW_KERNEL(adamw_c8, 8)
// The default moments ("fp8": FMT_E4M3 m, FMT_E5M2 sqrt(v), block 128) on fp32 and bf16
// parameters (persistent grid).
ADAMW_PERSISTENT_KERNEL(adamw_c1_f32_e4m3_e5m2, FMT_F32, FMT_E4M3, FMT_E5M2)
ADAMW_PERSISTENT_KERNEL(adamw_c1_bf16_e4m3_e5m2, FMT_BF16, FMT_E4M3, FMT_E5M2)

// Sets *flag = 1 if any gradient element of the listed tensors is NaN or +-inf. Same table and
// block split as the step kernel (one warp per `block` elements), reading only the gradients.
extern "C" __global__ void __launch_bounds__(256) grads_nonfinite(
    const long long* table, int n_tensors, const long long* grads, long long total_blocks, int block,
    int grad_fmt, int* flag) {
    const int lane = threadIdx.x & 31;
    const long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks) return;
    const int t = find_tensor(table, 0, n_tensors, qblock);
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
