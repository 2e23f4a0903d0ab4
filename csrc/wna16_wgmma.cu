// W4A16 GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a) for M in the hundreds and beyond, where mma.sync
// (wna16_gemm.cu) cannot keep up with cuBLAS's bf16 wgmma. It computes the product transposed, out^T = W x^T: the
// weight is wgmma's A operand, dequantized in registers straight into A's fragment layout, and the activations are
// its B operand, read by the tensor cores from shared memory where one TMA copy per stage put them (swizzled as wgmma
// reads them, rows past M and K zero-filled by the copy engine). Nothing dequantized goes back to shared memory, so
// a stage costs no tile stores, no proxy fence and no second barrier (the first version of this kernel dequantized
// into a shared B tile every stage and reached 0.44x bf16 cuBLAS at M = 256).
//
// A block: 2 warpgroups x 64 weight columns (N) = 128 columns, x MT rows of M (128 or 256: one or two m64n128k16 per
// k16 step and warpgroup, on the same A registers), K in stages of 64 through a 5-slot ring: activations [MT][64]
// 128-byte swizzled (TMA, completing on the slot's mbarrier), the stage's 8 word rows of the weight, its scales and
// zero points (cp.async, one 16-byte copy per thread).
// The weight is the mma.sync GEMM's mma order (kernels.h): lane (g, c) of warp w needs, per 32 K, the A fragments of
// weight columns 16 w + g and 16 w + g + 8 for two k16 steps, which are exactly word row c of those two columns.
//
// Order within an iteration (it): wait for stage it's weight copies, barrier, refill the slot of stage it - 2 with
// stage it + 3 (thread 0 starts its TMA), build stage it's A fragments (its own register set: the two sets
// alternate, so the wgmmas still reading the other set are not disturbed), issue stage it's wgmmas, wait for stage
// it - 1's. A slot is refilled only after
// the barrier that follows every warpgroup's wait for the wgmmas that read it; the fragments are built before the
// wait for the slot's activations. (Issuing the wgmmas before the refill's copies, two wgmma stages in flight, and
// four ring slots measured no faster on an H100.)
//
// Epilogue: the fp32 accumulators (weight column x token) go through shared memory, transposed, and leave as rows
// of 4 columns: 16-byte reductions into the split-K workspace or 8-byte stores with the bias.
//
// bitsandbytes NF4 / FP4 run through the same kernel (kTable): codes into a 16-entry table held in registers
// (mma.cuh: CodeTable: per word of 8 codes 22 integer operations and 4 multiplies, against 7 integer operations, 4
// subtractions and 4 multiplies for integer codes), the absmax as scales, no zero points. H100, 8B shapes, one run:
// 0.77 / 0.82x bf16 at M = 256 / 1024 against AWQ's 0.89 / 0.89x.
//
// Measured (H100, 8B shapes, AWQ, geomean over bf16 cuBLAS): 1.26x at M = 64, 1.11x at 128, 0.83x at 256, 0.81x at
// 512, 0.88x at 1024, 0.87x at 4096. With the activations copied by cp.async from every thread it was 0.69x at 256 and
// 0.79-0.81x from 1024 (alternating runs): ncu of that version at 4096 x 4096 x 4096 showed the tensor pipe 58% busy,
// 36 warp instructions per wgmma, a third of them the copies' address arithmetic, and the warps' stall samples at the
// stage barrier (22%) and on fixed-latency waits (32%). The weights, scales and zero points by TMA too (six copies
// per stage from warp 0's lanes, dense word rows, the fragments built after the slot's mbarrier wait) measured
// slower: 0.63 / 0.79 / 0.82x against 0.78 / 0.88 / 0.88x at M = 256 / 1024 / 4096, builds alternated in one call.
// What bounds it (H100, ncu, 4096^3, AWQ, 256-row blocks): the tensor pipe is 77% busy against cuBLAS's 95%, and both
// kernels move data out of L2 at ~5.0 TB/s, this one 1.25 GB (36 KB per block and stage, 32 KB of it activations)
// against cuBLAS's 1.04 GB, so L2 traffic per multiply is the lever, not the pipeline. Tried and dropped
// (2026-11-22, alternating builds in one call, geomean over the 8B shapes): warp specialization (a producer
// warpgroup filling a 6-10 slot ring through full/empty mbarriers, consumers at 232 registers by setmaxnreg; 384
// threads, so one block per multiprocessor) 0.93-0.96x bf16 at M = 1024 against 0.91-0.93x, but 0.74x against
// 0.84-0.87x at M = 256 and 1.09-1.12x against 1.19-1.26x at M = 64, where two 128-row blocks per multiprocessor
// won; on top of it, clusters of two blocks sharing each stage's activations by TMA multicast ran 2x slower with
// more L2 traffic (1.55 GB), cause not found.
#include <cuda.h>
#include <cudaTypedefs.h>

#include "mma.cuh"

// A device pass for an architecture without wgmma (the extension's sm_80 / sm_89 builds) compiles an empty kernel.
#if defined(__CUDA_ARCH__) && !(__CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define QUANTKIT_NO_WGMMA
#endif

namespace quantkit {
namespace {

using namespace detail;

constexpr int kTileN = kWgmmaTileN;            // weight columns per block: 64 per warpgroup
constexpr int kStageK = kWgmmaStageK;
constexpr int kStages = 5;                     // ring slots
constexpr int kRowBytes = kStageK * 2;         // one 128-byte swizzle row per activation row
constexpr int kWordRows = kStageK / 8;         // two 32-K blocks of 4 word rows (mma order)
constexpr int kWRowBytes = (kTileN + 8) * 4;   // padded: a warp's 4 word rows x 8 columns hit 32 banks
constexpr int kWBytes = kWordRows * kWRowBytes;
constexpr int kSBytes = 2 * kTileN * 2;        // scales of the stage's two 32-K halves
constexpr int kZBytes = 2 * (kTileN / 8) * 4;  // zero-point words of the two halves
constexpr int kOutStride = kTileN + 4;         // fp32 per token row of the epilogue's tile (conflict-free writes)
static_assert(kStageK == 64 && kTileN == 128, "one swizzle row per stage, two warpgroups of 64 columns");

// Shared memory of a block of MT rows: the activation tiles first (1024-byte aligned: the swizzle's period).
template <int MT>
struct Layout {
  static constexpr int kABytes = MT * kRowBytes;
  static constexpr int kWOff = kStages * kABytes;
  static constexpr int kSOff = kWOff + kStages * kWBytes;
  static constexpr int kZOff = kSOff + kStages * kSBytes;
  static constexpr int kPipe = kZOff + kStages * kZBytes;
  static constexpr int kOut = MT * kOutStride * 4;
  static constexpr int kBarOff = kPipe > kOut ? kPipe : kOut;  // the slots' mbarriers, clear of the epilogue's tile
  static constexpr int kBytes = kBarOff + kStages * 8 + 1024;   // + the slack that aligns the base
};

#ifndef QUANTKIT_NO_WGMMA
// wgmma shared-memory descriptor of a K-major, 128-byte-swizzled tile at `addr`: 8-row core groups 1024 bytes apart.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// D[64 x 128] += A (registers: this warp's m16 x k16 fragment) x B (shared, descriptor b), fp32 accumulators.
#define QUANTKIT_WGMMA_M64N128K16_RS(type)                                                                   \
  asm volatile(                                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                            \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, " \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b))

template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  if constexpr (Act<T>::kBf16) QUANTKIT_WGMMA_M64N128K16_RS("bf16");
  else QUANTKIT_WGMMA_M64N128K16_RS("f16");
}

#undef QUANTKIT_WGMMA_M64N128K16_RS

// Keeps the compiler from moving accumulator reads or writes across a wgmma wait.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// What one thread copies of every stage besides the activations (TMA): one 16-byte word chunk (4 columns of one
// word row) and, for threads < 64, one scale chunk or (integer codes) one zero-point word of one 32-K half. Stages
// are issued in order, so each source is a pointer advanced by one stage per issue; the group of the scales
// advances without a division.
template <int MT>
struct StageCopies {
  const char* w_src;   // the word chunk of the next stage
  const char* sz_src;  // the scale chunk / zero-point word of group 0
  size_t w_step, sz_row;
  int w_dst, sz_dst, K, w_row, w_rows, step, group, rem, group_steps;
  bool w_ok, sz_thread, sz_ok;

  __device__ StageCopies(const WNA16Params& p, int n0, int st_begin) {
    const int t = threadIdx.x;
    const int k0 = st_begin * kStageK;
    K = p.K;
    const int wc = 4 * (t & 31);
    w_ok = n0 + wc < p.N;
    w_rows = (p.K + 31) / 32 * 4;
    w_row = k0 / 8 + (t >> 5);
    w_step = static_cast<size_t>(kWordRows) * p.N * 4;
    w_src = reinterpret_cast<const char*>(p.qweight + static_cast<size_t>(w_row) * p.N + (w_ok ? n0 + wc : 0));
    w_dst = (t >> 5) * kWRowBytes + 16 * (t & 31);
    const int half = (t >> 4) & 1, col = n0 + 8 * (t & 15);  // a scale chunk of 8 columns, or their zero word
    sz_thread = t < 32 || (t < 64 && p.qzeros != nullptr);
    sz_ok = sz_thread && col < p.N;
    step = k0 / 32 + half;
    group_steps = p.group_steps;
    group = step / group_steps;
    rem = step - group * group_steps;
    if (t < 32) {
      sz_src = reinterpret_cast<const char*>(static_cast<const uint16_t*>(p.scales) + (sz_ok ? col : 0));
      sz_row = static_cast<size_t>(p.N) * 2;
      sz_dst = Layout<MT>::kSOff + half * kTileN * 2 + 16 * (t & 15);
    } else {
      sz_src = reinterpret_cast<const char*>(p.qzeros + (sz_ok ? col / 8 : 0));
      sz_row = static_cast<size_t>(p.N / 8) * 4;
      sz_dst = Layout<MT>::kZOff + half * (kTileN / 8) * 4 + 4 * (t & 15);
    }
  }

  // The next stage's weights: codes, scales, zero points (never written during inference: safe before the
  // programmatic launch's wait).
  __device__ __forceinline__ void issue(uint32_t base, int slot) {
    const int t = threadIdx.x;
    cp_async<16>(base + Layout<MT>::kWOff + slot * kWBytes + w_dst, w_src, w_ok && w_row < w_rows);
    w_src += w_step;
    w_row += kWordRows;
    if (sz_thread) {
      const bool ok = sz_ok && step * 32 < K;
      const int slot_bytes = t < 32 ? kSBytes : kZBytes;
      const char* src = sz_src + (ok ? group * sz_row : 0);
      if (t < 32) cp_async<16>(base + sz_dst + slot * slot_bytes, src, ok);
      else cp_async<4>(base + sz_dst + slot * slot_bytes, src, ok);
      step += 2;
      for (rem += 2; rem >= group_steps; rem -= group_steps) ++group;
    }
  }
};

// The activations' TMA: one thread arms the slot's mbarrier with the tile's bytes and starts the copy of rows
// m0 .. m0 + MT - 1, columns k .. k + 63 (zero-filled past M and K; the bytes count all the same); every thread waits
// for the slot's phase before it reads the tile.
__device__ __forceinline__ void mbarrier_init(uint32_t bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
}

__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int k, int m, uint32_t bar, int bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(k), "r"(m), "r"(bar)
      : "memory");
}

__device__ __forceinline__ void mbarrier_wait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// The stage's A fragments of this thread: weight columns c0 = 64 wg + 16 warp + lane / 4 and c0 + 8 (the warp's m16
// rows), k16 step kk = 2 h + s of the 32-K half h. Word row 4 h + lane % 4 of column c holds the k pairs that
// register i % 2 of step i / 2 wants (mma order): dequant_word's register i.
template <typename T, bool kTable>
__device__ __forceinline__ void fragments(const char* stage_w, const char* stage_s, const char* stage_z, int c0,
                                          int lc, const CodeTable& table, uint32_t (&a)[4][4]) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    uint32_t r[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int col = c0 + 8 * c;
      const uint32_t s = *reinterpret_cast<const uint16_t*>(stage_s + h * kTileN * 2 + 2 * col);
      uint32_t mz2 = 0;
      if constexpr (!kTable) {
        const uint32_t zw = *reinterpret_cast<const uint32_t*>(stage_z + h * (kTileN / 8) * 4 + 4 * (col >> 3));
        const uint32_t z = (zw >> (4 * (col & 7))) & 0xF;
        mz2 = and_or(z | (z << 16), 0x000F000Fu, Act<T>::kMagic2);
      }
      const uint32_t w = *reinterpret_cast<const uint32_t*>(stage_w + (4 * h + lc) * kWRowBytes + 4 * col);
      dequant_word<T, kTable>(w, mz2, s | (s << 16), table, r[c]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      a[2 * h + i / 2][2 * (i & 1)] = r[0][i];
      a[2 * h + i / 2][2 * (i & 1) + 1] = r[1][i];
    }
  }
}

#endif  // QUANTKIT_NO_WGMMA

template <typename T, int MT, bool kTable>
__global__ void __launch_bounds__(kThreads, MT == 128 ? 2 : 1)
    wna16_wgmma_kernel(const WNA16Params p, const __grid_constant__ CUtensorMap x_map) {
#ifndef QUANTKIT_NO_WGMMA
  constexpr int kSub = MT / 128;  // n128 wgmmas per k16 step
  using L = Layout<MT>;
  constexpr int kAhead = kStages - 2;  // stages the copies run ahead (one stage's wgmmas stay in flight)
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t base = smem_addr(smem);
  const int t = threadIdx.x, wg = t >> 7, warp = (t >> 5) & 3, lane = t & 31;
  const int c0 = 64 * wg + 16 * warp + (lane >> 2), lc = lane & 3;
  const RowBlock<T> rows(p.x, p.out, p.split, p.M, p.N, p.K, MT, kTileN, blockIdx.x);
  const int n0 = rows.n_tile * kTileN, M = rows.M;
  const int stages = (p.K + kStageK - 1) / kStageK, spb = p.split.steps_per_block;
  const int st_begin = blockIdx.y * spb, count = min(stages, st_begin + spb) - st_begin;
  StageCopies<MT> copies(p, n0, st_begin);
  const CodeTable table = kTable ? CodeTable(static_cast<const uint16_t*>(p.code_table)) : CodeTable();
  const uint32_t bars = base + L::kBarOff;
  if (t == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) mbarrier_init(bars + 8 * s);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();
  auto load_x = [&](int it) {  // thread 0: stage it's activations into its slot
    const int slot = it % kStages;
    tma_load(base + slot * L::kABytes, &x_map, (st_begin + it) * kStageK, rows.m0, bars + 8 * slot, L::kABytes);
  };

  float acc[kSub][64];
#pragma unroll
  for (int u = 0; u < kSub; ++u)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[u][i] = 0.f;
#pragma unroll
  for (int u = 0; u < kSub; ++u) pin(acc[u]);  // 64 registers each before the first wgmma, not one shared zero

  // The first stages' weights (a commit group each) are in flight before the wait for the kernel that writes the
  // activations (programmatic launch); their TMA copies start after it.
  let_dependents_launch();
#pragma unroll
  for (int s = 0; s < kAhead; ++s) {
    if (s < count) copies.issue(base, s);
    cp_async_commit();
  }
  wait_for_inputs();
  if (t == 0) {
    for (int s = 0; s < kAhead && s < count; ++s) load_x(s);
  }

  // One stage with its own A register set `a` (the caller alternates two).
  auto stage = [&](int it, uint32_t (&a)[4][4]) {
    const int slot = it % kStages;
    cp_async_wait<kAhead - 1>();
    __syncthreads();
    if (it + kAhead < count) {
      copies.issue(base, (it + kAhead) % kStages);
      if (t == 0) load_x(it + kAhead);
    }
    cp_async_commit();
    fragments<T, kTable>(smem + L::kWOff + slot * kWBytes, smem + L::kSOff + slot * kSBytes,
                         smem + L::kZOff + slot * kZBytes, c0, lc, table, a);
    mbarrier_wait(bars + 8 * slot, (it / kStages) & 1);
    // The descriptor's address field is bytes / 16: the k16 steps and the second n128 tile are constant offsets.
    const uint64_t b = descriptor(base + slot * L::kABytes);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kStageK / 16; ++kk)
#pragma unroll
      for (int u = 0; u < kSub; ++u) wgmma_m64n128k16<T>(acc[u], a[kk], b + ((u * 128 * kRowBytes + 32 * kk) >> 4));
    wgmma_commit();
    wgmma_wait<1>();
  };
  uint32_t a0[4][4], a1[4][4];
  for (int it = 0; it + 1 < count; it += 2) {
    stage(it, a0);
    stage(it + 1, a1);
  }
  if (count & 1) stage(count - 1, a0);
  wgmma_wait<0>();
#pragma unroll
  for (int u = 0; u < kSub; ++u) pin(acc[u]);
  cp_async_wait<0>();
  __syncthreads();  // every slot is free: the epilogue's tile overlays the ring

  // Accumulator 4 j + r of n128 tile u: weight column c0 + 8 (r / 2), token 128 u + 8 j + 2 (lane % 4) + r % 2.
  float* tile = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int u = 0; u < kSub; ++u)
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        tile[(128 * u + 8 * j + 2 * lc + (r & 1)) * kOutStride + c0 + 8 * (r >> 1)] = acc[u][4 * j + r];
      }
  __syncthreads();
  const T* bias = static_cast<const T*>(p.bias);
  for (int idx = t; idx < M * (kTileN / 4); idx += kThreads) {
    const int m = idx / (kTileN / 4), col = 4 * (idx % (kTileN / 4)), n = n0 + col;
    if (n >= p.N) continue;
    const float4 v = *reinterpret_cast<const float4*>(tile + m * kOutStride + col);
    const size_t at = static_cast<size_t>(m) * p.N + n;
    if (rows.split.splits > 1) {
      red_add4(rows.split.ws + at, v.x, v.y, v.z, v.w);
    } else {
      float o[4] = {v.x, v.y, v.z, v.w};
      if (bias) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[e] += Act<T>::to_float(bias[n + e]);
      }
      *reinterpret_cast<uint2*>(rows.out + at) = make_uint2(Act<T>::pack(o[0], o[1]), Act<T>::pack(o[2], o[3]));
    }
  }
  finish_split<T, 4, 8>(rows.split, rows.out, bias, M, p.N, blockIdx.x, n0, kTileN);
#else
  __trap();  // built for sm_90a only; the binding refuses other devices
#endif
}

// The activations' tensor map: x [M, K] in boxes of 64 columns x `rows` rows, 128-byte swizzled (wgmma's B layout).
cudaError_t x_tensor_map(CUtensorMap* map, const WNA16Params& p, int rows) {
  static const auto encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault,
                                                           &found);
    return e == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(p.K), static_cast<cuuint64_t>(p.M)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(p.K) * 2};
  const cuuint32_t box[2] = {kStageK, static_cast<cuuint32_t>(rows)}, unit[2] = {1, 1};
  const CUresult r = encode(map, p.bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2,
                            const_cast<void*>(p.x), dims, strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

template <typename T, int MT>
cudaError_t launch_t(const WNA16Params& p, cudaStream_t stream) {
  CUtensorMap map;
  const cudaError_t e = x_tensor_map(&map, p, MT);
  if (e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(gemm_tiles(p.M, p.N, MT)), p.split.splits);
  return p.code_table ? launch(wna16_wgmma_kernel<T, MT, true>, p, grid, Layout<MT>::kBytes, stream, map)
                      : launch(wna16_wgmma_kernel<T, MT, false>, p, grid, Layout<MT>::kBytes, stream, map);
}

}  // namespace

cudaError_t launch_wna16_wgmma(const WNA16Params& p, int rows, cudaStream_t stream) {
  switch (rows) {
    case 128: return p.bf16 ? launch_t<__nv_bfloat16, 128>(p, stream) : launch_t<__half, 128>(p, stream);
    case 256: return p.bf16 ? launch_t<__nv_bfloat16, 256>(p, stream) : launch_t<__half, 256>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace quantkit
