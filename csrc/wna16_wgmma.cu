// W4A16 GEMM on Hopper's warpgroup tensor cores (wgmma, sm_90a) for M in the hundreds and beyond, where mma.sync
// (wna16_gemm.cu) cannot keep up with cuBLAS's bf16 wgmma. A block computes 128 rows x 128 columns over its K slice
// in stages of 64 K: a 3-deep cp.async pipeline brings the activations and the GPTQ-layout 4-bit words (with the
// stage's scales and zero points) to shared memory; every stage, all 256 threads dequantize the 64 x 128 weight
// tile once into a bf16 / fp16 tile in the layout wgmma reads (K-major, 128-byte rows, 128-byte swizzle), and
// each of the two warpgroups multiplies its 64 activation rows by it (4 wgmma m64n128k16, fp32 accumulators in
// registers) while the next stage is dequantized. It reads the layer's own qweight: no reordered copy. Two blocks
// share a multiprocessor (3 stages, 95 KB of shared memory, 128 registers).
//
// Measured on an H100 (8B shapes): 0.44x bf16 cuBLAS at M = 256, 0.58x at M = 1024, 0.54x at M = 4096, below the
// dequantize + cuBLAS path from M = 512, so kernel selection does not offer it (cuda_gemm.py). ncu of the first
// version (one block of 4 stages per multiprocessor, 0.40x at M = 4096): every warp runs the whole stage (copies,
// dequantization, two barriers, the wgmma issue) at one instruction per 5.4 cycles with 2 warps per scheduler,
// and the tensor pipe is 32% busy; precomputed copy pointers and a second block per multiprocessor gave the rest.
// A 256-row block (2 m64 tiles per warpgroup for the same dequantization) was no faster. The next step is warp
// specialization: producer warps that copy and dequantize into a ring of B tiles, consumer warpgroups that only
// issue wgmma.
//
// Order within an iteration (it): wait for stage it's copies, barrier, dequantize into B[it % 2], fence the
// shared-memory writes into the async proxy, barrier, issue stage it's wgmmas, wait for stage it - 1's, refill the
// pipeline slot stage it - 1 used. A warpgroup copies only its own activation rows, so its own wgmma wait frees
// them; B[it % 2] was last read by the wgmmas of stage it - 2, which every warpgroup waited for before the first
// barrier of iteration it.
#include "mma.cuh"

// A device pass for an architecture without wgmma (the extension's sm_80 / sm_89 builds) compiles an empty kernel.
#if defined(__CUDA_ARCH__) && !(__CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define QUANTKIT_NO_WGMMA
#endif

namespace quantkit {
namespace {

using namespace detail;

constexpr int kTileM = kWgmmaTileM;
constexpr int kTileN = kWgmmaTileN;
constexpr int kStageK = kWgmmaStageK;
constexpr int kStages = 3;  // 95 KB of shared memory: two blocks per multiprocessor
constexpr int kRowBytes = kStageK * 2;  // one 128-byte swizzle row per M row (A) or N column (B)
constexpr int kABytes = kTileM * kRowBytes;
constexpr int kBBytes = kTileN * kRowBytes;
constexpr int kWordRows = kStageK / 8;
// Per stage: activations [128][64] (swizzled), words [8][128], scales [2 halves of 32 K][128], zero-point words
// [2][16]; then the two dequantized weight tiles. Tiles start on 1024-byte boundaries (the swizzle's period).
constexpr int kAOff = 0;
constexpr int kBOff = kAOff + kStages * kABytes;
constexpr int kWOff = kBOff + 2 * kBBytes;
constexpr int kWBytes = kWordRows * kTileN * 4;
constexpr int kSOff = kWOff + kStages * kWBytes;
constexpr int kSBytes = 2 * kTileN * 2;
constexpr int kZOff = kSOff + kStages * kSBytes;
constexpr int kZBytes = 2 * (kTileN / 8) * 4;
constexpr int kSmemBytes = kZOff + kStages * kZBytes + 1024;  // + the slack that aligns the base to 1024 bytes
static_assert(kStageK == 64 && kTileN == 128 && kTileM % 128 == 0, "one swizzle row per stage, two warpgroups");

#ifndef QUANTKIT_NO_WGMMA
constexpr int kWgRows = kTileM / 2;        // rows per warpgroup: kWgRows / 64 m64 wgmma tiles
constexpr int kSubTiles = kWgRows / 64;
constexpr int kACopies = kWgRows / 16;     // 16-byte activation copies per thread and stage

// Byte offset of 16-byte chunk `chunk` of row `row` in a 128-byte-swizzled tile (TMA / wgmma SWIZZLE_128B).
__device__ __forceinline__ int swizzled(int row, int chunk) { return row * kRowBytes + ((chunk ^ (row & 7)) << 4); }

// wgmma shared-memory descriptor of a K-major, 128-byte-swizzled tile at `addr`: 8-row core groups 1024 bytes apart.
__device__ __forceinline__ uint64_t descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(16 >> 4) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (1ull << 62);
}

// D[64 x 128] += A (shared, descriptor a) x B (shared, descriptor b), one k16 step, fp32 accumulators in registers.
#define QUANTKIT_WGMMA_M64N128K16(type)                                                                      \
  asm volatile(                                                                                             \
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"                                                            \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." type "." type " {" \
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "l"(a), "l"(b))

template <typename T>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b) {
  if constexpr (Act<T>::kBf16) QUANTKIT_WGMMA_M64N128K16("bf16");
  else QUANTKIT_WGMMA_M64N128K16("f16");
}

#undef QUANTKIT_WGMMA_M64N128K16

// Keeps the compiler from moving accumulator reads or writes across a wgmma wait.
__device__ __forceinline__ void pin(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

__device__ __forceinline__ void wgmma_fence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// What one thread copies of every stage: kACopies activation chunks of its warpgroup's rows, one 16-byte word chunk
// (4 columns of one word row) and, for threads < 64, one scale chunk or one zero-point word of one 32-K half. The
// sources are pointers advanced by one stage per `issue` (stages are issued in order), so a stage costs the copies
// and a few adds; the group of the scales advances without a division.
struct StageCopies {
  const char* a_src;   // the chunk of the next stage's first row (rows 16 i further: + i * a_stride)
  const char* w_src;   // the word chunk of the next stage
  const char* sz_src;  // the scale chunk / zero-point word of group 0
  size_t a_stride, w_step, sz_row;
  int a_dst, sz_dst, a_k, K, w_row, w_rows, step, group, rem, group_steps;
  uint32_t a_rows;  // bit i: the row of copy i is < M
  bool w_ok, sz_ok;

  __device__ StageCopies(const WNA16Params& p, const uint16_t* x, int M, int n0, int st_begin) {
    const int t = threadIdx.x, wg = t >> 7, lt = t & 127, c = lt & 7, r = kWgRows * wg + (lt >> 3);
    const int k0 = st_begin * kStageK;
    K = p.K;
    a_k = k0 + 8 * c;
    a_stride = static_cast<size_t>(16) * p.K * 2;
    a_src = reinterpret_cast<const char*>(x + static_cast<size_t>(r) * p.K + a_k);
    a_dst = swizzled(r, c);  // rows r + 16 i keep r's swizzle (16 is a multiple of 8)
    a_rows = 0;
#pragma unroll
    for (int i = 0; i < kACopies; ++i) a_rows |= static_cast<uint32_t>(r + 16 * i < M) << i;
    const int wc = 4 * (t & 31);
    w_ok = n0 + wc < p.N;
    w_rows = p.K / 8;
    w_row = k0 / 8 + (t >> 5);
    w_step = static_cast<size_t>(kWordRows) * p.N * 4;
    w_src = reinterpret_cast<const char*>(p.qweight + static_cast<size_t>(w_row) * p.N + (w_ok ? n0 + wc : 0));
    const int half = (t >> 4) & 1, col = n0 + 8 * (t & 15);  // a scale chunk of 8 columns, or their zero word
    sz_ok = t < 64 && col < p.N;
    step = k0 / 32 + half;
    group_steps = p.group_steps;
    group = step / group_steps;
    rem = step - group * group_steps;
    if (t < 32) {
      sz_src = reinterpret_cast<const char*>(static_cast<const uint16_t*>(p.scales) + (sz_ok ? col : 0));
      sz_row = static_cast<size_t>(p.N) * 2;
      sz_dst = kSOff + half * kTileN * 2 + 16 * (t & 15);
    } else {
      sz_src = reinterpret_cast<const char*>(p.qzeros + (sz_ok ? col / 8 : 0));
      sz_row = static_cast<size_t>(p.N / 8) * 4;
      sz_dst = kZOff + half * (kTileN / 8) * 4 + 4 * (t & 15);
    }
  }

  __device__ __forceinline__ void issue(uint32_t base, int slot) {
    const int t = threadIdx.x;
    const bool k_ok = a_k < K;
#pragma unroll
    for (int i = 0; i < kACopies; ++i) {
      const bool ok = k_ok && ((a_rows >> i) & 1);
      cp_async<16>(base + kAOff + slot * kABytes + a_dst + 16 * i * kRowBytes, ok ? a_src + i * a_stride : a_src,
                   ok);
    }
    a_src += kRowBytes;
    a_k += kStageK;
    const bool w_in = w_ok && w_row < w_rows;
    cp_async<16>(base + kWOff + slot * kWBytes + 16 * t, w_src, w_in);
    w_src += w_step;
    w_row += kWordRows;
    if (t < 64) {
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

// Dequantizes the stage's 64 x 128 weight tile into the wgmma B tile `b` (column n = K-major row n). Thread t owns
// column t % 128 and word rows 4 h .. 4 h + 3 (h = t / 128: one 32-K half, so one group). A word's 8 codes are K
// rows k .. k + 7: (nibble i, nibble i + 4) dequantize as one pair, and two byte permutes make the pairs (k, k + 1).
template <typename T>
__device__ __forceinline__ void dequantize(const char* stage_w, const char* stage_s, const char* stage_z, char* b) {
  const int t = threadIdx.x, n = t & 127, h = t >> 7;
  const uint16_t s = *reinterpret_cast<const uint16_t*>(stage_s + h * kTileN * 2 + 2 * n);
  const uint32_t zw = *reinterpret_cast<const uint32_t*>(stage_z + h * (kTileN / 8) * 4 + 4 * (n >> 3));
  const uint32_t z = (zw >> (4 * (n & 7))) & 0xF;
  const uint32_t s2 = s | (static_cast<uint32_t>(s) << 16);
  const uint32_t mz2 = and_or(z | (z << 16), 0x000F000Fu, Act<T>::kMagic2);
#pragma unroll
  for (int j = 4 * h; j < 4 * h + 4; ++j) {
    const uint32_t word = *reinterpret_cast<const uint32_t*>(stage_w + (j * kTileN + n) * 4);
    uint32_t d[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) d[i] = Act<T>::dequant(and_or(word >> (4 * i), 0x000F000Fu, Act<T>::kMagic2), mz2, s2);
    const uint4 v = make_uint4(__byte_perm(d[0], d[1], 0x5410), __byte_perm(d[2], d[3], 0x5410),
                               __byte_perm(d[0], d[1], 0x7632), __byte_perm(d[2], d[3], 0x7632));
    *reinterpret_cast<uint4*>(b + swizzled(n, j)) = v;
  }
}

#endif  // QUANTKIT_NO_WGMMA

template <typename T>
__global__ void __launch_bounds__(kThreads, 2) wna16_wgmma_kernel(const WNA16Params p) {
#ifndef QUANTKIT_NO_WGMMA
  extern __shared__ __align__(1024) char smem_raw[];
  char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const uint32_t base = smem_addr(smem);
  const int t = threadIdx.x, wg = t >> 7, warp = (t >> 5) & 3, lane = t & 31;
  const RowBlock<T> rows(p.x, p.out, p.split, p.M, p.N, p.K, kTileM, kTileN, blockIdx.x);
  const int n0 = rows.n_tile * kTileN, M = rows.M;
  const int stages = (p.K + kStageK - 1) / kStageK, spb = p.split.steps_per_block;
  const int st_begin = blockIdx.y * spb, count = min(stages, st_begin + spb) - st_begin;
  StageCopies copies(p, reinterpret_cast<const uint16_t*>(rows.x), M, n0, st_begin);
  let_dependents_launch();
  wait_for_inputs();

  float acc[kSubTiles][64];
#pragma unroll
  for (int u = 0; u < kSubTiles; ++u)
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[u][i] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) copies.issue(base, s);
    cp_async_commit();
  }
  for (int it = 0; it < count; ++it) {
    const int slot = it % kStages, buf = it & 1;
    cp_async_wait<kStages - 2>();
    __syncthreads();
    dequantize<T>(smem + kWOff + slot * kWBytes, smem + kSOff + slot * kSBytes, smem + kZOff + slot * kZBytes,
                  smem + kBOff + buf * kBBytes);
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // generic-proxy writes -> wgmma's reads
    __syncthreads();
    const uint32_t a = base + kAOff + slot * kABytes + wg * kWgRows * kRowBytes, b = base + kBOff + buf * kBBytes;
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < kStageK / 16; ++kk)
#pragma unroll
      for (int u = 0; u < kSubTiles; ++u)
        wgmma_m64n128k16<T>(acc[u], descriptor(a + u * 64 * kRowBytes + 32 * kk), descriptor(b + 32 * kk));
    wgmma_commit();
    wgmma_wait<1>();
#pragma unroll
    for (int u = 0; u < kSubTiles; ++u) pin(acc[u]);
    if (it + kStages - 1 < count) copies.issue(base, (it + kStages - 1) % kStages);
    cp_async_commit();
  }
  wgmma_wait<0>();
#pragma unroll
  for (int u = 0; u < kSubTiles; ++u) pin(acc[u]);
  cp_async_wait<0>();

  // Accumulator 4 j + r of m64 tile u: row 64 u + 16 warp + lane / 4 + 8 (r / 2) of the warpgroup's rows, column
  // 8 j + 2 (lane % 4) + r % 2.
  const T* bias = static_cast<const T*>(p.bias);
#pragma unroll
  for (int j = 0; j < 16; ++j) {
    const int n = n0 + 8 * j + 2 * (lane & 3);
    if (n >= p.N) continue;
#pragma unroll
    for (int uh = 0; uh < 2 * kSubTiles; ++uh) {
      const int u = uh >> 1, half = uh & 1;
      const int m = kWgRows * wg + 64 * u + 16 * warp + (lane >> 2) + 8 * half;
      if (m >= M) continue;
      const float v0 = acc[u][4 * j + 2 * half], v1 = acc[u][4 * j + 2 * half + 1];
      const size_t at = static_cast<size_t>(m) * p.N + n;
      if (rows.split.splits > 1) {
        atomicAdd(rows.split.ws + at, v0);
        atomicAdd(rows.split.ws + at + 1, v1);
      } else {
        const float b0 = bias ? Act<T>::to_float(bias[n]) : 0.f, b1 = bias ? Act<T>::to_float(bias[n + 1]) : 0.f;
        *reinterpret_cast<uint32_t*>(rows.out + at) = Act<T>::pack(v0 + b0, v1 + b1);
      }
    }
  }
  finish_split<T, 4>(rows.split, rows.out, bias, M, p.N, blockIdx.x, n0, kTileN);
#else
  __trap();  // built for sm_90a only; the binding refuses other devices
#endif
}

}  // namespace

cudaError_t launch_wna16_wgmma(const WNA16Params& p, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(wna16_wgmma_tiles(p.M, p.N)), p.split.splits);
  return p.bf16 ? launch(wna16_wgmma_kernel<__nv_bfloat16>, p, grid, kSmemBytes, stream)
                : launch(wna16_wgmma_kernel<__half>, p, grid, kSmemBytes, stream);
}

}  // namespace quantkit
