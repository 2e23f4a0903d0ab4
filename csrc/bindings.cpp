// torch.ops.quantkit.wna16_gemv / wna16_gemm / wna16_wgmma / nf4_gemv / permute_cols / row_quant: shape, dtype and device
// checks, then the launchers of the .cu files on the current stream. Registered with TORCH_LIBRARY, so the ops are
// graph-capturable and need no Python module.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "kernels.h"

namespace quantkit {
namespace {

using at::Tensor;

// Error messages are assembled here, not by TORCH_CHECK's std::ostream: on the H100 machine (torch 2.11) a check
// that streamed a number or a shape into its message crashed the process (SIGSEGV) instead of raising; strings,
// dtypes and devices streamed fine. std::to_string and string concatenation avoid the stream's number formatting.
std::string piece(const char* s) { return s; }
std::string piece(const std::string& s) { return s; }
std::string piece(at::ScalarType t) { return c10::toString(t); }
std::string piece(const c10::Device& d) { return d.str(); }
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string piece(T v) {
  return std::to_string(v);
}
std::string piece(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + "]";
}
template <typename... Parts>
std::string text(const Parts&... parts) {
  return (std::string() + ... + piece(parts));
}

constexpr int64_t kMaxRows = 4096;  // callers cut larger M into pieces (the output tiles index the launch grid)

void check_cuda(const Tensor& t, const char* name, const Tensor& x) {
  TORCH_CHECK(t.is_cuda() && t.device() == x.device(), text(name, " must be on ", x.device(), ", got ", t.device()));
  TORCH_CHECK(t.is_contiguous(), text(name, " must be contiguous"));
}

void check_aligned(const Tensor& t, const char* name, int bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0,
              text(name, " must be ", bytes, "-byte aligned (vector loads)"));
}

// x [M, K] bf16 / fp16 on a CUDA device; returns the empty output [M, N].
Tensor check_x(const Tensor& x, int64_t n, int64_t max_rows, const char* who) {
  TORCH_CHECK(x.is_cuda(), text("x must be a CUDA tensor, got ", x.device()));
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), text("x must be a contiguous [M, K] matrix, got shape ", x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              text("x must be bfloat16 or float16, got ", x.scalar_type()));
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= max_rows,
              text(who, " serves 1 <= M <= ", max_rows, " rows, got M = ", x.size(0)));
  return at::empty({x.size(0), n}, x.options());
}

const void* check_bias(const c10::optional<Tensor>& bias, const Tensor& x, int64_t n) {
  if (!bias.has_value()) return nullptr;
  check_cuda(*bias, "bias", x);
  TORCH_CHECK(bias->scalar_type() == x.scalar_type(),
              text("bias dtype ", bias->scalar_type(), " differs from x's ", x.scalar_type()));
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, text("bias must have shape [", n, "], got ", bias->sizes()));
  return bias->data_ptr();
}

// The K slices (`splits` of `steps_per_block` of the `steps` K steps) and the split-K workspace: fp32 [>= M * N] and
// int32 [>= tiles] counters, both zero (kept zero by the kernels).
SplitK check_split(const Tensor& ws, const Tensor& cnt, const Tensor& x, int64_t m, int64_t n, int64_t tiles,
                   int64_t steps, int64_t splits, int64_t steps_per_block, int64_t max_steps) {
  TORCH_CHECK(
      splits >= 1 && steps_per_block >= 1 && steps_per_block <= max_steps,
      text("splits must be >= 1 and steps_per_block in [1, ", max_steps, "], got ", splits, " and ", steps_per_block));
  TORCH_CHECK(splits == (steps + steps_per_block - 1) / steps_per_block,
              text("splits ", splits, " does not cover the ", steps, " K steps in slices of ", steps_per_block));
  if (splits > 1) {
    check_cuda(ws, "ws", x);
    check_cuda(cnt, "cnt", x);
    TORCH_CHECK(ws.scalar_type() == at::kFloat && ws.numel() >= m * n,
                text("ws must be float32 with >= ", m * n, " elements, got ", ws.scalar_type(), " ", ws.numel()));
    TORCH_CHECK(cnt.scalar_type() == at::kInt && cnt.numel() >= tiles,
                text("cnt must be int32 with >= ", tiles, " elements, got ", cnt.scalar_type(), " ", cnt.numel()));
  }
  return SplitK{splits > 1 ? ws.data_ptr<float>() : nullptr, splits > 1 ? cnt.data_ptr<int>() : nullptr,
                static_cast<int>(splits), static_cast<int>(steps_per_block)};
}

// The checks every W4A16 op shares; returns their parameters without perm and split. `qweight_rows` (named
// `rows_name`): the GEMV reads the GPTQ layout [K/8, N], the GEMMs the mma order [K32/8, N]. Exactly one of
// qzeros (integer codes) and code_table (codes into a table: the GEMMs only) is given.
WNA16Params check_wna16(const Tensor& x, const Tensor& out, const Tensor& qweight, int64_t qweight_rows,
                        const char* rows_name, const c10::optional<Tensor>& qzeros,
                        const c10::optional<Tensor>& code_table, const Tensor& scales,
                        const c10::optional<Tensor>& bias, int64_t group_size, const char* op) {
  const int64_t k = x.size(1), n = scales.size(-1);
  for (const auto& [t, name] : {std::pair{qweight, "qweight"}, {scales, "scales"}}) check_cuda(t, name, x);
  TORCH_CHECK(qzeros.has_value() != code_table.has_value(),
              text(op, " takes either qzeros (integer codes) or code_table (codes into a table), not ",
                   qzeros.has_value() ? "both" : "neither"));
  TORCH_CHECK(k % 8 == 0 && n % 8 == 0, text(op, " needs K and N multiples of 8, got K = ", k, ", N = ", n));
  const int64_t group = group_size == -1 ? k : group_size;
  TORCH_CHECK(group >= k || group % kWNA16StepK == 0,
              text("group size ", group, " is not a multiple of ", kWNA16StepK, " (nor per channel)"));
  const int64_t ng = (k + group - 1) / group, steps = (k + kWNA16StepK - 1) / kWNA16StepK;
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2 && qweight.size(0) == qweight_rows &&
                  qweight.size(1) == n,
              text("qweight must be int32 [", rows_name, ", N] = [", qweight_rows, ", ", n, "] (4-bit), got ",
                   qweight.scalar_type(), " ", qweight.sizes()));
  if (qzeros.has_value()) {
    check_cuda(*qzeros, "qzeros", x);
    TORCH_CHECK(qzeros->scalar_type() == at::kInt && qzeros->dim() == 2 && qzeros->size(0) == ng &&
                    qzeros->size(1) == n / 8,
                text("qzeros must be int32 [NG, N/8] = [", ng, ", ", n / 8, "], got ", qzeros->scalar_type(), " ",
                     qzeros->sizes()));
  } else {
    check_cuda(*code_table, "code_table", x);
    TORCH_CHECK(code_table->scalar_type() == x.scalar_type() && code_table->dim() == 1 && code_table->size(0) == 16,
                text("code_table must be ", x.scalar_type(), " [16], got ", code_table->scalar_type(), " ",
                     code_table->sizes()));
    check_aligned(*code_table, "code_table", 4);
  }
  TORCH_CHECK(scales.scalar_type() == x.scalar_type() && scales.dim() == 2 && scales.size(0) == ng,
              text("scales must be ", x.scalar_type(), " [NG, N] = [", ng, ", ", n, "], got ", scales.scalar_type(),
                   " ", scales.sizes()));
  check_aligned(qweight, "qweight", 16);
  check_aligned(scales, "scales", 16);
  return WNA16Params{x.data_ptr(), reinterpret_cast<const uint32_t*>(qweight.data_ptr<int32_t>()),
                     qzeros.has_value() ? reinterpret_cast<const uint32_t*>(qzeros->data_ptr<int32_t>()) : nullptr,
                     code_table.has_value() ? code_table->data_ptr() : nullptr, scales.data_ptr(), nullptr,
                     check_bias(bias, x, n), out.data_ptr(), static_cast<int>(x.size(0)), static_cast<int>(n),
                     static_cast<int>(k), static_cast<int>(ng),
                     static_cast<int>(group >= k ? steps : group / kWNA16StepK), x.scalar_type() == at::kBFloat16,
                     SplitK{}};
}

Tensor wna16_gemv(const Tensor& x, const Tensor& qweight, const Tensor& qzeros, const Tensor& scales,
                  const c10::optional<Tensor>& perm, const c10::optional<Tensor>& bias, int64_t group_size,
                  int64_t splits, int64_t steps_per_block, const Tensor& ws, const Tensor& cnt) {
  Tensor out = check_x(x, scales.size(-1), kMaxRows, "the GEMV");
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(-1);
  WNA16Params p = check_wna16(x, out, qweight, k / 8, "K/8", qzeros, c10::nullopt, scales, bias, group_size,
                              "4-bit GEMV");
  if (perm.has_value()) {
    check_cuda(*perm, "perm", x);
    TORCH_CHECK(perm->scalar_type() == at::kInt && perm->dim() == 1 && perm->size(0) == k,
                text("perm must be int32 [K] = [", k, "], got ", perm->scalar_type(), " ", perm->sizes()));
    p.perm = perm->data_ptr<int32_t>();
  }
  const int64_t steps = (k + kWNA16StepK - 1) / kWNA16StepK;
  p.split = check_split(ws, cnt, x, m, n, output_tiles(m, n, kWNA16TileN, kWNA16MaxRows), steps, splits,
                        steps_per_block, 32);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch_wna16(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, text("wna16_gemv launch failed: ", cudaGetErrorString(err)));
  return out;
}

// What differs between the two GEMMs' ops (both read the mma-order qweight [K32/8, N]): the K of a stage, the
// launcher, and the one compute capability a kernel may need (sm_90a code runs on sm_90 alone).
struct GemmKernel {
  const char* op;
  int64_t stage_k;
  cudaError_t (*launch)(const WNA16Params&, int rows, cudaStream_t);
  int only_arch;  // major * 10 + minor, or 0 (any device the extension was built for)
};

// A GEMM: x [M, K] (act-order's already permuted) in blocks of `rows` rows; K slices of `stages_per_block` stages.
Tensor run_gemm(const GemmKernel& g, int rows, const Tensor& x, const Tensor& qweight,
                const c10::optional<Tensor>& qzeros, const Tensor& scales, const c10::optional<Tensor>& bias,
                int64_t group_size, int64_t splits, int64_t stages_per_block, const Tensor& ws, const Tensor& cnt,
                const c10::optional<Tensor>& code_table) {
  Tensor out = check_x(x, scales.size(-1), INT32_MAX / 64, g.op);
  if (g.only_arch) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.get_device());
    TORCH_CHECK(major * 10 + minor == g.only_arch,
                text(g.op, " needs an sm_", g.only_arch, " GPU, got compute capability ", major, ".", minor));
  }
  const int64_t m = x.size(0), k = x.size(1), n = scales.size(-1);
  WNA16Params p = check_wna16(x, out, qweight, (k + 31) / 32 * 4, "K32/8", qzeros, code_table, scales, bias,
                              group_size, g.op);
  check_aligned(x, "x", 16);  // staged by 16-byte copies
  const int64_t tiles = gemm_tiles(m, n, rows);
  TORCH_CHECK(tiles <= INT32_MAX, text("M = ", m, " x N = ", n, " is too many output tiles for one launch"));
  const int64_t stages = (k + g.stage_k - 1) / g.stage_k;
  p.split = check_split(ws, cnt, x, m, n, tiles, stages, splits, stages_per_block, stages);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = g.launch(p, rows, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, text(g.op, " launch failed: ", cudaGetErrorString(err)));
  return out;
}

constexpr GemmKernel kMmaGemm{"wna16_gemm", kGemmStageK, launch_wna16_gemm, 0};
constexpr GemmKernel kWgmmaGemm{"wna16_wgmma", kWgmmaStageK, launch_wna16_wgmma, 90};  // sm_90a

Tensor wna16_gemm(const Tensor& x, const Tensor& qweight, const c10::optional<Tensor>& qzeros, const Tensor& scales,
                  const c10::optional<Tensor>& bias, int64_t group_size, int64_t splits, int64_t stages_per_block,
                  const Tensor& ws, const Tensor& cnt, const c10::optional<Tensor>& code_table) {
  return run_gemm(kMmaGemm, wna16_gemm_rows(x.size(0)), x, qweight, qzeros, scales, bias, group_size, splits,
                  stages_per_block, ws, cnt, code_table);
}

Tensor wna16_wgmma(const Tensor& x, const Tensor& qweight, const c10::optional<Tensor>& qzeros,
                   const Tensor& scales, const c10::optional<Tensor>& bias, int64_t group_size, int64_t splits,
                   int64_t stages_per_block, const Tensor& ws, const Tensor& cnt, int64_t block_rows,
                   const c10::optional<Tensor>& code_table) {
  TORCH_CHECK(block_rows == 128 || block_rows == 256,
              text("wna16_wgmma runs blocks of 128 or 256 rows, got block_rows = ", block_rows));
  return run_gemm(kWgmmaGemm, static_cast<int>(block_rows), x, qweight, qzeros, scales, bias, group_size, splits,
                  stages_per_block, ws, cnt, code_table);
}

Tensor permute_cols(const Tensor& x, const Tensor& perm) {
  const int64_t m = x.size(0), k = x.size(1);
  Tensor out = check_x(x, k, INT32_MAX / std::max<int64_t>(k / 8, 1), "permute_cols");
  check_cuda(perm, "perm", x);
  TORCH_CHECK(perm.scalar_type() == at::kInt && perm.dim() == 1 && perm.size(0) == k,
              text("perm must be int32 [K] = [", k, "], got ", perm.scalar_type(), " ", perm.sizes()));
  TORCH_CHECK(k % 8 == 0, text("permute_cols needs K a multiple of 8, got K = ", k));
  check_aligned(perm, "perm", 16);
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err =
      launch_permute_cols(x.data_ptr(), perm.data_ptr<int32_t>(), out.data_ptr(), static_cast<int>(m),
                          static_cast<int>(k), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, text("permute_cols launch failed: ", cudaGetErrorString(err)));
  return out;
}

Tensor nf4_gemv(const Tensor& x, const Tensor& packed, const Tensor& absmax, const Tensor& code4, const Tensor& ncode,
                const Tensor& nabs, const Tensor& noff, const Tensor& row_group, const Tensor& row_block,
                const c10::optional<Tensor>& bias, int64_t blocksize, int64_t splits, int64_t steps_per_block,
                const Tensor& ws, const Tensor& cnt) {
  const int64_t m = x.size(0), k = x.size(1), n = packed.size(0);
  Tensor out = check_x(x, n, kMaxRows, "the GEMV");
  check_cuda(packed, "packed", x);
  check_cuda(absmax, "absmax", x);
  check_cuda(code4, "code4", x);
  TORCH_CHECK(blocksize % 64 == 0 && k % blocksize == 0,
              text("NF4 GEMV needs a blocksize that is a multiple of 64 and divides K, got blocksize ", blocksize,
                   ", K = ", k));
  TORCH_CHECK(
      packed.scalar_type() == at::kByte && packed.dim() == 2 && packed.size(1) == k / 2,
      text("packed must be uint8 [N, K/2] with K/2 = ", k / 2, ", got ", packed.scalar_type(), " ", packed.sizes()));
  TORCH_CHECK(absmax.dim() == 2 && absmax.size(0) == n && absmax.size(1) == k / blocksize &&
                  (absmax.scalar_type() == at::kByte || absmax.scalar_type() == at::kFloat),
              text("absmax must be uint8 or float32 [N, K/blocksize] = [", n, ", ", k / blocksize, "], got ",
                   absmax.scalar_type(), " ", absmax.sizes()));
  TORCH_CHECK(code4.scalar_type() == at::kFloat && code4.numel() == 16, "code4 must be float32 [16]");
  check_aligned(packed, "packed", 16);
  const bool dq = absmax.scalar_type() == at::kByte;
  if (dq) {
    for (const auto& [t, name] : {std::pair{ncode, "ncode"}, {nabs, "nabs"}, {noff, "noff"}, {row_group, "row_group"},
                                  {row_block, "row_block"}}) {
      check_cuda(t, name, x);
    }
    TORCH_CHECK(ncode.scalar_type() == at::kFloat && ncode.numel() == 256, "ncode must be float32 [256]");
    TORCH_CHECK(nabs.scalar_type() == at::kFloat && noff.scalar_type() == at::kFloat && nabs.numel() == noff.numel(),
                text("nabs and noff must be float32 of one length, got ", nabs.sizes(), " and ", noff.sizes()));
    TORCH_CHECK(row_group.scalar_type() == at::kInt && row_block.scalar_type() == at::kInt && row_group.numel() == n &&
                    row_block.numel() == n,
                text("row_group and row_block must be int32 [N] = [", n, "]"));
  }
  const int64_t steps = (k + kNF4StepK - 1) / kNF4StepK, tiles = output_tiles(m, n, kNF4TileN, kNF4MaxRows);
  TORCH_CHECK(tiles < 65536, text("N = ", n, " at M = ", m, " needs ", tiles,
                                  " output tiles, over the 65535 a launch holds: call with fewer rows"));
  const int64_t smem = nf4_smem_bytes(block_rows(m, kNF4MaxRows), steps_per_block);
  int device_smem = 0;
  cudaDeviceGetAttribute(&device_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, x.get_device());
  TORCH_CHECK(smem <= device_smem, text("steps_per_block ", steps_per_block, " at M = ", m, " needs ", smem,
                                        " bytes of shared memory, over the ", device_smem, " a block may have"));
  NF4Params p{x.data_ptr(), packed.data_ptr<uint8_t>(), absmax.data_ptr(), code4.data_ptr<float>(),
              dq ? ncode.data_ptr<float>() : nullptr, dq ? nabs.data_ptr<float>() : nullptr,
              dq ? noff.data_ptr<float>() : nullptr, dq ? row_group.data_ptr<int32_t>() : nullptr,
              dq ? row_block.data_ptr<int32_t>() : nullptr, check_bias(bias, x, n), out.data_ptr(),
              static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), static_cast<int>(blocksize), dq,
              x.scalar_type() == at::kBFloat16,
              check_split(ws, cnt, x, m, n, tiles, steps, splits, steps_per_block, steps)};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch_nf4(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, text("nf4_gemv launch failed: ", cudaGetErrorString(err)));
  return out;
}

// Per-token dynamic quant of x [T, C] (or of silu(gate) * up for x [T, 2C] = gate | up with silu_mul) into q [T, C]
// int8 / float8_e4m3fn and scale [T, 1] fp32, one cluster of `cluster_size` blocks per row (sm_90+).
void row_quant(const Tensor& x, const Tensor& q, const Tensor& scale, bool silu_mul, int64_t cluster_size) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 2 && x.stride(1) == 1,
              text("x must be a CUDA [T, C] matrix with unit stride along C, got ", x.device(), " ", x.sizes()));
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              text("x must be bfloat16 or float16, got ", x.scalar_type()));
  TORCH_CHECK(!silu_mul || x.size(1) % 2 == 0, text("silu_mul takes x = gate | up, an even width, got ", x.size(1)));
  const int64_t rows = x.size(0), cols = silu_mul ? x.size(1) / 2 : x.size(1);
  TORCH_CHECK(cols % 8 == 0 && cols > 0 && x.stride(0) % 8 == 0,
              text("row_quant needs C and x's row stride multiples of 8 (16-byte loads), got C = ", cols,
                   ", stride ", x.stride(0)));
  check_aligned(x, "x", 16);
  check_cuda(q, "q", x);
  check_cuda(scale, "scale", x);
  TORCH_CHECK((q.scalar_type() == at::kChar || q.scalar_type() == at::kFloat8_e4m3fn) && q.dim() == 2 &&
                  q.size(0) == rows && q.size(1) == cols,
              text("q must be int8 or float8_e4m3fn [T, C] = [", rows, ", ", cols, "], got ", q.scalar_type(), " ",
                   q.sizes()));
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == rows,
              text("scale must be float32 with T = ", rows, " elements, got ", scale.scalar_type(), " ",
                   scale.numel()));
  TORCH_CHECK(cluster_size >= 1 && cluster_size <= 8, text("cluster_size must be in [1, 8], got ", cluster_size));
  const int64_t threads = ((cols / 8 + cluster_size - 1) / cluster_size + 31) / 32 * 32;
  TORCH_CHECK(threads <= 1024, text("C = ", cols, " in ", cluster_size, " blocks needs ", threads,
                                    " threads per block, over 1024: use a larger cluster_size"));
  int major = 0;
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device());
  TORCH_CHECK(major >= 9, text("row_quant needs thread-block clusters (compute capability >= 9.0), got ", major));
  if (rows == 0) return;
  const RowQuantParams p{x.data_ptr(), x.stride(0), q.data_ptr(), scale.data_ptr<float>(), rows,
                         static_cast<int>(cols), static_cast<int>(cluster_size), static_cast<int>(threads), silu_mul,
                         q.scalar_type() == at::kChar, x.scalar_type() == at::kBFloat16};
  const c10::cuda::CUDAGuard guard(x.device());
  const cudaError_t err = launch_row_quant(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, text("row_quant launch failed: ", cudaGetErrorString(err)));
}

}  // namespace

namespace {
int64_t programmatic_max_rows = 0;
}  // namespace

void set_programmatic_launch(int64_t max_rows) { programmatic_max_rows = max_rows; }
bool programmatic_launch(int rows) { return rows <= programmatic_max_rows; }

// The shared memory of an NF4 launch at M = rows (the row block it runs in) and steps_per_block, for cuda_gemv.py.
int64_t nf4_smem_bytes_op(int64_t rows, int64_t steps_per_block) {
  TORCH_CHECK(
      rows >= 1 && rows <= kNF4MaxRows && steps_per_block >= 1,
      text("rows must be in [1, ", kNF4MaxRows, "] and steps_per_block >= 1, got ", rows, " and ", steps_per_block));
  return nf4_smem_bytes(block_rows(static_cast<int>(rows), kNF4MaxRows), static_cast<int>(steps_per_block));
}

// The shared memory of one GEMM block at M = m (its rows per block), for cuda_gemm.py's blocks per multiprocessor.
int64_t wna16_gemm_smem_bytes_op(int64_t m) {
  TORCH_CHECK(m >= 1, text("M must be >= 1, got ", m));
  return wna16_gemm_smem_bytes(wna16_gemm_rows(m));
}
}  // namespace quantkit

TORCH_LIBRARY(quantkit, m) {
  m.def(
      "wna16_gemv(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? perm, Tensor? bias, "
      "int group_size, int splits, int steps_per_block, Tensor(a!) ws, Tensor(b!) cnt) -> Tensor");
  m.def(
      "wna16_gemm(Tensor x, Tensor qweight, Tensor? qzeros, Tensor scales, Tensor? bias, int group_size, "
      "int splits, int stages_per_block, Tensor(a!) ws, Tensor(b!) cnt, Tensor? code_table=None) -> Tensor");
  m.def(
      "wna16_wgmma(Tensor x, Tensor qweight, Tensor? qzeros, Tensor scales, Tensor? bias, int group_size, "
      "int splits, int stages_per_block, Tensor(a!) ws, Tensor(b!) cnt, int block_rows, Tensor? code_table=None) "
      "-> Tensor");
  m.def("permute_cols(Tensor x, Tensor perm) -> Tensor");
  m.def("row_quant(Tensor x, Tensor(a!) q, Tensor(b!) scale, bool silu_mul, int cluster_size) -> ()");
  m.def(
      "nf4_gemv(Tensor x, Tensor packed, Tensor absmax, Tensor code4, Tensor ncode, Tensor nabs, Tensor noff, "
      "Tensor row_group, Tensor row_block, Tensor? bias, int blocksize, int splits, int steps_per_block, "
      "Tensor(a!) ws, Tensor(b!) cnt) -> Tensor");
  m.def("nf4_smem_bytes(int rows, int steps_per_block) -> int", &quantkit::nf4_smem_bytes_op);
  m.def("wna16_gemm_smem_bytes(int m) -> int", &quantkit::wna16_gemm_smem_bytes_op);
  m.def("set_programmatic_launch(int max_rows) -> ()", &quantkit::set_programmatic_launch);
}

TORCH_LIBRARY_IMPL(quantkit, CUDA, m) {
  m.impl("wna16_gemv", &quantkit::wna16_gemv);
  m.impl("wna16_gemm", &quantkit::wna16_gemm);
  m.impl("wna16_wgmma", &quantkit::wna16_wgmma);
  m.impl("permute_cols", &quantkit::permute_cols);
  m.impl("row_quant", &quantkit::row_quant);
  m.impl("nf4_gemv", &quantkit::nf4_gemv);
}
