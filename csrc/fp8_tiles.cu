// Both FP8 casts of a GEMM operand from one read (ALGORITHMS.md §1.2 and, for the DeepSeek-V3
// 1x128 tiles, §7), and SwiGLU's values with their amax for the fused FP8 MLP.
//
// lp_cast_tiles: an activation or output gradient x [rows, cols] enters two FP8 GEMMs, scaled
// along cols in one (Fprop / Dgrad) and along rows in the other (Wgrad, operand x^T). Each CTA
// owns a 128x128 tile, reads it once and writes
//   q_row [rows, cols]: x / s_row;   q_col [cols, rows]: x^T / s_col;
// with, in TILES mode, s_row = float_scale(amax of 1x128 along cols, fmt_max) and s_col the same
// along rows (128x1), scales stored column-major as cuBLASLt reads 1x128 block scaling:
// s_row as [cols/128][rows], s_col as [rows/128][cols]; in TENSOR mode one scale
// s = float_scale(tensor amax, fmt_max) for both, from the amax lp_source_values wrote before.
// Twin (the oracle): lpdist/nn/fp8_cast.py, cast_fp8 of x and of x^T. Arithmetic as the oracle:
// amax of finite |x|, IEEE scale division, one correctly rounded reciprocal per group, hardware
// RNE conversion with saturation (NaN stays NaN).
//
// lp_source_values: SwiGLU's output h = silu(g) * u, or its gradients dg = dh * u * silu'(g) and
// du = dh * silu(g), elementwise, rounded to the input dtype, with their amax in the same pass
// (the per-tensor scale needs it before any cast). Twin: lpdist/nn/float8_swiglu.py, with the
// same order of IEEE operations.
//
// Work split (256 threads): warp w covers rows 32*(w/2) .. +31 of columns 64*(w%2) .. +63, each
// lane two adjacent columns of those 32 rows, so every load is a 128-byte warp access. Row
// maxima are reduced across the warp by a transposing butterfly (31 shuffles for 32 rows),
// column maxima within the thread, then both across warps through shared memory. Both casts are
// staged in shared memory and stored as 16-byte chunks of whole lines: storing the transposed
// codes straight from registers (32 bytes per lane, 32 lines per warp store) took 40% of the
// kernel's time.
#include "lp_formats.cuh"

using namespace lp;

namespace {

constexpr int TILE = 128, ROWS_PER_WARP = 32, THREADS = 256;
constexpr float SMALLEST_NORMAL = 1.17549435e-38f;  // 2^-126

// CTAs per SM the register allocation must allow (the launcher passes it as a compile option).
#ifndef LP_TILES_MIN_CTAS
#define LP_TILES_MIN_CTAS 3
#endif

// Two adjacent elements as floats.
template <typename T> struct Pair { unsigned raw; };
template <> struct Pair<float> { float2 raw; };

template <typename T>
__device__ __forceinline__ Pair<T> load_pair(const T* p) {
  return Pair<T>{*reinterpret_cast<const unsigned*>(p)};
}
template <>
__device__ __forceinline__ Pair<float> load_pair<float>(const float* p) {
  return Pair<float>{*reinterpret_cast<const float2*>(p)};
}

template <typename T>
__device__ __forceinline__ float2 unpack(const Pair<T>& p) {
  const T* e = reinterpret_cast<const T*>(&p.raw);
  return make_float2(to_float(e[0]), to_float(e[1]));
}
template <>
__device__ __forceinline__ float2 unpack<float>(const Pair<float>& p) { return p.raw; }

// v[i] holds a partial max of row i (i < 32) in every lane; afterwards lane l holds in v[0] the
// maximum of row l over the warp. Each step halves the rows a lane keeps and exchanges the other
// half with its partner, so 16 + 8 + 4 + 2 + 1 shuffles reduce 32 rows.
template <int HALF>
__device__ __forceinline__ void transpose_max_step(float* v, int lane) {
  const bool upper = lane & HALF;
#pragma unroll
  for (int j = 0; j < HALF; ++j) {
    const float keep = upper ? v[j + HALF] : v[j];
    const float send = upper ? v[j] : v[j + HALF];
    v[j] = fmaxf(keep, __shfl_xor_sync(0xffffffffu, send, HALF));
  }
}

__device__ __forceinline__ float transpose_max(float* v, int lane) {
  transpose_max_step<16>(v, lane);
  transpose_max_step<8>(v, lane);
  transpose_max_step<4>(v, lane);
  transpose_max_step<2>(v, lane);
  transpose_max_step<1>(v, lane);
  return v[0];
}

// |q| beyond fmt_max by more than half its top step: the oracle's saturated count
// (lpdist.nn.telemetry.clip_threshold).
template <class F> __device__ __forceinline__ float clip_threshold();
template <> __device__ __forceinline__ float clip_threshold<E4M3>() { return 448.0f + 16.0f; }
template <> __device__ __forceinline__ float clip_threshold<E5M2>() { return 57344.0f + 4096.0f; }

enum Source { PLAIN = 0, SWIGLU = 1, SWIGLU_GRAD = 2 };

// Eight values (already rounded to T) as stored to memory.
template <typename T>
__device__ __forceinline__ Raw8<T> pack8(const float* v) {
  Raw8<T> raw;
  T* e = reinterpret_cast<T*>(&raw.a);
#pragma unroll
  for (int j = 0; j < 8; ++j) e[j] = from_float<T>(v[j]);
  return raw;
}
template <>
__device__ __forceinline__ Raw8<float> pack8<float>(const float* v) {
  return Raw8<float>{make_float4(v[0], v[1], v[2], v[3]), make_float4(v[4], v[5], v[6], v[7])};
}

// SwiGLU's values in the twin's order of IEEE operations (no contraction into FMAs):
// sig = 1 / (1 + exp(-g)) (0 where subnormal), silu = g * sig; h = silu * u; du = dh * silu;
// dg = (dh * u) * (sig * (1 + g * (1 - sig))).
// A subnormal sigmoid (g below about -87.3) is flushed to zero explicitly, on both sides: the
// GPU's reciprocal may flush it or not depending on compile flags, torch's keeps it.
__device__ __forceinline__ float sigmoid(float g) {
  const float sig = __frcp_rn(__fadd_rn(1.0f, expf(-g)));
  return sig < SMALLEST_NORMAL ? 0.0f : sig;
}
__device__ __forceinline__ float swiglu_value(float g, float u) {
  return __fmul_rn(__fmul_rn(g, sigmoid(g)), u);
}
__device__ __forceinline__ float swiglu_gate_grad(float g, float u, float dh) {
  const float sig = sigmoid(g);
  const float dsilu = __fmul_rn(sig, __fadd_rn(1.0f, __fmul_rn(g, __fsub_rn(1.0f, sig))));
  return __fmul_rn(__fmul_rn(dh, u), dsilu);
}
__device__ __forceinline__ float swiglu_up_grad(float g, float dh) {
  return __fmul_rn(dh, __fmul_rn(g, sigmoid(g)));
}

// Value of SRC at one element, rounded to T; for SWIGLU_GRAD, dg (du is swiglu_up_grad).
template <typename T, int SRC>
__device__ __forceinline__ float source_value(float a, float b, float c) {
  if constexpr (SRC == SWIGLU) return to_float(from_float<T>(swiglu_value(a, b)));
  return to_float(from_float<T>(swiglu_gate_grad(a, b, c)));
}

// The outputs of one cast: row-major and transposed codes with their scales (TILES: column-major
// 1x128 scales; TENSOR: one fp32 each, written by CTA 0), the tensor amax it reads in TENSOR
// mode, and per-tile telemetry [tiles, 3] (amax, saturated and flushed counts of q_row) or nullptr.
struct CastOut {
  unsigned char* q_row;
  float* s_row;
  unsigned char* q_col;
  float* s_col;
  const float* tensor_amax;
  float* stats;
};

struct TileShared {
  float row_part[2][TILE];   // [column half][row]: max over 64 columns
  float col_part[4][TILE];   // [row quarter][column]: max over 32 rows
  float row_inv[TILE], col_inv[TILE];
  float tile_stats[3];
  // The codes are staged here and written out as whole 16-byte chunks of whole lines: per warp
  // its 32 rows x 64 row-major codes; per tile the 128 x 128 transposed codes, [column][row]
  // with the 16-byte chunks of each column swizzled (chunk ^ (column / 2 % 8)) so that neither
  // the staging nor the read-out has shared-memory bank conflicts.
  __align__(16) unsigned char row_codes[THREADS / 32][ROWS_PER_WARP * 64];
  __align__(16) unsigned char col_codes[TILE * TILE];
};

template <typename T, class F, bool TENSOR>
__device__ __forceinline__ void cast_tile(const T* __restrict__ x, long long rows, long long cols,
                                          const CastOut out, TileShared& sh) {
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int quarter = warp / 2, half = warp % 2;
  const long long tiles_per_row = cols / TILE;
  const long long r0 = (blockIdx.x / tiles_per_row) * TILE, c0 = (blockIdx.x % tiles_per_row) * TILE;
  const int row = quarter * ROWS_PER_WARP, col = half * 64 + 2 * lane;  // this thread's first row, column
  float* const stats = out.stats;
  if (stats != nullptr && tid < 3) sh.tile_stats[tid] = 0.0f;

  Pair<T> raw[ROWS_PER_WARP];
  const long long first = (r0 + row) * cols + c0 + col;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) raw[i] = load_pair<T>(x + first + i * cols);

  const float fmax = fmt_max<F>();
  float tensor_inv = 0.0f;
  if constexpr (TENSOR) {
    const float amax = *out.tensor_amax;
    const float s = float_scale(amax, fmax);
    tensor_inv = 1.0f / s;
    if (blockIdx.x == 0 && tid == 0) {
      *out.s_row = s;
      *out.s_col = s;
    }
    if (stats != nullptr && tid == 0) sh.tile_stats[0] = amax;
  } else {
    float rmax[ROWS_PER_WARP];
    float cmax0 = 0.0f, cmax1 = 0.0f;
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
      const float2 v = unpack<T>(raw[i]);
      const float a0 = finite_abs(v.x), a1 = finite_abs(v.y);
      rmax[i] = fmaxf(a0, a1);
      cmax0 = fmaxf(cmax0, a0);
      cmax1 = fmaxf(cmax1, a1);
    }
    sh.row_part[half][row + lane] = transpose_max(rmax, lane);
    sh.col_part[quarter][col] = cmax0;
    sh.col_part[quarter][col + 1] = cmax1;
    __syncthreads();

    // One thread per row (tid < 128) and per column (tid >= 128) derives the scale once.
    if (tid < TILE) {
      const float amax = fmaxf(sh.row_part[0][tid], sh.row_part[1][tid]);
      const float s = float_scale(amax, fmax);
      out.s_row[(c0 / TILE) * rows + r0 + tid] = s;
      sh.row_inv[tid] = 1.0f / s;
      if (stats != nullptr) atomicMax(reinterpret_cast<int*>(&sh.tile_stats[0]), __float_as_int(amax));
    } else {
      const int cc = tid - TILE;
      const float amax = fmaxf(fmaxf(sh.col_part[0][cc], sh.col_part[1][cc]), fmaxf(sh.col_part[2][cc], sh.col_part[3][cc]));
      const float s = float_scale(amax, fmax);
      out.s_col[(r0 / TILE) * cols + c0 + cc] = s;
      sh.col_inv[cc] = 1.0f / s;
    }
  }
  __syncthreads();

  // Row direction: two codes per row of this thread, staged, then 16-byte stores (a warp writes
  // eight 64-byte row segments per store).
  float saturated = 0.0f, flushed = 0.0f;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const float2 v = unpack<T>(raw[i]);
    const float inv = TENSOR ? tensor_inv : sh.row_inv[row + i];
    const unsigned short code = fp8x2_code<F>(v.x * inv, v.y * inv);
    *reinterpret_cast<unsigned short*>(&sh.row_codes[warp][i * 64 + 2 * lane]) = code;
    if (stats != nullptr) {
      saturated += (fabsf(v.x * inv) > clip_threshold<F>()) + (fabsf(v.y * inv) > clip_threshold<F>());
      flushed += ((code & 0x7f) == 0 && v.x != 0.0f) + ((code & 0x7f00) == 0 && v.y != 0.0f);
    }
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < ROWS_PER_WARP * 64 / 16 / 32; ++j) {
    const int chunk = j * 32 + lane, r = chunk / 4, part = chunk % 4;
    *reinterpret_cast<uint4*>(out.q_row + (r0 + row + r) * cols + c0 + half * 64 + part * 16) =
        *reinterpret_cast<const uint4*>(&sh.row_codes[warp][r * 64 + part * 16]);
  }

  // Column direction: this thread's 32 rows of each of its two columns are two 16-byte chunks
  // of that column's line of q_col; once the tile is staged, each thread stores whole chunks of
  // whole 128-byte lines.
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int cc = col + k;
    const float inv = TENSOR ? tensor_inv : sh.col_inv[cc];
    unsigned words[ROWS_PER_WARP / 4];
#pragma unroll
    for (int w = 0; w < ROWS_PER_WARP / 4; ++w) {
      float v[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 p = unpack<T>(raw[4 * w + j]);
        v[j] = (k == 0 ? p.x : p.y) * inv;
      }
      words[w] = (unsigned)fp8x2_code<F>(v[0], v[1]) | ((unsigned)fp8x2_code<F>(v[2], v[3]) << 16);
    }
    const int swizzle = (cc / 2) % 8, chunk = row / 16;
    *reinterpret_cast<uint4*>(&sh.col_codes[cc * TILE + ((chunk ^ swizzle) * 16)]) =
        make_uint4(words[0], words[1], words[2], words[3]);
    *reinterpret_cast<uint4*>(&sh.col_codes[cc * TILE + (((chunk + 1) ^ swizzle) * 16)]) =
        make_uint4(words[4], words[5], words[6], words[7]);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < TILE * TILE / 16 / THREADS; ++j) {
    const int index = j * THREADS + tid, cc = index / 8, part = index % 8;
    *reinterpret_cast<uint4*>(out.q_col + (c0 + cc) * rows + r0 + part * 16) =
        *reinterpret_cast<const uint4*>(&sh.col_codes[cc * TILE + ((part ^ ((cc / 2) % 8)) * 16)]);
  }

  if (stats != nullptr) {
    atomicAdd(&sh.tile_stats[1], saturated);
    atomicAdd(&sh.tile_stats[2], flushed);
    __syncthreads();
    if (tid < 3) stats[blockIdx.x * 3 + tid] = sh.tile_stats[tid];
  }
}

}  // namespace

// x: [rows, cols] contiguous, rows and cols multiples of 128, 4-byte aligned (8-byte for fp32).
// Outputs as CastOut. Grid: one CTA of 256 threads per 128x128 tile, tiles in row-major order.
template <typename T, class F, bool TENSOR>
__global__ void __launch_bounds__(THREADS, LP_TILES_MIN_CTAS)
lp_cast_tiles(const T* __restrict__ x, long long rows, long long cols,
              unsigned char* q_row, float* s_row, unsigned char* q_col, float* s_col,
              const float* tensor_amax, float* stats) {
  __shared__ TileShared sh;
  cast_tile<T, F, TENSOR>(x, rows, cols, CastOut{q_row, s_row, q_col, s_col, tensor_amax, stats}, sh);
}

// The values of SRC, elementwise: out0 = x (PLAIN: only the amax is taken), h (SWIGLU) or dg
// (SWIGLU_GRAD, with out1 = du), rounded to T, and when AMAX the max of their finite |value| into
// amax[0] (and amax[1]), which must hold zeros before the launch (non-negative floats order as
// their bit patterns, so atomicMax on int is exact). n8: elements / 8; each thread reads and
// writes 16-byte chunks, grid-stride.
template <typename T, int SRC, bool AMAX>
__global__ void __launch_bounds__(THREADS)
lp_source_values(const T* __restrict__ a, const T* __restrict__ b, const T* __restrict__ c, long long n8,
                 T* __restrict__ out0, T* __restrict__ out1, float* amax) {
  constexpr bool TWO = SRC == SWIGLU_GRAD;
  float m0 = 0.0f, m1 = 0.0f;
  for (long long i = blockIdx.x * (long long)THREADS + threadIdx.x; i < n8; i += (long long)gridDim.x * THREADS) {
    float va[8], vb[8], vc[8], r0[8], r1[8];
    unpack8<T>(reinterpret_cast<const Raw8<T>*>(a)[i], va);
    if constexpr (SRC != PLAIN) unpack8<T>(reinterpret_cast<const Raw8<T>*>(b)[i], vb);
    if constexpr (TWO) unpack8<T>(reinterpret_cast<const Raw8<T>*>(c)[i], vc);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      if constexpr (SRC == PLAIN) {
        r0[j] = va[j];
      } else {
        r0[j] = source_value<T, SRC>(va[j], vb[j], TWO ? vc[j] : 0.0f);
      }
      if constexpr (TWO) r1[j] = to_float(from_float<T>(swiglu_up_grad(va[j], vc[j])));
      if constexpr (AMAX) {
        m0 = fmaxf(m0, finite_abs(r0[j]));
        if constexpr (TWO) m1 = fmaxf(m1, finite_abs(r1[j]));
      }
    }
    if constexpr (SRC != PLAIN) {
      reinterpret_cast<Raw8<T>*>(out0)[i] = pack8<T>(r0);
      if constexpr (TWO) reinterpret_cast<Raw8<T>*>(out1)[i] = pack8<T>(r1);
    }
  }
  if constexpr (AMAX) {
    m0 = group_max<32>(m0);
    if constexpr (TWO) m1 = group_max<32>(m1);
    if (threadIdx.x % 32 == 0) {
      atomicMax(reinterpret_cast<int*>(amax), __float_as_int(m0));
      if constexpr (TWO) atomicMax(reinterpret_cast<int*>(amax + 1), __float_as_int(m1));
    }
  }
}
