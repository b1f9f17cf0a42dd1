// Fused low-precision AdamW step over a list of parameter tensors (one launch per list).
//
// Twin of the torch reference `lpdist.optim.fused.reference_step`; compiled with --fmad=false so
// that every a*b+c below is two correctly rounded fp32 operations, exactly like the reference,
// and the two are bit-identical (ALGORITHMS.md §0, §2.4, §9.1).
//
// Two work splits share the per-element arithmetic (adam_element):
// * General kernels (adamw_c1..c8, any formats, quantization block 128*C): one warp per block,
//   each lane handles C chunks of 4 consecutive elements with 16-byte (fp32), 8-byte (16-bit) or
//   4-byte (fp8) vector accesses when every pointer involved is aligned.
// * Hot kernels (adamw_hot: block 128, fp32 or bf16 parameters, the "fp8" moments = E4M3 m and
//   E5M2 sqrt(v), or "bf16" / "fp16" moments): persistent, a half-warp per block, 8 consecutive
//   elements per lane (see below).
// In one pass a warp dequantizes the old moments, computes the new ones in fp32 registers, writes
// the parameter, reduces the block amax of |m| and sqrt(v) with shuffles, and requantizes the
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
// scaled: scale = amax/fmt_max per block, codes = RNE(x * (1/scale)), saturating, with 1/scale
// rounded to fp32 once per block; sqrt(v) stored).
// sqrt(v) > 0 never rounds to 0: values under the smallest subnormal code become that code, so
// m / (sqrt(v) + eps) cannot blow up on a flushed second moment (ALGORITHMS.md §0).

#include "lp_formats.cuh"

#define FMT_F32 0
#define FMT_BF16 1
#define FMT_F16 2
#define FMT_E4M3 3
#define FMT_E5M2 4
#define TABLE_COLS 9

__host__ __device__ constexpr int elem_bytes(int fmt) {
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

// Round-to-nearest-even bits of x in `fmt` (saturating for fp8), zero-extended.
__device__ __forceinline__ unsigned int code_bits(float x, int fmt) {
    switch (fmt) {
        case FMT_F32: return __float_as_uint(x);
        case FMT_BF16: return __bfloat16_as_ushort(__float2bfloat16_rn(x));
        case FMT_F16: return __half_as_ushort(__float2half_rn(x));
        case FMT_E4M3: return lp::fp8_code<lp::E4M3>(x);
        default: return lp::fp8_code<lp::E5M2>(x);
    }
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

// Elements of [i, i + N) below n (0..N).
template <int N>
__device__ __forceinline__ int valid_count(long long i, long long n) {
    return (int)min(max(n - i, 0ll), (long long)N);
}

// Raw bits of the N consecutive elements of BYTES bytes starting at i, packed little-endian into
// 32-bit words (element k in bytes [k*BYTES, (k+1)*BYTES) of w; (N*BYTES+3)/4 words); zeros for
// elements k >= valid (zero bits decode to 0 in every format). One vector access when `vec`
// (then valid == N and the address is aligned to N*BYTES, at most 16 bytes per access).
template <int N, int BYTES>
__device__ __forceinline__ void load_elems(const void* base, long long i, int valid, bool vec, unsigned int* w) {
    constexpr int WORDS = (N * BYTES + 3) / 4;
    const unsigned char* src = (const unsigned char*)base + i * BYTES;
    if (vec) {
        if (WORDS == 1) {
            w[0] = *(const unsigned int*)src;
        } else if (WORDS == 2) {
            const uint2 r = *(const uint2*)src;
            w[0] = r.x; w[1] = r.y;
        } else {
#pragma unroll
            for (int c = 0; c < WORDS / 4; c++) {
                const uint4 r = ((const uint4*)src)[c];
                w[4 * c] = r.x; w[4 * c + 1] = r.y; w[4 * c + 2] = r.z; w[4 * c + 3] = r.w;
            }
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < WORDS; k++) w[k] = 0u;
#pragma unroll
    for (int k = 0; k < N; k++) {
        if (k >= valid) break;
        const unsigned int bits = BYTES == 4 ? ((const unsigned int*)src)[k]
                                : BYTES == 2 ? ((const unsigned short*)src)[k] : src[k];
        w[k * BYTES / 4] |= bits << (8 * ((k * BYTES) % 4));
    }
}

// Stores the first `valid` of N elements packed as load_elems packs them; one vector access when `vec`.
template <int N, int BYTES>
__device__ __forceinline__ void store_elems(void* base, long long i, int valid, bool vec, const unsigned int* w) {
    constexpr int WORDS = (N * BYTES + 3) / 4;
    unsigned char* dst = (unsigned char*)base + i * BYTES;
    if (vec) {
        if (WORDS == 1) {
            *(unsigned int*)dst = w[0];
        } else if (WORDS == 2) {
            *(uint2*)dst = make_uint2(w[0], w[1]);
        } else {
#pragma unroll
            for (int c = 0; c < WORDS / 4; c++)
                ((uint4*)dst)[c] = make_uint4(w[4 * c], w[4 * c + 1], w[4 * c + 2], w[4 * c + 3]);
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < N; k++) {
        if (k >= valid) break;
        const unsigned int bits = w[k * BYTES / 4] >> (8 * ((k * BYTES) % 4));
        if (BYTES == 4) ((unsigned int*)dst)[k] = bits;
        else if (BYTES == 2) ((unsigned short*)dst)[k] = (unsigned short)bits;
        else dst[k] = (unsigned char)bits;
    }
}

// Raw bits of 4 consecutive elements starting at i, packed by load_elems into w (zeros past n).
__device__ __forceinline__ void load_raw4(const void* base, long long i, long long n, int fmt, bool vec, unsigned int w[4]) {
    const int valid = valid_count<4>(i, n);
#pragma unroll
    for (int k = 0; k < 4; k++) w[k] = 0u;
    switch (elem_bytes(fmt)) {
        case 4: load_elems<4, 4>(base, i, valid, vec, w); break;
        case 2: load_elems<4, 2>(base, i, valid, vec, w); break;
        default: load_elems<4, 1>(base, i, valid, vec, w); break;
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
    unsigned int w[4];
    load_raw4(base, i, n, fmt, vec, w);
    decode_raw4(w, fmt, out);
}

// Round-to-nearest-even images in `fmt` (BYTES bytes per element) of N values, packed as
// load_elems packs them (fp8 codes converted two at a time).
template <int N, int BYTES>
__device__ __forceinline__ void pack_values(int fmt, const float* x, unsigned int* w) {
    constexpr int WORDS = (N * BYTES + 3) / 4;
#pragma unroll
    for (int k = 0; k < WORDS; k++) w[k] = 0u;
    if (BYTES == 1) {
#pragma unroll
        for (int j = 0; j < N / 2; j++) {
            const unsigned int pair = fmt == FMT_E4M3 ? lp::fp8x2_code<lp::E4M3>(x[2 * j], x[2 * j + 1])
                                                      : lp::fp8x2_code<lp::E5M2>(x[2 * j], x[2 * j + 1]);
            w[j >> 1] |= pair << (16 * (j & 1));
        }
    } else {
#pragma unroll
        for (int k = 0; k < N; k++) w[k * BYTES / 4] |= code_bits(x[k], fmt) << (8 * ((k * BYTES) % 4));
    }
}

// Stores N values rounded to `fmt` (the first `valid`); one vector access when `vec`.
template <int N>
__device__ __forceinline__ void store_values(void* base, long long i, int valid, int fmt, bool vec, const float* x) {
    unsigned int w[N];
    switch (elem_bytes(fmt)) {
        case 4: pack_values<N, 4>(fmt, x, w); store_elems<N, 4>(base, i, valid, vec, w); break;
        case 2: pack_values<N, 2>(fmt, x, w); store_elems<N, 2>(base, i, valid, vec, w); break;
        default: pack_values<N, 1>(fmt, x, w); store_elems<N, 1>(base, i, valid, vec, w); break;
    }
}

__device__ __forceinline__ void store4(void* base, long long i, long long n, int fmt, bool vec, const float x[4]) {
    store_values<4>(base, i, valid_count<4>(i, n), fmt, vec, x);
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
    return fmaxf(s, lp::MIN_SCALE);
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

// Per-step scalars shared by every element. The gradient's sign (maximize) is folded into its
// coefficient: (-c) * g == c * (-g) and g * g == (-g) * (-g) exactly in IEEE arithmetic.
// grad_mul multiplies every gradient element first (e.g. the gradient-clipping coefficient; 1
// when the launch passes none, an exact no-op).
struct StepScalars {
    float grad_mul, decay, step_size, beta1, grad_coeff1, beta2, one_minus_beta2, eps, inv_bias_correction2_sqrt;
};

__device__ __forceinline__ StepScalars step_scalars(
    float lr_value, const float* lr_ptr, const float* grad_mul_ptr, float beta1, float one_minus_beta1,
    float beta2, float one_minus_beta2, float eps, float weight_decay, float bias_correction1,
    float inv_bias_correction2_sqrt, int maximize) {
    const float lr = lr_ptr ? *lr_ptr : lr_value;
    StepScalars s;
    s.grad_mul = grad_mul_ptr ? *grad_mul_ptr : 1.0f;
    s.decay = 1.0f - lr * weight_decay;
    s.step_size = lr / bias_correction1;
    s.beta1 = beta1;
    s.grad_coeff1 = maximize ? -one_minus_beta1 : one_minus_beta1;
    s.beta2 = beta2;
    s.one_minus_beta2 = one_minus_beta2;
    s.eps = eps;
    s.inv_bias_correction2_sqrt = inv_bias_correction2_sqrt;
    return s;
}

// AdamW on one element (the exact operation order of reference_step): p is updated in place,
// the new m and the stored second moment (v, or sqrt(v) for reduced formats) are written to
// m_new / v_stored, and the block amax of |m| and of sqrt(v) are accumulated. m and v are the
// decoded codes, m_scale / v_scale their block scales.
__device__ __forceinline__ void adam_element(const StepScalars& s, int v_fmt, float m_scale, float v_scale,
                                             float& p, float grad, float m, float v, float& m_new,
                                             float& v_stored, float& m_amax, float& v_amax) {
    const float g = grad * s.grad_mul;
    const float m_old = m * m_scale;
    float v_old;
    if (v_fmt == FMT_F32) {
        v_old = v;
    } else {
        const float root_old = v * v_scale;
        v_old = root_old * root_old;
    }
    const float mk = s.beta1 * m_old + s.grad_coeff1 * g;
    const float vk = s.beta2 * v_old + s.one_minus_beta2 * (g * g);
    const float root = sqrtf(vk);
    const float denom = root * s.inv_bias_correction2_sqrt + s.eps;
    p = p * s.decay - s.step_size * (mk / denom);
    m_new = mk;
    v_stored = v_fmt == FMT_F32 ? vk : root;
    m_amax = fmaxf(m_amax, fabsf(mk));
    v_amax = fmaxf(v_amax, root);
}

// AdamW on 4 elements (adam_element each).
__device__ __forceinline__ void adam_update4(const StepScalars& s, int v_fmt, float m_scale, float v_scale,
                                             float p[4], const float g[4], const float m[4], const float v[4],
                                             float m_new[4], float v_stored[4], float& m_amax, float& v_amax) {
#pragma unroll
    for (int k = 0; k < 4; k++)
        adam_element(s, v_fmt, m_scale, v_scale, p[k], g[k], m[k], v[k], m_new[k], v_stored[k], m_amax, v_amax);
}

// A new moment in its code domain: x * (1 / scale) for scaled formats (inverse_scale = 1 / scale,
// one division per block, not per element); a stored second moment (sqrt(v), any format but
// fp32) below the smallest positive code becomes that code.
template <bool SECOND>
__device__ __forceinline__ float to_code_domain(float x, float inverse_scale, int fmt) {
    float y = is_scaled(fmt) ? x * inverse_scale : x;
    if (SECOND && fmt != FMT_F32 && y > 0.0f && y < fmt_min_subnormal(fmt)) y = fmt_min_subnormal(fmt);
    return y;
}

// One tensor's table row (plus its gradient pointer).
struct TensorRow {
    void* param;
    void* m_codes;
    float* m_scales;
    void* v_codes;
    float* v_scales;
    void* lowp_param;
    const void* grad;
    long long n, first_block;
    unsigned long long counter;
    bool has_master, aligned;
};

__device__ __forceinline__ TensorRow load_row(const long long* table, const long long* grads, int t,
                                              int param_fmt, int m_fmt, int v_fmt) {
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
    r.counter = (unsigned long long)row[8] << 40;
    r.has_master = row[5] != 0;
    const int read_fmt = r.has_master ? FMT_F32 : param_fmt;
    r.aligned = aligned4(row[0], read_fmt) && aligned4((long long)r.grad, param_fmt) &&
                aligned4(row[1], m_fmt) && aligned4(row[3], v_fmt) &&
                (!r.has_master || aligned4(row[5], param_fmt));
    return r;
}

// Writes 4 updated parameters: fp32 master + round-to-nearest low-precision image, or the
// parameter itself (stochastic rounding for bf16/fp16).
__device__ __forceinline__ void write_param4(const TensorRow& r, long long i, int param_fmt, bool vec,
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

// Requantizes 4 new moments with the block's fresh scales and stores them.
__device__ __forceinline__ void write_moments4(const TensorRow& r, long long i, int m_fmt, int v_fmt, bool vec,
                                               float m_inverse_scale, float v_inverse_scale,
                                               const float m_new[4], const float v_stored[4]) {
    float m[4], v[4];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        m[k] = to_code_domain<false>(m_new[k], m_inverse_scale, m_fmt);
        v[k] = to_code_domain<true>(v_stored[k], v_inverse_scale, v_fmt);
    }
    store4(r.m_codes, i, r.n, m_fmt, vec, m);
    store4(r.v_codes, i, r.n, v_fmt, vec, v);
}

// Fresh block scale from the partial amaxes of a group of LANES lanes (1 for unscaled formats);
// every lane of the warp must call it.
template <int LANES>
__device__ __forceinline__ float new_block_scale(int fmt, float amax) {
    return is_scaled(fmt) ? block_scale(lp::group_max<LANES>(amax), fmt) : 1.0f;
}

// One warp per quantization block of 128*C elements (any formats, given at run time).
template <int C>
__device__ __forceinline__ void adamw_block(
    const long long* __restrict__ table, int n_tensors, const long long* __restrict__ grads,
    long long total_blocks, int param_fmt, int m_fmt, int v_fmt, const StepScalars& s,
    unsigned int seed, const int* skip_flag) {
    const int lane = threadIdx.x & 31;
    const long long qblock = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (qblock >= total_blocks || *skip_flag) return;
    const TensorRow r = load_row(table, grads, find_tensor(table, 0, n_tensors, qblock), param_fmt, m_fmt, v_fmt);
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
    const float m_scale_new = new_block_scale<32>(m_fmt, m_amax);
    const float v_scale_new = new_block_scale<32>(v_fmt, v_amax);
    const float m_inverse_scale = 1.0f / m_scale_new, v_inverse_scale = 1.0f / v_scale_new;
#pragma unroll
    for (int c = 0; c < C; c++) {
        const long long i = start + c * 128 + lane * 4;
        write_moments4(r, i, m_fmt, v_fmt, r.aligned && i + 4 <= r.n, m_inverse_scale, v_inverse_scale,
                       m_new + c * 4, v_stored + c * 4);
    }
    if (lane == 0) {
        if (is_scaled(m_fmt)) r.m_scales[local_block] = m_scale_new;
        if (is_scaled(v_fmt)) r.v_scales[local_block] = v_scale_new;
    }
}

// Threads per CTA of every step kernel.
#define STEP_THREADS 256

// ---- Hot kernels: quantization block 128, fp32 or bf16 parameters, fp8 or 16-bit moments ----
//
// A half-warp (a group of HOT_LANES lanes) owns one block of 128 elements: lane `sub` of the
// group handles elements [8*sub, 8*sub + 8) of it, so a warp covers two consecutive blocks per
// iteration, a lane's accesses are 32-byte (fp32), 16-byte (16-bit values) and 8-byte (fp8
// codes) vectors, the block amax (of the scaled moment formats) is a 4-step shuffle reduction
// within the group, and every per-block
// cost (scale inversion, reduction, addressing, loop) is shared by 8 elements per lane. The grid
// is the resident CTAs (PERSISTENT_CTAS_PER_SM per SM); each warp walks the launch's block pairs
// with a grid stride and loads the next pair (raw words, decoded late) before it computes the
// current one. A group's tensor rows live in two shared-memory slots, so that the block being
// finished and the block being loaded may belong to different tensors: entering a new tensor
// writes the slot the current block does not use. Full, 16-byte aligned blocks take vector
// accesses; the partial last block of a tensor and unaligned tensors take element accesses.
// Per element the arithmetic is adam_element's, so the result equals adamw_block's bit for bit.
#define HOT_LANES 16
#define HOT_ELEMS 8

// A tensor's row as the hot kernels use it (one per shared-memory slot).
struct HotRow {
    void* param;  // read and written: the fp32 master copy when there is one, else the parameter
    const void* grad;
    unsigned char* m_codes;
    float* m_scales;
    unsigned char* v_codes;
    float* v_scales;
    void* lowp_param;  // the parameter written from the master copy
    long long n;
    unsigned long long counter;
    int first_block;
    int fast_end;  // blocks in [first_block, fast_end) are full and every pointer is 16-byte aligned
};

__device__ __forceinline__ HotRow hot_row(const long long* table, const long long* grads, int t) {
    const long long* row = table + (long long)t * TABLE_COLS;
    HotRow r;
    r.param = (void*)row[0];
    r.grad = (const void*)grads[t];
    r.m_codes = (unsigned char*)row[1];
    r.m_scales = (float*)row[2];
    r.v_codes = (unsigned char*)row[3];
    r.v_scales = (float*)row[4];
    r.lowp_param = (void*)row[5];
    r.n = row[6];
    r.counter = (unsigned long long)row[8] << 40;
    r.first_block = (int)row[7];
    const bool aligned = ((row[0] | grads[t] | row[1] | row[3] | row[5]) & 15) == 0;
    r.fast_end = r.first_block + (aligned ? (int)(row[6] / 128) : 0);
    return r;
}

// End (exclusive) of tensor t's blocks.
__device__ __forceinline__ int tensor_end_block(const long long* table, int n_tensors, int total_blocks, int t) {
    return t + 1 < n_tensors ? (int)table[(t + 1) * TABLE_COLS + 7] : total_blocks;
}

// One lane's 8 elements of a block as loaded: raw words of the parameter read (PB bytes per
// element), the gradient (GB bytes) and the moments (MB and VB bytes), and the block's old scales.
template <int PB, int GB, int MB, int VB>
struct HotRaw {
    unsigned int p[2 * PB], g[2 * GB], m[2 * MB], v[2 * VB];
    float m_scale, v_scale;
};

// Position of a lane's 8 elements: element index in the tensor, block in the tensor, how many
// exist (0 for an inactive group), and whether they take the vector path.
struct HotPlace {
    long long i;
    int local_block, valid;
    bool fast;
};

__device__ __forceinline__ HotPlace hot_place(const HotRow& r, int qblock, int sub, bool active) {
    HotPlace at;
    at.local_block = qblock - r.first_block;
    at.i = (long long)at.local_block * 128 + sub * HOT_ELEMS;
    at.fast = active && qblock < r.fast_end;
    at.valid = active ? valid_count<HOT_ELEMS>(at.i, r.n) : 0;
    return at;
}

template <int MF, int VF, int PB, int GB, int MB, int VB>
__device__ __forceinline__ void hot_load(const HotRow& r, int qblock, int sub, bool active,
                                         HotRaw<PB, GB, MB, VB>& b) {
    const HotPlace at = hot_place(r, qblock, sub, active);
    load_elems<HOT_ELEMS, PB>(r.param, at.i, at.valid, at.fast, b.p);
    load_elems<HOT_ELEMS, GB>(r.grad, at.i, at.valid, at.fast, b.g);
    load_elems<HOT_ELEMS, MB>(r.m_codes, at.i, at.valid, at.fast, b.m);
    load_elems<HOT_ELEMS, VB>(r.v_codes, at.i, at.valid, at.fast, b.v);
    b.m_scale = active && is_scaled(MF) ? r.m_scales[at.local_block] : 1.0f;
    b.v_scale = active && is_scaled(VF) ? r.v_scales[at.local_block] : 1.0f;
}

// Elements 2j and 2j + 1 of a lane's 8 moment values from their raw words (BYTES per element):
// fp8 codes through the paired conversion, 16-bit values from one word, fp32 from two.
template <int FMT, int BYTES>
__device__ __forceinline__ float2 hot_moment_pair(const unsigned int* w, int j) {
    if (BYTES == 1) {
        const unsigned short pair = (unsigned short)(w[j >> 1] >> (16 * (j & 1)));
        return FMT == FMT_E4M3 ? lp::fp8x2_value<lp::E4M3>(pair) : lp::fp8x2_value<lp::E5M2>(pair);
    }
    if (BYTES == 2) return make_float2(decode_bits(w[j] & 0xffffu, FMT), decode_bits(w[j] >> 16, FMT));
    return make_float2(__uint_as_float(w[2 * j]), __uint_as_float(w[2 * j + 1]));
}

// Computes, writes and requantizes one lane's 8 elements (every lane of the warp calls it: the
// block amax is reduced with shuffles).
template <int PF, bool MASTER, int MF, int VF, int PB, int GB, int MB, int VB>
__device__ __forceinline__ void hot_finish(const HotRow& r, int qblock, int sub, bool active,
                                           const HotRaw<PB, GB, MB, VB>& b, const StepScalars& s,
                                           unsigned int seed) {
    const HotPlace at = hot_place(r, qblock, sub, active);
    const int read_fmt = PB == 4 ? FMT_F32 : PF;
    float p[HOT_ELEMS], g[HOT_ELEMS], m_new[HOT_ELEMS], root[HOT_ELEMS];
    decode_raw4(b.p, read_fmt, p);
    decode_raw4(b.p + PB, read_fmt, p + 4);
    decode_raw4(b.g, PF, g);
    decode_raw4(b.g + GB, PF, g + 4);
    float m_amax = 0.0f, v_amax = 0.0f;
#pragma unroll
    for (int j = 0; j < HOT_ELEMS / 2; j++) {
        const float2 m = hot_moment_pair<MF, MB>(b.m, j);
        const float2 v = hot_moment_pair<VF, VB>(b.v, j);
        adam_element(s, VF, b.m_scale, b.v_scale, p[2 * j], g[2 * j], m.x, v.x, m_new[2 * j],
                     root[2 * j], m_amax, v_amax);
        adam_element(s, VF, b.m_scale, b.v_scale, p[2 * j + 1], g[2 * j + 1], m.y, v.y,
                     m_new[2 * j + 1], root[2 * j + 1], m_amax, v_amax);
    }
    if (MASTER) {
        store_values<HOT_ELEMS>(r.param, at.i, at.valid, FMT_F32, at.fast, p);
        store_values<HOT_ELEMS>(r.lowp_param, at.i, at.valid, PF, at.fast, p);
    } else {
        if (PF != FMT_F32) {
#pragma unroll
            for (int k = 0; k < HOT_ELEMS; k++)
                p[k] = round_stochastic(p[k], PF, lp::hashed_uniform(r.counter + at.i + k, seed));
        }
        store_values<HOT_ELEMS>(r.param, at.i, at.valid, PF, at.fast, p);
    }
    const float m_scale_new = new_block_scale<HOT_LANES>(MF, m_amax);
    const float v_scale_new = new_block_scale<HOT_LANES>(VF, v_amax);
    const float m_inverse_scale = 1.0f / m_scale_new, v_inverse_scale = 1.0f / v_scale_new;
#pragma unroll
    for (int k = 0; k < HOT_ELEMS; k++) {
        m_new[k] = to_code_domain<false>(m_new[k], m_inverse_scale, MF);
        root[k] = to_code_domain<true>(root[k], v_inverse_scale, VF);
    }
    store_values<HOT_ELEMS>(r.m_codes, at.i, at.valid, MF, at.fast, m_new);
    store_values<HOT_ELEMS>(r.v_codes, at.i, at.valid, VF, at.fast, root);
    if (active && sub == 0) {
        if (is_scaled(MF)) r.m_scales[at.local_block] = m_scale_new;
        if (is_scaled(VF)) r.v_scales[at.local_block] = v_scale_new;
    }
}

// PF: parameter format (FMT_F32 or FMT_BF16); MASTER: the table's rows have fp32 master copies
// (column 5 set on every row; fused.py launches master and plain tensors separately).
template <int PF, bool MASTER, int MF, int VF>
__device__ __forceinline__ void adamw_hot(
    const long long* __restrict__ table, int n_tensors, const long long* __restrict__ grads,
    int total_blocks, const StepScalars& s, unsigned int seed, const int* skip_flag) {
    constexpr int PB = (MASTER || PF == FMT_F32) ? 4 : 2;
    constexpr int GB = PF == FMT_F32 ? 4 : 2;
    constexpr int MB = elem_bytes(MF);
    constexpr int VB = elem_bytes(VF);
    __shared__ HotRow rows[STEP_THREADS / HOT_LANES][2];
    HotRow* slots = rows[threadIdx.x / HOT_LANES];
    const int sub = threadIdx.x % HOT_LANES;
    const int half = (threadIdx.x / HOT_LANES) & 1;
    const int warps = gridDim.x * (blockDim.x >> 5);
    int pair = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (2 * pair >= total_blocks || *skip_flag) return;  // uniform over the warp
    int qblock = 2 * pair + half;
    bool active = qblock < total_blocks;
    int t = 0, end_block = 0, slot = 0;
    if (active) {
        t = find_tensor(table, 0, n_tensors, qblock);
        end_block = tensor_end_block(table, n_tensors, total_blocks, t);
        if (sub == 0) slots[0] = hot_row(table, grads, t);
    }
    __syncwarp();
    HotRaw<PB, GB, MB, VB> current, next;
    hot_load<MF, VF>(slots[slot], qblock, sub, active, current);
    for (;;) {
        pair += warps;
        const bool more = 2 * pair < total_blocks;  // uniform over the warp
        const int next_qblock = 2 * pair + half;
        const bool next_active = more && next_qblock < total_blocks;
        int next_slot = slot;
        if (more) {
            const bool enter = next_active && next_qblock >= end_block;
            if (enter) {
                next_slot = slot ^ 1;
                t = find_tensor(table, t, n_tensors, next_qblock);
                end_block = tensor_end_block(table, n_tensors, total_blocks, t);
            }
            __syncwarp();  // the lanes' last reads of slot ^ 1 (the previous block) are done
            if (enter && sub == 0) slots[next_slot] = hot_row(table, grads, t);
            __syncwarp();
            hot_load<MF, VF>(slots[next_slot], next_qblock, sub, next_active, next);
        }
        hot_finish<PF, MASTER, MF, VF>(slots[slot], qblock, sub, active, current, s, seed);
        if (!more) break;
        qblock = next_qblock;
        active = next_active;
        slot = next_slot;
        current = next;
    }
}

#define ADAMW_ARGS                                                                                  \
    const long long *table, int n_tensors, const long long *grads, long long total_blocks,          \
        int param_fmt, int m_fmt, int v_fmt, float lr_value, const float *lr_ptr,                   \
        const float *grad_mul, float beta1,                                                         \
        float one_minus_beta1, float beta2, float one_minus_beta2, float eps, float weight_decay,   \
        float bias_correction1, float inv_bias_correction2_sqrt, int maximize, unsigned int seed,   \
        const int *skip_flag
#define STEP_SCALARS                                                                                \
    step_scalars(lr_value, lr_ptr, grad_mul, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, \
                 bias_correction1, inv_bias_correction2_sqrt, maximize)

#define ADAMW_KERNEL(NAME, C)                                                                       \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS) NAME(ADAMW_ARGS) {                   \
        adamw_block<C>(table, n_tensors, grads, total_blocks, param_fmt, m_fmt, v_fmt, STEP_SCALARS,  \
                       seed, skip_flag);                                                            \
    }

// Resident CTAs of STEP_THREADS threads per SM of the hot kernels (their grid size; 3 allows
// 85 registers per thread, room for the next block pair in flight; 4 caps them at 64).
// fused.py passes its PERSISTENT_CTAS_PER_SM with -D.
#ifndef PERSISTENT_CTAS_PER_SM
#define PERSISTENT_CTAS_PER_SM 3
#endif
// total_blocks < 2^30 (fused.py sends larger launches to the general kernel).
#define ADAMW_HOT_KERNEL(NAME, PF, MASTER, MF, VF)                                                  \
    extern "C" __global__ void __launch_bounds__(STEP_THREADS, PERSISTENT_CTAS_PER_SM) NAME(ADAMW_ARGS) { \
        adamw_hot<PF, MASTER, MF, VF>(table, n_tensors, grads, (int)total_blocks, STEP_SCALARS, seed, skip_flag); \
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
// The default moments ("fp8": FMT_E4M3 m, FMT_E5M2 sqrt(v), block 128) on fp32 parameters, bf16
// parameters (stochastic rounding) and bf16 parameters with fp32 master copies.
ADAMW_HOT_KERNEL(adamw_c1_f32_e4m3_e5m2, FMT_F32, false, FMT_E4M3, FMT_E5M2)
ADAMW_HOT_KERNEL(adamw_c1_bf16_e4m3_e5m2, FMT_BF16, false, FMT_E4M3, FMT_E5M2)
ADAMW_HOT_KERNEL(adamw_c1_bf16_master_e4m3_e5m2, FMT_BF16, true, FMT_E4M3, FMT_E5M2)
// The 16-bit moments settings ("bf16", "fp16": the same format for m and sqrt(v)). fp32 moments
// keep the general kernel: their next block in flight would not fit the registers of 3 CTAs/SM.
#define ADAMW_HOT_KERNELS_OF(MNAME, MFMT)                                                           \
    ADAMW_HOT_KERNEL(adamw_c1_f32_##MNAME, FMT_F32, false, MFMT, MFMT)                              \
    ADAMW_HOT_KERNEL(adamw_c1_bf16_##MNAME, FMT_BF16, false, MFMT, MFMT)                            \
    ADAMW_HOT_KERNEL(adamw_c1_bf16_master_##MNAME, FMT_BF16, true, MFMT, MFMT)
ADAMW_HOT_KERNELS_OF(bf16, FMT_BF16)
ADAMW_HOT_KERNELS_OF(fp16, FMT_F16)

// Sets *flag = 1 if any gradient element of the listed tensors is NaN or +-inf, reading only the
// gradients with the step kernels' table. Persistent: each warp walks SCAN_BLOCKS_PER_WARP
// consecutive quantization blocks per iteration with a grid stride, looking a tensor up only when
// it crosses into the next one. On one H200 (16 x 64M fp32 gradients) it reads at 3.4-3.9 TB/s:
// 1.28 ms at block 128, where one warp per block and one CTA per 8 blocks took 2.86 ms (bound by
// CTA launches) and staging the blocks' addresses in arrays before the loads took 2.57 ms.
// fused.py passes SCAN_BLOCKS_PER_WARP with -D.
#ifndef SCAN_BLOCKS_PER_WARP
#define SCAN_BLOCKS_PER_WARP 4
#endif
extern "C" __global__ void __launch_bounds__(256) grads_nonfinite(
    const long long* table, int n_tensors, const long long* grads, long long total_blocks, int block,
    int grad_fmt, int* flag) {
    const int lane = threadIdx.x & 31;
    const long long warps = (long long)gridDim.x * (blockDim.x >> 5);
    const long long warp = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int t = 0;
    long long first_block = 0, end_block = -1, n = 0;
    const void* grad = nullptr;
    bool aligned = false, bad = false;
    for (long long base = warp * SCAN_BLOCKS_PER_WARP; base < total_blocks; base += warps * SCAN_BLOCKS_PER_WARP) {
#pragma unroll
        for (int j = 0; j < SCAN_BLOCKS_PER_WARP; j++) {
            const long long qblock = base + j;
            if (qblock >= total_blocks) break;
            if (qblock >= end_block) {  // blocks only grow along a warp's walk
                t = find_tensor(table, t, n_tensors, qblock);
                first_block = table[(long long)t * TABLE_COLS + 7];
                end_block = t + 1 < n_tensors ? table[(long long)(t + 1) * TABLE_COLS + 7] : total_blocks;
                n = table[(long long)t * TABLE_COLS + 6];
                grad = (const void*)grads[t];
                aligned = aligned4((long long)grad, grad_fmt);
            }
            const long long start = (qblock - first_block) * block + lane * 4;
            for (int c = 0; c < block; c += 128) {
                float g[4];
                load4(grad, start + c, n, grad_fmt, aligned && start + c + 4 <= n, g);
#pragma unroll
                for (int k = 0; k < 4; k++) bad |= !isfinite(g[k]);
            }
        }
    }
    if (bad) *flag = 1;
}
