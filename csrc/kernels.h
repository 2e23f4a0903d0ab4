// The 4-bit kernels (gemv.cu: small-M GEMVs; wna16_gemm.cu: the W4A16 GEMM) and their launch parameters. Plain C++
// types only: the binding (bindings.cpp) checks torch tensors and fills these; the .cu files never see a torch
// header.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace quantkit {

// Both kernels: 8 warps per block, a block per output tile (N tile x block of 8 to 64 rows of M) and K slice
// (`splits`); the slices' fp32 partials meet in `ws` and the last block of each output tile writes the output.
struct SplitK {
  float* ws;   // zero-filled fp32 [>= M * N], left zero again
  int* cnt;    // zero-filled int32 [>= output tiles], left zero again
  int splits;  // K slices (1: no workspace use)
  int steps_per_block;
};

// W4A16 in the WNA16 kernel format (quant/wna16.py): W[k, n] = s[k / G, n] * (q[k, n] - z[k / G, n]). The GEMMs
// also take 4-bit codes into a table (bitsandbytes NF4 / FP4, kernels/cuda_gemm.py: nf4_operands):
// W[k, n] = s[k / G, n] * table[q[k, n]], s the resolved absmax and G the blocksize.
struct WNA16Params {
  const void* x;           // [M, K] bf16 / fp16, contiguous
  const uint32_t* qweight; // [K / 8, N] int32, 8 codes per word along K (LSB first); the GEMMs: mma order (below)
  const uint32_t* qzeros;  // [NG, N / 8] int32, 8 zero codes per word along N; null with a code table
  const void* code_table;  // the GEMMs: [16] activation dtype, or null (integer codes with zero points)
  const void* scales;      // [NG, N] activation dtype
  const int32_t* perm;     // [K] or null: activation column of weight row k (act-order)
  const void* bias;        // [N] or null
  void* out;               // [M, N]
  int M, N, K, NG;
  int group_steps;         // 32-wide K steps per group (G / 32; a per-channel layer: all steps)
  bool bf16;
  SplitK split;
};

// bitsandbytes 4-bit (quant/nf4.py): W[n, k] = code4[q[n, k]] * absmax[n, k / B], absmax double-quantized
// (uint8 codes into ncode, scaled and offset per nested group) or plain fp32.
struct NF4Params {
  const void* x;             // [M, K] bf16 / fp16, contiguous
  const uint8_t* packed;     // [N, K / 2], even k in the high nibble (16-byte aligned rows: K % 32 == 0)
  const void* absmax;        // [N, K / B] uint8 codes (double quant) or fp32
  const float* code4;        // [16]
  const float* ncode;        // [256] (double quant)
  const float* nabs;         // [G] (double quant)
  const float* noff;         // [G] (double quant)
  const int32_t* row_group;  // [N]: nested group of row n's first block (double quant)
  const int32_t* row_block;  // [N]: row n's first block within its shard (double quant)
  const void* bias;          // [N] or null
  void* out;                 // [M, N]
  int M, N, K, blocksize;
  bool double_quant;
  bool bf16;
  SplitK split;
};

// Per-token dynamic quant of 16-bit activations (row_quant.cu, sm_90+): codes[t, c] and scale[t] of x[t, :cols],
// or of silu(x[t, c]) * x[t, cols + c] with silu_mul. One cluster of `cluster_size` blocks of `block_threads`
// threads per row, 8 columns per thread (cols % 8 == 0, rows of x 16-byte aligned).
struct RowQuantParams {
  const void* x;    // [rows, cols] or [rows, 2 cols] (gate | up), unit stride along a row
  int64_t stride_x; // elements between rows of x
  void* q;          // [rows, cols] int8 or float8_e4m3fn, contiguous
  float* scale;     // [rows]
  int64_t rows;
  int cols, cluster_size, block_threads;
  bool silu_mul, int8, bf16;
};
cudaError_t launch_row_quant(const RowQuantParams& p, cudaStream_t stream);

// Columns (WNA16) / weight rows (NF4) per block, and the K covered by one step of a warp.
constexpr int kWNA16TileN = 256;
constexpr int kWNA16StepK = 32;
constexpr int kNF4TileN = 128;
constexpr int kNF4StepK = 128;

// Rows of M per block (the kernels' template MT), capped per format, and output tiles (N tiles x M blocks) for a
// launch. WNA16 stops at 32 rows: at M = 64 two 32-row blocks (2 per multiprocessor, the weight tile read once from
// HBM and once from L2) beat one 64-row block (1 per multiprocessor by its registers) by 7-11% on an H100; NF4's
// 64-row block was as fast.
constexpr int kWNA16MaxRows = 32;
constexpr int kNF4MaxRows = 64;
inline int block_rows(int m, int max_rows) {
  const int rows = m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : 64;
  return rows < max_rows ? rows : max_rows;
}
inline int output_tiles(int m, int n, int tile_n, int max_rows) {
  const int rows = block_rows(m, max_rows);
  return (n + tile_n - 1) / tile_n * ((m + rows - 1) / rows);
}

// Programmatic dependent launch (Hopper and later): launches of up to `max_rows` rows of M (0, the default: none;
// kernels/pdl.py sets it) start while the kernel before them in the stream finishes and stream their first weights
// before they wait for its output (mma.cuh: wait_for_inputs), so a decode step's launch gaps and kernel tails
// overlap the weight stream.
void set_programmatic_launch(int64_t max_rows);
bool programmatic_launch(int rows);

cudaError_t launch_wna16(const WNA16Params& p, cudaStream_t stream);

// The W4A16 GEMM (wna16_gemm.cu) for M > 8: blocks of kGemmTileN columns x 16, 32 or 64 rows, K in stages of
// kGemmStageK (split.steps_per_block counts stages), no perm (act-order's activations come permuted). Its qweight
// is in mma order: [K32 / 8, N] (K32 = K rounded up to 32, the padding codes 0), where within each 32 rows of K
// nibble i (LSB first) of word row c < 4 holds the code of row 2 c + 8 (i % 4) + i / 4 (cuda_gemm.py: mma_order):
// the rows whose B fragments lane c of a quad feeds to two k16 mmas, so the activations enter the mma as stored.
// With a code table the same rows sit at nibble 2 (i % 4) + i / 4 (adjacent pairs: mma.cuh, CodeTable::lookup).
constexpr int kGemmTileN = 128;
constexpr int kGemmStageK = 128;
inline int wna16_gemm_rows(int64_t m) {  // rows of M per block
  return m <= 16 ? 16 : block_rows(static_cast<int>(m < 64 ? m : 64), 64);
}
int wna16_gemm_smem_bytes(int rows);     // dynamic shared memory of a block of `rows` rows
// The W4A16 GEMM on Hopper's wgmma (wna16_wgmma.cu, sm_90a) for large M: blocks of 128 columns x 128 or 256 rows
// of M (the caller's choice), K in stages of 64 (split.steps_per_block counts stages), the same mma-order qweight,
// no perm (act-order's activations come permuted).
constexpr int kWgmmaTileN = 128;
constexpr int kWgmmaStageK = 64;
// Both GEMMs: blocks of `rows` rows of M (wna16_gemm_rows(M) for the mma.sync GEMM; 128 or 256 for wgmma) x
// 128 columns, one per output tile (blockIdx.x) and K slice (blockIdx.y).
static_assert(kGemmTileN == kWgmmaTileN, "one tile grid for both GEMMs");
inline int64_t gemm_tiles(int64_t m, int64_t n, int rows) {
  return (n + kGemmTileN - 1) / kGemmTileN * ((m + rows - 1) / rows);
}
cudaError_t launch_wna16_gemm(const WNA16Params& p, int rows, cudaStream_t stream);
cudaError_t launch_wna16_wgmma(const WNA16Params& p, int rows, cudaStream_t stream);
// out[m, k] = x[m, perm[k]] for 16-bit x [M, K] (K % 8 == 0, perm 16-byte aligned): act-order's activations.
cudaError_t launch_permute_cols(const void* x, const int32_t* perm, void* out, int M, int K, cudaStream_t stream);
cudaError_t launch_nf4(const NF4Params& p, cudaStream_t stream);
// Dynamic shared memory of one NF4 block of `rows` rows of M staging `steps_per_block` K steps: the binding checks
// a launch against the device, cuda_gemv.py takes the longest slices at which a multiprocessor still holds the
// kernel's blocks.
int nf4_smem_bytes(int rows, int steps_per_block);

}  // namespace quantkit
