// W4A16 GEMM for M > 8 (Marlin-class): a block computes 16, 32 or 64 rows (MT m16 tiles) x 128 columns over its K
// slice, in stages of 128 K that a 4-deep cp.async pipeline brings from global to shared memory (activations,
// mma-ordered 4-bit weights, the stage's scales and zero points) while the tensor cores work on the oldest one.
//
// 8 warps: 4 along N (32 columns, 4 n8 tiles each) x 2 along K (warp k owns 32-wide K steps 2 k, 2 k + 1 of every
// stage; 128 registers, so 2 blocks share a multiprocessor).
// A warp's A fragments come from shared memory by ldmatrix (the activation rows are XOR-swizzled in 16-byte
// chunks, so the 8 rows of a matrix hit 8 different bank groups); its B fragments are one 16-byte read per 4
// columns of one word row, dequantized in registers as ((magic + q) - (magic + z)) * s in the activation dtype
// (exact but for the one rounding of the product) and used for all MT m tiles. The K warps' fp32 sums meet in
// shared memory at the end; K slices across blocks meet in the split-K workspace (mma.cuh: finish_split).
//
// Why the weights are reordered (kernels.h: mma order): an mma takes from lane (gi, gc) the k pairs (2 gc, 2 gc + 1)
// and (2 gc + 8, 2 gc + 9) of each k16, which ldmatrix delivers from activations stored as they are; in the GPTQ
// layout those codes sit in two words shared by the quad. Reordered, the 8 codes of one word are exactly the lane's
// pairs for two k16 mmas, and (nibble i, nibble i + 4) is one and-or away from a (magic + q) pair.
//
// With a code table (bitsandbytes NF4 / FP4: WNA16Params::code_table, kTable) the words hold the same pairs as
// adjacent nibbles, a register-held table turns them into values (mma.cuh: CodeTable), the scales are the resolved
// absmax and no zero points are copied.
#include "mma.cuh"

namespace quantkit {
namespace {

using namespace detail;

constexpr int kStages = 4;      // cp.async pipeline depth
constexpr int kWarpsN = 4;      // warps along N (32 columns each); kWarps / kWarpsN along K
constexpr int kWarpsK = kWarps / kWarpsN;
constexpr int kWarpCols = kGemmTileN / kWarpsN;
constexpr int kStepsPerStage = kGemmStageK / 32;
constexpr int kWarpSteps = kStepsPerStage / kWarpsK;  // 32-wide K steps per warp and stage
static_assert(kWarpCols == 32, "a lane's one 16-byte weight read covers its 4 n8 tiles");
constexpr int kBRowBytes = kGemmTileN * 4 + 32;  // == 32 mod 128: a quad's 4 word rows x 2 lanes hit 8 bank groups

// One stage in shared memory: activations [16 MT rows][128 k] (swizzled), weights [16 word rows][128 columns],
// scales [4 steps][128 columns], zero points [4 steps][16 words].
struct GemmSmem {
  int a_off, b_off, s_off, z_off, stage, bytes;
};

__host__ __device__ inline GemmSmem gemm_smem(int mt) {
  GemmSmem s;
  s.a_off = 0;
  s.b_off = 16 * mt * kGemmStageK * 2;
  s.s_off = s.b_off + (kGemmStageK / 8) * kBRowBytes;
  s.z_off = s.s_off + kStepsPerStage * kGemmTileN * 2;
  s.stage = s.z_off + kStepsPerStage * (kGemmTileN / 8) * 4;
  const int reduce = (kWarpsK - 1) * kWarpsN * 32 * (mt * 4 * 4) * 4;  // the upper K warps' partials
  s.bytes = max(kStages * s.stage, reduce);
  return s;
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// Byte offset of 16-byte chunk `chunk` of activation row `row` in a stage (rows of 256 bytes, chunks XOR row % 8).
__device__ __forceinline__ int a_offset(int row, int chunk) {
  return row * (kGemmStageK * 2) + ((chunk ^ (row & 7)) << 4);
}

// What one thread copies of every stage, fixed for the block: its activation chunk (column c of rows r0 + 16 i),
// its weight chunk (4 columns of word rows r0 + 8 i) and, for threads < 128, one scale chunk or zero-point word.
// Stage st then only adds st's K offset.
template <int MT>
struct StageCopies {
  const uint16_t* a_src;
  const uint32_t* b_src;
  int a_dst, b_dst, a_k, b_row, sz_dst, sz_col, sz_step;
  uint32_t a_rows;  // bit i: row r0 + 16 i < M
  bool b_ok, sz_ok;

  __device__ StageCopies(const WNA16Params& p, const uint16_t* x, int M, int n0, const GemmSmem& lay) {
    const int t = threadIdx.x;
    const int ac = t & 15, ar = t >> 4;
    a_k = 8 * ac;
    a_src = x + static_cast<size_t>(ar) * p.K + a_k;
    a_dst = lay.a_off + a_offset(ar, ac);
    a_rows = 0;
#pragma unroll
    for (int i = 0; i < MT; ++i) a_rows |= static_cast<uint32_t>(ar + 16 * i < M) << i;
    const int bc = t & 31;
    b_row = t >> 5;
    b_ok = n0 + 4 * bc < p.N;
    b_src = p.qweight + static_cast<size_t>(b_row) * p.N + (b_ok ? n0 + 4 * bc : 0);
    b_dst = lay.b_off + b_row * kBRowBytes + 16 * bc;
    constexpr int kChunks = kGemmTileN / 8;  // scale chunks (and zero-point words) per step
    const int i = t % (kStepsPerStage * kChunks), c = i % kChunks;
    sz_step = i / kChunks;
    sz_col = n0 + 8 * c;
    sz_ok = t < 2 * kStepsPerStage * kChunks && sz_col < p.N;
    sz_dst = t < kStepsPerStage * kChunks ? lay.s_off + sz_step * kGemmTileN * 2 + 16 * c
                                           : lay.z_off + sz_step * kChunks * 4 + 4 * c;
  }

  // Stage st's activations.
  __device__ __forceinline__ void issue_x(const WNA16Params& p, uint32_t base, int st) const {
    const int k0 = st * kGemmStageK;
    const bool k_ok = k0 + a_k < p.K;
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const bool ok = k_ok && ((a_rows >> i) & 1);
      cp_async<16>(base + a_dst + i * 16 * kGemmStageK * 2, a_src + (ok ? static_cast<size_t>(16 * i) * p.K + k0 : 0),
                   ok);
    }
  }

  // Stage st's weights: codes, scales, zero points.
  __device__ __forceinline__ void issue_w(const WNA16Params& p, uint32_t base, int st) const {
    const int k0 = st * kGemmStageK;
    const int word_rows = (p.K + 31) / 32 * 4;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int row = k0 / 8 + 8 * i;
      const bool ok = b_ok && row + b_row < word_rows;
      cp_async<16>(base + b_dst + 8 * i * kBRowBytes, b_src + (ok ? static_cast<size_t>(row) * p.N : 0), ok);
    }
    const int step = k0 / 32 + sz_step;
    const bool ok = sz_ok && step * 32 < p.K;
    const size_t g = ok ? step / p.group_steps : 0;
    if (threadIdx.x < kStepsPerStage * (kGemmTileN / 8)) {
      cp_async<16>(base + sz_dst, static_cast<const uint16_t*>(p.scales) + (ok ? g * p.N + sz_col : 0), ok);
    } else if (threadIdx.x < 2 * kStepsPerStage * (kGemmTileN / 8) && p.qzeros) {
      cp_async<4>(base + sz_dst, p.qzeros + (ok ? g * (p.N / 8) + sz_col / 8 : 0), ok);
    }
  }

  __device__ __forceinline__ void issue(const WNA16Params& p, uint32_t base, int st) const {
    issue_x(p, base, st);
    issue_w(p, base, st);
  }
};

template <typename T, int MT, bool kTable>
__global__ void __launch_bounds__(kThreads, 2) wna16_gemm_kernel(const WNA16Params p) {
  extern __shared__ __align__(128) char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, gc = lane & 3;
  const int wn = warp % kWarpsN, wk = warp / kWarpsN;
  const RowBlock<T> rows(p.x, p.out, p.split, p.M, p.N, p.K, 16 * MT, kGemmTileN, blockIdx.x);
  const int n0 = rows.n_tile * kGemmTileN, M = rows.M;
  const int stages = (p.K + kGemmStageK - 1) / kGemmStageK, spb = p.split.steps_per_block;
  const int st_begin = blockIdx.y * spb, count = min(stages, st_begin + spb) - st_begin;
  const GemmSmem lay = gemm_smem(MT);
  const StageCopies<MT> copies(p, reinterpret_cast<const uint16_t*>(rows.x), M, n0, lay);
  const CodeTable table = kTable ? CodeTable(static_cast<const uint16_t*>(p.code_table)) : CodeTable();

  float acc[MT][4][4] = {};
  const int lc = kWarpCols * wn + 4 * gi;  // the lane's B columns: lc + j of n-tile j
  uint32_t s2[4], mz2[4] = {};              // per n-tile: (s, s) and (magic + z, magic + z) of the step's group
  auto group_regs = [&](const char* base, int ls) {
    const uint2 sv = *reinterpret_cast<const uint2*>(base + lay.s_off + ls * kGemmTileN * 2 + 2 * lc);
#pragma unroll
    for (int j = 0; j < 4; ++j) s2[j] = __byte_perm((j & 2) ? sv.y : sv.x, 0, (j & 1) ? 0x3232 : 0x1010);
    if constexpr (!kTable) {
      const uint32_t zw =
          *reinterpret_cast<const uint32_t*>(base + lay.z_off + ls * (kGemmTileN / 8) * 4 + 4 * (lc / 8));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        mz2[j] = __byte_perm(and_or(zw >> (16 * (gi & 1) + 4 * j), 0xFu, Act<T>::kMagic2), 0, 0x1010);
      }
    }
  };
  // One stage: this warp's kWarpSteps 32-wide K steps of it, for its 32 columns and all MT m tiles.
  auto compute = [&](int buf) {
    const char* base = smem + buf * lay.stage;
#pragma unroll
    for (int h = 0; h < kWarpSteps; ++h) {
      const int ls = kWarpSteps * wk + h;
      if (h == 0 || p.group_steps == 1) group_regs(base, ls);
      const uint4 w = *reinterpret_cast<const uint4*>(base + lay.b_off + (4 * ls + gc) * kBRowBytes + 4 * lc);
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
      uint32_t b[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j) dequant_word<T, kTable>(words[j], mz2[j], s2[j], table, b[j]);
#pragma unroll
      for (int t = 0; t < MT; ++t) {
        uint32_t a0[4], a1[4];
        const int row = 16 * t + (lane & 7) + 8 * ((lane >> 3) & 1), chunk = 4 * ls + (lane >> 4);
        ldmatrix_x4(a0, base + lay.a_off + a_offset(row, chunk));
        ldmatrix_x4(a1, base + lay.a_off + a_offset(row, chunk + 2));
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          Act<T>::mma(acc[t][j], a0, b[j][0], b[j][1]);
          Act<T>::mma(acc[t][j], a1, b[j][2], b[j][3]);
        }
      }
    }
  };

  // The first stages' weights are in flight before the wait for the activations (the first commit group holds
  // them all, so waiting for stage 0 waits for them too).
  let_dependents_launch();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) copies.issue_w(p, smem_addr(smem + s * lay.stage), st_begin + s);
  }
  wait_for_inputs();
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) copies.issue_x(p, smem_addr(smem + s * lay.stage), st_begin + s);
    cp_async_commit();
  }
  for (int it = 0; it < count; ++it) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage `it` is in, and every warp is done with the buffer the next copies overwrite
    if (it + kStages - 1 < count) {
      copies.issue(p, smem_addr(smem + (it + kStages - 1) % kStages * lay.stage), st_begin + it + kStages - 1);
    }
    cp_async_commit();
    compute(it % kStages);
  }
  cp_async_wait<0>();
  __syncthreads();

  // The upper K warps' sums meet in K warp 0 (in shared memory, [warp][register][lane]).
  constexpr int kRegs = MT * 4 * 4;
  float* red = reinterpret_cast<float*>(smem);
  if (wk > 0) {
    float* slot = red + (((wk - 1) * kWarpsN + wn) * kRegs) * 32 + lane;
#pragma unroll
    for (int t = 0; t < MT; ++t)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) slot[((t * 4 + j) * 4 + r) * 32] = acc[t][j][r];
  }
  __syncthreads();
  if (wk == 0) {
#pragma unroll
    for (int w = 1; w < kWarpsK; ++w) {
      const float* slot = red + (((w - 1) * kWarpsN + wn) * kRegs) * 32 + lane;
#pragma unroll
      for (int t = 0; t < MT; ++t)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[t][j][r] += slot[((t * 4 + j) * 4 + r) * 32];
    }
    // C register r of n-tile j (m tile t): row 16 t + gi + 8 (r / 2), B column 2 gc + r % 2, i.e. column
    // 32 wn + 4 (2 gc + r % 2) + j: the 4 n-tiles are 4 consecutive columns.
    const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
    for (int t = 0; t < MT; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int m = 16 * t + gi + 8 * (r >> 1), n = n0 + kWarpCols * wn + 8 * gc + 4 * (r & 1);
        if (m >= M || n >= p.N) continue;
        const float v[4] = {acc[t][0][r], acc[t][1][r], acc[t][2][r], acc[t][3][r]};
        const size_t at = static_cast<size_t>(m) * p.N + n;
        if (rows.split.splits > 1) {
          red_add4(rows.split.ws + at, v[0], v[1], v[2], v[3]);
        } else {
          float o[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) o[e] = bias ? v[e] + Act<T>::to_float(bias[n + e]) : v[e];
          *reinterpret_cast<uint2*>(rows.out + at) = make_uint2(Act<T>::pack(o[0], o[1]), Act<T>::pack(o[2], o[3]));
        }
      }
    }
  }
  finish_split<T, 4, 8>(rows.split, rows.out, static_cast<const T*>(p.bias), M, p.N, blockIdx.x, n0, kGemmTileN);
}

template <typename T, int MT>
cudaError_t launch_t(const WNA16Params& p, int rows, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(gemm_tiles(p.M, p.N, rows)), p.split.splits);
  return p.code_table ? launch(wna16_gemm_kernel<T, MT, true>, p, grid, gemm_smem(MT).bytes, stream)
                      : launch(wna16_gemm_kernel<T, MT, false>, p, grid, gemm_smem(MT).bytes, stream);
}

}  // namespace

int wna16_gemm_smem_bytes(int rows) { return gemm_smem(rows / 16).bytes; }

cudaError_t launch_wna16_gemm(const WNA16Params& p, int rows, cudaStream_t stream) {
  switch (rows) {
    case 16: return p.bf16 ? launch_t<__nv_bfloat16, 1>(p, rows, stream) : launch_t<__half, 1>(p, rows, stream);
    case 32: return p.bf16 ? launch_t<__nv_bfloat16, 2>(p, rows, stream) : launch_t<__half, 2>(p, rows, stream);
    case 64: return p.bf16 ? launch_t<__nv_bfloat16, 4>(p, rows, stream) : launch_t<__half, 4>(p, rows, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quantkit
