// Per-token dynamic activation quant (the input of a dynamic W8A8 Linear), optionally fused with SiLU-and-mul, on
// Hopper thread-block clusters (sm_90+).
//
// Why clusters: a row's codes need the row's amax, so the Triton kernels (kernels/fused_ops.py, triton_w8a8.py)
// hold a whole row in one program. At decode sizes that is one multiprocessor per row: 16 rows of a Llama-3-8B
// SiLU-and-mul (14336 wide) took 6.8 us on an H100 against 1.7 us for the unquantized op spread over 224 programs.
// Here a row is cut into the blocks of one cluster (up to 8); each block keeps its slice in registers (8 values
// per thread: one 16-byte load per operand), reduces its slice's amax, and reads its peers' through distributed
// shared memory after one cluster barrier. One read of the input, one write of the codes, at any row count.
//
// Arithmetic as the Triton kernels and the torch reference: silu(g) * u rounded to the activation dtype as the
// eager ops round it; scale = max(amax / qmax, 1e-12); codes = value / scale (round to nearest), INT8 half to even
// clamped to [-128, 127], FP8 E4M3 saturated to +-448.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include "kernels.h"
#include "mma.cuh"

namespace quantkit {
namespace detail {

namespace cg = cooperative_groups;

template <typename T>
__device__ __forceinline__ T rounded(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 rounded(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half rounded(float v) { return __float2half_rn(v); }

__device__ __forceinline__ float as_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float as_float(__half v) { return __half2float(v); }

// Eight values of column block `col` of row `x_row` (the layer input, or silu(gate) * up).
template <typename T, bool kSiluMul>
__device__ __forceinline__ void load_values(const T* x_row, int cols, int col, float (&y)[8]) {
  const uint4 a = *reinterpret_cast<const uint4*>(x_row + col);
  const T* av = reinterpret_cast<const T*>(&a);
  if constexpr (kSiluMul) {
    const uint4 b = *reinterpret_cast<const uint4*>(x_row + cols + col);
    const T* bv = reinterpret_cast<const T*>(&b);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float g = as_float(av[j]);
      const float silu = as_float(rounded<T>(g / (1.f + __expf(-g))));
      y[j] = as_float(rounded<T>(silu * as_float(bv[j])));
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) y[j] = as_float(av[j]);
  }
}

// Eight codes of `y` at `scale`, as the 8 bytes they are stored as.
template <bool kInt8>
__device__ __forceinline__ uint2 encode(const float (&y)[8], float scale) {
  uint8_t bytes[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float v = __fdiv_rn(y[j], scale);
    if constexpr (kInt8) {
      bytes[j] = static_cast<uint8_t>(static_cast<int8_t>(fminf(fmaxf(rintf(v), -128.f), 127.f)));
    } else {
      bytes[j] = __nv_fp8_e4m3(fminf(fmaxf(v, -448.f), 448.f)).__x;  // cvt.rn.satfinite
    }
  }
  uint2 out;
  memcpy(&out, bytes, sizeof(out));
  return out;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory"); }

}  // namespace detail

namespace {

using namespace detail;

// Grid: one cluster of `cluster_size` blocks per row (blockIdx.x = row * cluster_size + rank); a block covers
// 8 * blockDim.x columns, its threads 8 consecutive ones each.
template <typename T, bool kSiluMul, bool kInt8>
__global__ void row_quant_kernel(const RowQuantParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  __shared__ float warp_amax[32];
  __shared__ float block_amax;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), size = cluster.num_blocks();
  const int64_t row = blockIdx.x / size;
  const int col = (static_cast<int>(rank) * blockDim.x + threadIdx.x) * 8;
  const bool active = col < p.cols;
  wait_for_inputs();
  let_dependents_launch();
  float y[8];
  float amax = 0.f;
  if (active) {
    load_values<T, kSiluMul>(static_cast<const T*>(p.x) + row * p.stride_x, p.cols, col, y);
#pragma unroll
    for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(y[j]));
  }
  amax = warp_max(amax);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_amax[warp] = amax;
  __syncthreads();
  if (warp == 0) {
    amax = warp_max(lane < (blockDim.x + 31) / 32 ? warp_amax[lane] : 0.f);
    if (lane == 0) block_amax = amax;
  }
  cluster_arrive();  // every block's amax is written ...
  cluster_wait();    // ... and visible to the cluster
  float row_amax = 0.f;
  for (unsigned r = 0; r < size; ++r) row_amax = fmaxf(row_amax, *cluster.map_shared_rank(&block_amax, r));
  cluster_arrive();  // done reading the peers' shared memory (a block must not exit while a peer still reads it)
  const float scale = fmaxf(__fdiv_rn(row_amax, kInt8 ? 127.f : 448.f), 1e-12f);
  if (rank == 0 && threadIdx.x == 0) p.scale[row] = scale;
  if (active) {
    *reinterpret_cast<uint2*>(static_cast<uint8_t*>(p.q) + row * p.cols + col) = encode<kInt8>(y, scale);
  }
  cluster_wait();
#endif
}

template <typename T, bool kSiluMul, bool kInt8>
cudaError_t launch_t(const RowQuantParams& p, cudaStream_t stream) {
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = p.cluster_size;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = programmatic_launch(static_cast<int>(p.rows < INT32_MAX ? p.rows : INT32_MAX)) ? 1 : 0;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(p.rows) * p.cluster_size);
  config.blockDim = dim3(p.block_threads);
  config.stream = stream;
  config.attrs = attrs;
  config.numAttrs = 2;
  return cudaLaunchKernelEx(&config, row_quant_kernel<T, kSiluMul, kInt8>, p);
}

template <typename T>
cudaError_t launch_dtype(const RowQuantParams& p, cudaStream_t stream) {
  if (p.silu_mul) return p.int8 ? launch_t<T, true, true>(p, stream) : launch_t<T, true, false>(p, stream);
  return p.int8 ? launch_t<T, false, true>(p, stream) : launch_t<T, false, false>(p, stream);
}

}  // namespace

cudaError_t launch_row_quant(const RowQuantParams& p, cudaStream_t stream) {
  return p.bf16 ? launch_dtype<__nv_bfloat16>(p, stream) : launch_dtype<__half>(p, stream);
}

}  // namespace quantkit
