// Device pieces the 4-bit kernels share (gemv.cu, wna16_gemm.cu, wna16_wgmma.cu): the activation-dtype traits with
// the mma and the exact magic-number dequant, cp.async copies, the split-K epilogue, the row blocks of M and the
// launcher.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace quantkit {
namespace detail {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;

template <typename T>
__device__ __forceinline__ uint32_t bits(T v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

// What differs between bf16 and fp16 activations: the pair type, the conversions, the mma, and the magic exponent
// that turns a 4-bit code q into the 16-bit float (magic + q) with one and-or (exact: q fits in the mantissa).
#define QUANTKIT_MMA_16816(type)                                                                             \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." type "." type ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "   \
      "{%0,%1,%2,%3};\n"                                                                                      \
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))

template <typename T>
struct Act {
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  using T2 = std::conditional_t<kBf16, __nv_bfloat162, __half2>;
  static constexpr uint32_t kMagic2 = kBf16 ? 0x43004300u : 0x64006400u;  // (128, 128) | (1024, 1024)
  static constexpr float kMagic = kBf16 ? 128.f : 1024.f;

  static __device__ __forceinline__ T2 pair(uint32_t w) {
    T2 v;
    memcpy(&v, &w, 4);
    return v;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t w) {
    if constexpr (kBf16) return __bfloat1622float2(pair(w));
    else return __half22float2(pair(w));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (kBf16) return bits(__floats2bfloat162_rn(lo, hi));
    else return bits(__floats2half2_rn(lo, hi));
  }
  static __device__ __forceinline__ T from_float(float v) {
    if constexpr (kBf16) return __float2bfloat16_rn(v);
    else return __float2half_rn(v);
  }
  static __device__ __forceinline__ float to_float(T v) {
    if constexpr (kBf16) return __bfloat162float(v);
    else return __half2float(v);
  }
  // (b - mz) * s on value pairs: (magic + q) - (magic + z) is exact, the product rounds once.
  static __device__ __forceinline__ uint32_t dequant(uint32_t b, uint32_t mz, uint32_t s) {
    return bits(__hmul2(__hsub2(pair(b), pair(mz)), pair(s)));
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kBf16) QUANTKIT_MMA_16816("bf16");
    else QUANTKIT_MMA_16816("f16");
  }
};

#undef QUANTKIT_MMA_16816

// Weights are read once: no L1 allocation.
__device__ __forceinline__ uint4 load_stream16(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits_) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(bits_));  // (a & mask) | bits
  return d;
}

__device__ __forceinline__ uint32_t prmt(uint32_t a, uint32_t b, uint32_t selector) {
  uint32_t d;  // PTX, not __byte_perm: a selector nibble's bit 3 (replicate the byte's sign) is used below
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(selector));
  return d;
}

// bitsandbytes' 4-bit code (NF4 / FP4) in the activation dtype, held in 8 registers as its 16 entries' low and high
// bytes, so that byte permutes look up four codes at once: no shared-memory table (a bank-replicated one costs 64 KB
// per block, more than the GEMMs' rings leave), 22 integer operations per word of 8 codes.
struct CodeTable {
  uint32_t lo[4], hi[4];  // byte j of lo[i] / hi[i]: the low / high byte of entry 4 i + j

  CodeTable() = default;
  __device__ explicit CodeTable(const uint16_t* table) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint32_t e01 = __ldg(reinterpret_cast<const uint32_t*>(table) + 2 * i);
      const uint32_t e23 = __ldg(reinterpret_cast<const uint32_t*>(table) + 2 * i + 1);
      lo[i] = prmt(e01, e23, 0x6420);
      hi[i] = prmt(e01, e23, 0x7531);
    }
  }

  // The 8 codes of `w` (nibble i: code i) as 16-bit value pairs: register i holds codes 2 i (low half), 2 i + 1.
  __device__ __forceinline__ void lookup(uint32_t w, uint32_t (&v)[4]) const {
    const uint32_t w4 = w << 4;
    // Byte j of upper[h]: 0xFF where code 4 h + j >= 8. Its bit 3 is the sign bit of a byte of w (odd codes) or of
    // w << 4 (even ones), which a selector nibble with bit 3 set replicates.
    const uint32_t upper[2] = {prmt(w4, w, 0xD9C8), prmt(w4, w, 0xFBEA)};
    const uint32_t sel[2] = {w & 0x7777u, (w >> 16) & 0x7777u};  // codes 4 h .. 4 h + 3, bit 3 cleared
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const uint32_t m = upper[h];
      const uint32_t l = (prmt(lo[0], lo[1], sel[h]) & ~m) | (prmt(lo[2], lo[3], sel[h]) & m);
      const uint32_t u = (prmt(hi[0], hi[1], sel[h]) & ~m) | (prmt(hi[2], hi[3], sel[h]) & m);
      v[2 * h] = prmt(l, u, 0x5140);
      v[2 * h + 1] = prmt(l, u, 0x7362);
    }
  }
};

// The four registers one 4-bit word of the GEMMs' order (kernels.h) dequantizes to, scaled by the pair s2: integer
// codes, register i = nibbles (i, i + 4), ((magic + q) - (magic + z)) * s with mz2 = (magic + z) pairs; or, with
// a code table (kTable), register i = nibbles (2 i, 2 i + 1), table[q] * s (mz2 unused).
template <typename T, bool kTable>
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t mz2, uint32_t s2, const CodeTable& table,
                                             uint32_t (&r)[4]) {
  if constexpr (kTable) {
    table.lookup(w, r);
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = bits(__hmul2(Act<T>::pair(r[i]), Act<T>::pair(s2)));
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) r[i] = Act<T>::dequant(and_or(w >> (4 * i), 0x000F000Fu, Act<T>::kMagic2), mz2, s2);
  }
}

// The GEMMs' global -> shared pipelines (cp.async, sm_80+).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Copies kBytes (4 or 16) from global `src` to shared address `dst`, or zero-fills them when !ok (src is not read).
template <int kBytes>
__device__ __forceinline__ void cp_async(uint32_t dst, const void* src, bool ok) {
  const int src_bytes = ok ? kBytes : 0;
  if constexpr (kBytes == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(dst), "l"(src), "n"(kBytes), "r"(src_bytes));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// One output value: added into the split-K workspace, or (no split) written with the bias.
template <typename T>
__device__ __forceinline__ void emit(const SplitK& sk, T* out, const T* bias, int N, int m, int n, float v) {
  if (sk.splits > 1) {
    atomicAdd(sk.ws + static_cast<size_t>(m) * N + n, v);
  } else {
    out[static_cast<size_t>(m) * N + n] = Act<T>::from_float(bias ? v + Act<T>::to_float(bias[n]) : v);
  }
}

// Adds 4 consecutive fp32 partials (16-byte aligned) into the workspace: one vector reduction on sm_90.
__device__ __forceinline__ void red_add4(float* at, float a, float b, float c, float d) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(at), "f"(a), "f"(b), "f"(c), "f"(d)
               : "memory");
#else
  atomicAdd(at, a);
  atomicAdd(at + 1, b);
  atomicAdd(at + 2, c);
  atomicAdd(at + 3, d);
#endif
}

// After every partial of the block is in the workspace: the last K slice to arrive at N tile `tile` writes
// out[:M, n0 : n0 + tile_n] (kVec columns at a time: the tile width and N are multiples of it). A thread's loads
// of kBatch items are all in flight before its first store: with kBatch = 8 a GEMM's 128 x 128 fp32 tile takes 2
// round trips to L2, not 16 (the GEMVs' small tiles keep 1: the registers cost them spills).
template <typename T, int kVec, int kBatch = 1>
__device__ void finish_split(const SplitK& sk, T* out, const T* bias, int M, int N, int tile, int n0, int tile_n) {
  if (sk.splits == 1) return;
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(sk.cnt + tile, 1) == sk.splits - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int width = min(tile_n, N - n0) / kVec, items = M * width;
  for (int first = threadIdx.x; first < items; first += kBatch * kThreads) {
    float v[kBatch][kVec];
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int idx = first + b * kThreads, m = idx / width, n = n0 + kVec * (idx - m * width);
      if (idx >= items) continue;
      const float* at = sk.ws + static_cast<size_t>(m) * N + n;
      if constexpr (kVec == 4) {
        const float4 f = __ldcg(reinterpret_cast<const float4*>(at));
        v[b][0] = f.x, v[b][1] = f.y, v[b][2] = f.z, v[b][3] = f.w;
      } else {
        v[b][0] = __ldcg(at);
      }
    }
#pragma unroll
    for (int b = 0; b < kBatch; ++b) {
      const int idx = first + b * kThreads, m = idx / width, n = n0 + kVec * (idx - m * width);
      if (idx >= items) continue;
      float* at = sk.ws + static_cast<size_t>(m) * N + n;
      if constexpr (kVec == 4) __stcg(reinterpret_cast<float4*>(at), make_float4(0.f, 0.f, 0.f, 0.f));
      else __stcg(at, 0.f);
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        out[static_cast<size_t>(m) * N + n + e] =
            Act<T>::from_float(bias ? v[b][e] + Act<T>::to_float(bias[n + e]) : v[b][e]);
      }
    }
  }
  if (threadIdx.x == 0) sk.cnt[tile] = 0;
}

// The rows of x a block multiplies: M is cut into blocks of MT rows (the last may be shorter), each its own
// output tile. `tile` numbers (M block, N tile) in groups of kGroupRows M blocks, M blocks fastest within a
// group: the blocks that run together read one weight tile (all but the first from L2) and, once M has more
// blocks than a group, a few rows of x (at M = 4096 an M-fastest order streamed all of x from HBM once per wave).
// Up to kGroupRows blocks of M (every GEMV launch) this is plain M-fastest order.
constexpr int kGroupRows = 8;

template <typename T>
struct RowBlock {
  const T* x;
  T* out;
  SplitK split;  // the workspace offset to the block's rows
  int M, m0, n_tile;
  __device__ RowBlock(const void* x_, void* out_, SplitK split_, int M_, int N, int K, int mt, int tile_n, int tile)
      : split(split_) {
    const int blocks = (M_ + mt - 1) / mt, n_tiles = (N + tile_n - 1) / tile_n;
    const int per_group = kGroupRows * n_tiles, first = tile / per_group * kGroupRows;
    const int group_blocks = min(blocks - first, kGroupRows), in_group = tile % per_group;
    m0 = (first + in_group % group_blocks) * mt;
    n_tile = in_group / group_blocks;
    M = min(mt, M_ - m0);
    x = static_cast<const T*>(x_) + static_cast<size_t>(m0) * K;
    out = static_cast<T*>(out_) + static_cast<size_t>(m0) * N;
    if (split.splits > 1) split.ws += static_cast<size_t>(m0) * N;
  }
};

__host__ __device__ constexpr int align16(int v) { return (v + 15) & ~15; }

// Programmatic dependent launch (sm_90+; kernels.h: set_programmatic_launch). A kernel launched with it may start
// while the kernel before it in the stream is finishing: it lets its own dependents launch at once, reads only its
// weights (codes, scales, tables: never written during inference) before `wait_for_inputs`, and reads activations
// or writes anything only after it, when the previous kernel has completed and its writes are visible.
__device__ __forceinline__ void let_dependents_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_inputs() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Launches `kernel(p, extra...)`, programmatically dependent when p.M is small enough (programmatic_launch).
template <typename Kernel, typename Params, typename... Extra>
cudaError_t launch(Kernel kernel, const Params& p, dim3 grid, int smem_bytes, cudaStream_t stream,
                   const Extra&... extra) {
  if (smem_bytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (e != cudaSuccess) return e;
  }
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = programmatic_launch(p.M) ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = static_cast<size_t>(smem_bytes);
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, kernel, p, extra...);
}


}  // namespace detail
}  // namespace quantkit
