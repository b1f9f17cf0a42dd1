// Both 1x128 FP8 casts of a GEMM operand from one read (DeepSeek-V3 tiles, ALGORITHMS.md §7).
//
// Twin of lpdist/nn/fp8_cast.py: cast_fp8(x, fmt, 128) and cast_fp8(x.t(), fmt, 128) (the
// oracle). An activation or output gradient x [rows, cols] enters two FP8 GEMMs, scaled along
// cols in one (Fprop / Dgrad) and along rows in the other (Wgrad, operand x^T). Each CTA owns a
// 128x128 tile, reads it once and writes
//   q_row [rows, cols]: x / s_row, s_row = float_scale(amax of 1x128 along cols, fmt_max);
//   q_col [cols, rows]: x^T / s_col, s_col = float_scale(amax of 128x1 along rows, fmt_max);
// with scales stored column-major, the layout cuBLASLt reads for 1x128 block scaling:
//   s_row as [cols/128][rows], s_col as [rows/128][cols].
// Arithmetic as the oracle: amax of |x| (NaN ignored), scale = amax / fmt_max (IEEE), one
// correctly rounded reciprocal per group, hardware RNE conversion with saturation (NaN stays
// NaN). Unlike lpdist.quant.quantize, +-inf enters the amax (fp8_cast.abs_for_amax): its group's
// scale is +inf and its codes 0 (NaN at the +-inf), so results from it are non-finite.
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

// |v|, or 0 for NaN: the amax includes +-inf and ignores NaN (oracle: fp8_cast.abs_for_amax).
__device__ __forceinline__ float abs_for_amax(float v) {
  const float a = fabsf(v);
  return a == a ? a : 0.0f;
}

template <typename T, class F>
__device__ void cast_tiles_both(const T* __restrict__ x, long long rows, long long cols,
                                unsigned char* __restrict__ q_row, float* __restrict__ s_row,
                                unsigned char* __restrict__ q_col, float* __restrict__ s_col,
                                float* __restrict__ stats) {
  __shared__ float row_part[2][TILE];   // [column half][row]: max over 64 columns
  __shared__ float col_part[4][TILE];   // [row quarter][column]: max over 32 rows
  __shared__ float row_inv[TILE], col_inv[TILE];
  __shared__ float tile_stats[3];
  // The codes are staged in shared memory and written out as whole 16-byte chunks of whole
  // lines: per warp its 32 rows x 64 row-major codes; per tile the 128 x 128 transposed codes,
  // [column][row] with the 16-byte chunks of each column swizzled (chunk ^ (column / 2 % 8)) so
  // that neither the staging nor the read-out has shared-memory bank conflicts.
  __shared__ __align__(16) unsigned char row_codes[THREADS / 32][ROWS_PER_WARP * 64];
  __shared__ __align__(16) unsigned char col_codes[TILE * TILE];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int quarter = warp / 2, half = warp % 2;
  const long long tiles_per_row = cols / TILE;
  const long long r0 = (blockIdx.x / tiles_per_row) * TILE, c0 = (blockIdx.x % tiles_per_row) * TILE;
  const int row = quarter * ROWS_PER_WARP, col = half * 64 + 2 * lane;  // this thread's first row, column
  if (stats != nullptr && tid < 3) tile_stats[tid] = 0.0f;

  Pair<T> raw[ROWS_PER_WARP];
  const T* src = x + (r0 + row) * cols + c0 + col;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) raw[i] = load_pair<T>(src + i * cols);

  float rmax[ROWS_PER_WARP];
  float cmax0 = 0.0f, cmax1 = 0.0f;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const float2 v = unpack<T>(raw[i]);
    const float a0 = abs_for_amax(v.x), a1 = abs_for_amax(v.y);
    rmax[i] = fmaxf(a0, a1);
    cmax0 = fmaxf(cmax0, a0);
    cmax1 = fmaxf(cmax1, a1);
  }
  row_part[half][row + lane] = transpose_max(rmax, lane);
  col_part[quarter][col] = cmax0;
  col_part[quarter][col + 1] = cmax1;
  __syncthreads();

  // One thread per row (tid < 128) and per column (tid >= 128) derives the scale once.
  const float fmax = fmt_max<F>();
  if (tid < TILE) {
    const float amax = fmaxf(row_part[0][tid], row_part[1][tid]);
    const float s = float_scale(amax, fmax);
    s_row[(c0 / TILE) * rows + r0 + tid] = s;
    row_inv[tid] = 1.0f / s;
    if (stats != nullptr) atomicMax(reinterpret_cast<int*>(&tile_stats[0]), __float_as_int(amax));
  } else {
    const int c = tid - TILE;
    const float amax = fmaxf(fmaxf(col_part[0][c], col_part[1][c]), fmaxf(col_part[2][c], col_part[3][c]));
    const float s = float_scale(amax, fmax);
    s_col[(r0 / TILE) * cols + c0 + c] = s;
    col_inv[c] = 1.0f / s;
  }
  __syncthreads();

  // Row direction: two codes per row of this thread, staged, then 16-byte stores (a warp writes
  // eight 64-byte row segments per store).
  float saturated = 0.0f, flushed = 0.0f;
#pragma unroll
  for (int i = 0; i < ROWS_PER_WARP; ++i) {
    const float2 v = unpack<T>(raw[i]);
    const float inv = row_inv[row + i];
    const float a = v.x * inv, b = v.y * inv;
    const unsigned short code = fp8x2_code<F>(a, b);
    *reinterpret_cast<unsigned short*>(&row_codes[warp][i * 64 + 2 * lane]) = code;
    if (stats != nullptr) {
      saturated += (fabsf(a) > clip_threshold<F>()) + (fabsf(b) > clip_threshold<F>());
      flushed += ((code & 0x7f) == 0 && v.x != 0.0f) + ((code & 0x7f00) == 0 && v.y != 0.0f);
    }
  }
  __syncwarp();
#pragma unroll
  for (int j = 0; j < ROWS_PER_WARP * 64 / 16 / 32; ++j) {
    const int chunk = j * 32 + lane, r = chunk / 4, part = chunk % 4;
    *reinterpret_cast<uint4*>(q_row + (r0 + row + r) * cols + c0 + half * 64 + part * 16) =
        *reinterpret_cast<const uint4*>(&row_codes[warp][r * 64 + part * 16]);
  }

  // Column direction: this thread's 32 rows of each of its two columns are two 16-byte chunks
  // of that column's line of q_col; once the tile is staged, each thread stores whole chunks of
  // whole 128-byte lines.
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const int c = col + k;
    const float inv = col_inv[c];
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
    const int swizzle = (c / 2) % 8, chunk = row / 16;
    *reinterpret_cast<uint4*>(&col_codes[c * TILE + ((chunk ^ swizzle) * 16)]) =
        make_uint4(words[0], words[1], words[2], words[3]);
    *reinterpret_cast<uint4*>(&col_codes[c * TILE + (((chunk + 1) ^ swizzle) * 16)]) =
        make_uint4(words[4], words[5], words[6], words[7]);
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < TILE * TILE / 16 / THREADS; ++j) {
    const int index = j * THREADS + tid, c = index / 8, part = index % 8;
    *reinterpret_cast<uint4*>(q_col + (c0 + c) * rows + r0 + part * 16) =
        *reinterpret_cast<const uint4*>(&col_codes[c * TILE + ((part ^ ((c / 2) % 8)) * 16)]);
  }

  if (stats != nullptr) {
    atomicAdd(&tile_stats[1], saturated);
    atomicAdd(&tile_stats[2], flushed);
    __syncthreads();
    if (tid < 3) stats[blockIdx.x * 3 + tid] = tile_stats[tid];
  }
}

}  // namespace

// x: [rows, cols] contiguous, both multiples of 128, 4-byte aligned (8-byte for fp32).
// stats: nullptr, or [tiles, 3] floats per tile (amax of the tile, saturated and flushed counts
// of q_row). Grid: one CTA of 256 threads per 128x128 tile, tiles in row-major order.
template <typename T, class F>
__global__ void __launch_bounds__(THREADS, LP_TILES_MIN_CTAS)
lp_cast_tiles_both(const T* __restrict__ x, long long rows, long long cols,
                   unsigned char* __restrict__ q_row, float* __restrict__ s_row,
                   unsigned char* __restrict__ q_col, float* __restrict__ s_col,
                   float* __restrict__ stats) {
  cast_tiles_both<T, F>(x, rows, cols, q_row, s_row, q_col, s_col, stats);
}
