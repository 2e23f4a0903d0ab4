// Small- and medium-M (decode) kernels for the W4A16 (WNA16) and bitsandbytes 4-bit kernel formats. M is cut into
// blocks of MT = 8, 16, 32 (or, NF4 only, 64) rows (RowBlock), each an output tile of its own.
//
// Both stream the packed weights once with 16-byte loads in batches of K steps, the next batch in flight while
// the current one is multiplied (a refill of each register right after its step was used measured ~30% slower
// on an H200), and multiply on the tensor cores with mma.sync.m16n8k16 (sm_80+; fp32 accumulation): at M = 1..16
// an FMA per weight and token on the CUDA cores would cost more issue slots than the memory stream leaves, the
// tensor cores take all M rows for one instruction. The order in which K enters an mma is free (A and B only
// have to agree), so the codes are fed in the order that is cheapest to unpack, and the activations are staged in
// shared memory in the matching order.
//
// A block covers one output tile (N tile x row block) and one K slice; the slices' fp32 partials are added into a
// zero-filled workspace and the block that arrives last at the tile's counter writes the output (plus bias) and
// zeroes what it used (CUTLASS's serial split-K semaphore): one launch, no host sync, graph-capturable.
#include "mma.cuh"

namespace quantkit {
namespace {

using namespace detail;

constexpr int kUnroll = 4;  // WNA16 K steps per batch of loads (a batch in flight while the previous is used)

// Copies x[m, k0 : k0 + 8 * chunks) for m < mt into shared rows of `stride` bytes (zero where m >= M or k >= K),
// gathering columns through `perm` when given. kInterleave stores each 8 values as (0,4,1,5,2,6,3,7), the order
// the WNA16 fragments consume; `xsum` (or null) receives the fp32 sum of each 32 staged values, [mt][xsum_stride].
// `chunks` is a multiple of 4. Each thread has kStageBatch 16-byte loads in flight before it stores the first
// (one at a time made M = 64 GEMVs 7-12% slower on an H100: the staging is a chain of L2 round trips).
constexpr int kStageBatch = 4;

template <typename T, bool kInterleave>
__device__ void stage_x(const T* __restrict__ x, const int32_t* __restrict__ perm, int M, int K, int k0, int chunks,
                        int mt, char* xs, int stride, float* xsum, int xsum_stride) {
  const bool vec = perm == nullptr && (reinterpret_cast<uintptr_t>(x) & 15) == 0;  // K % 8 == 0: rows aligned
  const uint16_t* x16 = reinterpret_cast<const uint16_t*>(x);
  const int total = mt * chunks;
  for (int base = 0; base < total; base += kThreads * kStageBatch) {  // uniform trips: all lanes shuffle
    uint4 vs[kStageBatch];
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int idx = base + u * kThreads + threadIdx.x;
      const int m = idx / chunks, ch = idx - m * chunks, k = k0 + 8 * ch;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (idx < total && m < M && k < K) {
        const size_t row = static_cast<size_t>(m) * K;
        if (vec) {
          v = *reinterpret_cast<const uint4*>(x16 + row + k);
        } else {
          uint32_t w[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int k_lo = perm ? perm[k + 2 * e] : k + 2 * e, k_hi = perm ? perm[k + 2 * e + 1] : k + 2 * e + 1;
            w[e] = static_cast<uint32_t>(x16[row + k_lo]) | (static_cast<uint32_t>(x16[row + k_hi]) << 16);
          }
          v = make_uint4(w[0], w[1], w[2], w[3]);
        }
      }
      vs[u] = v;
    }
#pragma unroll
    for (int u = 0; u < kStageBatch; ++u) {
      const int idx = base + u * kThreads + threadIdx.x;
      const int m = idx / chunks, ch = idx - m * chunks;
      const uint4 v = vs[u];
      if (idx < total) {
        const uint4 o = kInterleave ? make_uint4(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632),
                                                 __byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632))
                                    : v;
        *reinterpret_cast<uint4*>(xs + m * stride + 16 * ch) = o;
      }
      if (xsum != nullptr) {
        const float2 a = Act<T>::unpack(v.x), b = Act<T>::unpack(v.y), c = Act<T>::unpack(v.z),
                     d = Act<T>::unpack(v.w);
        float s = ((a.x + a.y) + (b.x + b.y)) + ((c.x + c.y) + (d.x + d.y));
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        if (idx < total && (ch & 3) == 0) xsum[m * xsum_stride + ch / 4] = s;
      }
    }
  }
}


// Dynamic shared memory of the WNA16 kernel (host and device compute it alike).
struct WNA16Smem {
  int x_stride, xsum_stride, xsum_off, groups, scale_off, zero_off, bytes;
};

__host__ __device__ inline WNA16Smem wna16_smem(int mt, int steps_per_block, int group_steps, int ng) {
  WNA16Smem s;
  const int row = steps_per_block * kWNA16StepK * 2;
  s.x_stride = row + (row % 128 == 0 ? 64 : 0);  // == 64 mod 128: the 8 lanes of a 16-byte read hit 32 banks
  s.xsum_stride = steps_per_block | 1;
  s.xsum_off = mt * s.x_stride;
  s.groups = min(ng, (steps_per_block - 1) / group_steps + 2);
  s.scale_off = align16(s.xsum_off + mt * s.xsum_stride * 4);
  s.zero_off = s.scale_off + s.groups * kWNA16TileN * 2;
  s.bytes = s.zero_off + s.groups * (kWNA16TileN / 8) * 4;
  return s;
}

// WNA16, 4-bit. Warp w owns columns [n0 + 32w, +32); lane (gi, gc) = (lane / 4, lane % 4) loads, per 32-wide K
// step, word row 4 * step + gc at columns 4 gi .. 4 gi + 3 (the warp reads 4 rows x 128 contiguous bytes). Word j
// of the load is column 4 gi + j of mma n-tile j, whose B column gi it is. Its 8 codes make the k16 halves
// (nibbles 0,4 | 1,5) and (2,6 | 3,7) as (magic + q) pairs, so the staged activations are interleaved alike. The
// MT <= 16 (one m16 tile): the zero point and scale leave the inner loop: per group,
// out += s * (sum_k x_k (magic + q_k) - (magic + z) sum_k x_k).
// MT = 32 (wide): each B fragment serves two m tiles, so it is dequantized in registers first,
// ((magic + q) - (magic + z)) * s in the activation dtype as Marlin does, and the warp accumulates directly.
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, 2) wna16_kernel(const WNA16Params p) {
  static_assert(MT <= kWNA16MaxRows, "WNA16 row blocks stop at kWNA16MaxRows");
  constexpr bool kWide = MT > 16;
  extern __shared__ __align__(16) char smem[];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, gc = lane & 3;
  const RowBlock<T> rows(p.x, p.out, p.split, p.M, p.N, p.K, MT, kWNA16TileN, blockIdx.x);
  const int n0 = rows.n_tile * kWNA16TileN, wcol = 32 * warp, col = n0 + wcol + 4 * gi;
  const int steps = (p.K + kWNA16StepK - 1) / kWNA16StepK, spb = p.split.steps_per_block;
  const int s_begin = blockIdx.y * spb, s_end = min(steps, s_begin + spb);
  const int M = rows.M;
  const T* x = rows.x;
  T* out = rows.out;
  const T* bias = static_cast<const T*>(p.bias);
  const int kw = p.K / 8;
  const bool col_ok = col < p.N;

  auto load = [&](uint4(&buf)[kUnroll], int s) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int row = 4 * (s + u) + gc;
      buf[u] = s + u < s_end && row < kw && col_ok
                   ? load_stream16(p.qweight + static_cast<size_t>(row) * p.N + col)
                   : make_uint4(0, 0, 0, 0);
    }
  };
  let_dependents_launch();
  uint4 cur[kUnroll];
  load(cur, s_begin);  // in flight while the block stages scales, zeros and activations

  const WNA16Smem lay = wna16_smem(MT, spb, p.group_steps, p.NG);
  float* xsum = reinterpret_cast<float*>(smem + lay.xsum_off);
  uint4* scales = reinterpret_cast<uint4*>(smem + lay.scale_off);  // [groups][256 columns / 8]
  uint32_t* zeros = reinterpret_cast<uint32_t*>(smem + lay.zero_off);
  const int g_first = s_begin / p.group_steps, g_count = (s_end - 1) / p.group_steps - g_first + 1;
  for (int idx = threadIdx.x; idx < g_count * (kWNA16TileN / 8); idx += kThreads) {
    const int gl = idx / (kWNA16TileN / 8), c8 = n0 + 8 * (idx % (kWNA16TileN / 8));
    if (c8 < p.N) {
      const size_t g = g_first + gl;
      scales[idx] = __ldg(reinterpret_cast<const uint4*>(static_cast<const T*>(p.scales) + g * p.N + c8));
      zeros[idx] = __ldg(p.qzeros + g * (p.N / 8) + c8 / 8);
    }
  }
  wait_for_inputs();
  stage_x<T, true>(x, p.perm, M, p.K, s_begin * kWNA16StepK, (s_end - s_begin) * (kWNA16StepK / 8), MT, smem,
                   lay.x_stride, kWide ? nullptr : xsum, lay.xsum_stride);
  __syncthreads();

  // Writes v[j] = the C value of n-tile j in register r of m tile t (4 consecutive columns of one row).
  auto store = [&](int t, int r, const float (&v)[4]) {
    const int m = 16 * t + gi + (r >= 2 ? 8 : 0), n = n0 + wcol + 8 * gc + 4 * (r & 1);
    if (m >= M || n >= p.N) return;
    const size_t at = static_cast<size_t>(m) * p.N + n;
    if (rows.split.splits > 1) {
      red_add4(rows.split.ws + at, v[0], v[1], v[2], v[3]);
    } else {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[at + j] = Act<T>::from_float(bias ? v[j] + Act<T>::to_float(bias[n + j]) : v[j]);
    }
  };
  // Walks the block's K steps, the next batch of weight loads in flight: body(step, step - s_begin, words).
  auto for_each_step = [&](auto&& body) {
    for (int s = s_begin; s < s_end; s += kUnroll) {
      uint4 nxt[kUnroll];
      load(nxt, s + kUnroll);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (s + u >= s_end) break;
        body(s + u, s + u - s_begin, cur[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) cur[u] = nxt[u];
    }
  };
  int gl = 0, next_flush = min(s_end, (g_first + 1) * p.group_steps);
  if constexpr (kWide) {
    constexpr int kMT = MT / 16;
    const int lc = wcol + 4 * gi;  // the lane's B columns: lc + j of n-tile j
    uint32_t s2[4], mz2[4];        // per n-tile: (s, s) and (magic + z, magic + z) of the current group
    auto group_regs = [&](int g) {
      const uint4 sv = scales[g * (kWNA16TileN / 8) + lc / 8];
      const uint32_t lo = gi & 1 ? sv.z : sv.x, hi = gi & 1 ? sv.w : sv.y;
      const uint32_t zw = zeros[g * (kWNA16TileN / 8) + lc / 8] >> (16 * (gi & 1));
      s2[0] = __byte_perm(lo, 0, 0x1010), s2[1] = __byte_perm(lo, 0, 0x3232);
      s2[2] = __byte_perm(hi, 0, 0x1010), s2[3] = __byte_perm(hi, 0, 0x3232);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float mz = Act<T>::kMagic + static_cast<float>((zw >> (4 * j)) & 15u);
        mz2[j] = Act<T>::pack(mz, mz);
      }
    };
    group_regs(0);
    float acc[kMT][4][4] = {};
    for_each_step([&](int step, int ls, const uint4& w) {
      uint32_t a_lo[kMT][4], a_hi[kMT][4];
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
        const char* xrow = smem + (16 * t + gi) * lay.x_stride + ls * (kWNA16StepK * 2) + 16 * gc;
        const uint4 xa = *reinterpret_cast<const uint4*>(xrow);
        const uint4 xb = *reinterpret_cast<const uint4*>(xrow + 8 * lay.x_stride);
        a_lo[t][0] = xa.x, a_lo[t][1] = xb.x, a_lo[t][2] = xa.y, a_lo[t][3] = xb.y;
        a_hi[t][0] = xa.z, a_hi[t][1] = xb.z, a_hi[t][2] = xa.w, a_hi[t][3] = xb.w;
      }
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t b[4];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          b[h] = Act<T>::dequant(and_or(words[j] >> (4 * h), 0x000F000Fu, Act<T>::kMagic2), mz2[j], s2[j]);
        }
#pragma unroll
        for (int t = 0; t < kMT; ++t) {
          Act<T>::mma(acc[t][j], a_lo[t], b[0], b[1]);
          Act<T>::mma(acc[t][j], a_hi[t], b[2], b[3]);
        }
      }
      if (step + 1 == next_flush) {  // the next group's scale and zero point
        ++gl;
        next_flush = min(s_end, next_flush + p.group_steps);
        if (step + 1 < s_end) group_regs(gl);
      }
    });
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) store(t, r, {acc[t][0][r], acc[t][1][r], acc[t][2][r], acc[t][3][r]});
    }
  } else {
    float acc[4][4] = {}, tot[4][4] = {}, xs0 = 0.f, xs1 = 0.f;
    for_each_step([&](int step, int ls, const uint4& w) {
      const char* xrow = smem + gi * lay.x_stride + ls * (kWNA16StepK * 2) + 16 * gc;
      const uint4 xa = *reinterpret_cast<const uint4*>(xrow);
      const uint4 xb = MT == 16 ? *reinterpret_cast<const uint4*>(xrow + 8 * lay.x_stride) : make_uint4(0, 0, 0, 0);
      const uint32_t a_lo[4] = {xa.x, xb.x, xa.y, xb.y}, a_hi[4] = {xa.z, xb.z, xa.w, xb.w};
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t q = words[j];
        Act<T>::mma(acc[j], a_lo, and_or(q, 0x000F000Fu, Act<T>::kMagic2),
                    and_or(q >> 4, 0x000F000Fu, Act<T>::kMagic2));
        Act<T>::mma(acc[j], a_hi, and_or(q >> 8, 0x000F000Fu, Act<T>::kMagic2),
                    and_or(q >> 12, 0x000F000Fu, Act<T>::kMagic2));
      }
      xs0 += xsum[gi * lay.xsum_stride + ls];
      if (MT == 16) xs1 += xsum[(gi + 8) * lay.xsum_stride + ls];
      if (step + 1 == next_flush) {  // group (or slice) ends: apply its zero point and scale
        const uint4 sv = scales[gl * (kWNA16TileN / 8) + (wcol / 8) + gc];
        const uint32_t zw = zeros[gl * (kWNA16TileN / 8) + (wcol / 8) + gc];
        const uint32_t sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
        for (int e = 0; e < 2; ++e) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {  // C column 2 gc + e of n-tile j is column 8 gc + 4 e + j
            const int c = 4 * e + j;
            const float2 s2 = Act<T>::unpack(sw[c / 2]);
            const float sc = c % 2 ? s2.y : s2.x;
            const float mz = Act<T>::kMagic + static_cast<float>((zw >> (4 * c)) & 15u);
            tot[j][e] = fmaf(sc, fmaf(-mz, xs0, acc[j][e]), tot[j][e]);
            if (MT == 16) tot[j][2 + e] = fmaf(sc, fmaf(-mz, xs1, acc[j][2 + e]), tot[j][2 + e]);
            acc[j][e] = acc[j][2 + e] = 0.f;
          }
        }
        xs0 = xs1 = 0.f;
        ++gl;
        next_flush = min(s_end, next_flush + p.group_steps);
      }
    });
#pragma unroll
    for (int r = 0; r < (MT == 16 ? 4 : 2); ++r) store(0, r, {tot[0][r], tot[1][r], tot[2][r], tot[3][r]});
  }
  finish_split<T, 4>(rows.split, out, bias, M, p.N, blockIdx.x, n0, kWNA16TileN);
}

// Dynamic shared memory of the NF4 kernel: the code-pair table, the activations, the resolved absmax.
struct NF4Smem {
  int x_off, x_stride, am_off, am_stride, bytes;
};

// The code-pair table: entry b for lane l at byte (b << 8) | (l << 2), so one byte permute turns a weight byte into
// its lane's address (bytes 128..255 of each entry's row stay unused).
constexpr int kNF4TableBytes = 256 * 256;
constexpr int kNF4Unroll = 2;  // a step moves twice the bytes of a WNA16 step: as many bytes in flight

__host__ __device__ inline NF4Smem nf4_smem(int mt, int steps_per_block) {
  NF4Smem s;
  s.x_off = kNF4TableBytes;
  s.x_stride = steps_per_block * kNF4StepK * 2 + 16;  // == 16 mod 128: conflict-free 16-byte reads
  s.am_off = align16(s.x_off + mt * s.x_stride);
  s.am_stride = (2 * steps_per_block) | 1;
  s.bytes = max(s.am_off + kNF4TileN * s.am_stride * 4, s.x_off + mt * kNF4TileN * 4);  // or the staged partials
  return s;
}

// bitsandbytes 4-bit, weights as the mma's A operand (16 weight rows x 16 k), activations as B (k x 8 tokens).
// Warp w owns weight rows [n0 + 16w, +16); per 128-wide K step lane (gi, gc) loads 16 bytes (k 32 gc .. +31) of
// rows gi and gi + 8, so that the 4 lanes of a row read 64 contiguous bytes. Lanes gc and gc ^ 2 then swap
// halves: each lane holds 16 k of each of the step's two 64-wide absmax blocks (lane gc: k 16 * koff(gc) + 0..15
// of a block, koff = 0, 2, 1, 3), and a block's product, scaled by its rows' absmax in fp32, is 4 k16 mma steps.
// Byte 2t and 2t + 1 of a lane's 8 bytes are its A pairs of k16 step t; a byte becomes its two 16-bit codes with
// one byte permute and one shared-memory read of a 256-entry pair table replicated per bank, so the warp's random
// lookups never conflict (the shift-mask-index of a 32-word-stride table took 4-5 integer instructions per lookup,
// half of the kernel's issue slots at M = 1).
// Blocks per multiprocessor: 2 (the 64 KB table), 1 at MT = 64 (registers).
template <typename T, int MT>
__global__ void __launch_bounds__(kThreads, MT > 32 ? 1 : 2) nf4_kernel(const NF4Params p) {
  static_assert(kThreads == 256, "one thread builds each of the table's 256 entries");
  extern __shared__ __align__(16) char smem[];
  constexpr int kTiles = MT / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, gi = lane >> 2, gc = lane & 3;
  const RowBlock<T> rows(p.x, p.out, p.split, p.M, p.N, p.K, MT, kNF4TileN, blockIdx.y);
  const int n0 = rows.n_tile * kNF4TileN, ra = n0 + 16 * warp + gi, rb = ra + 8;
  const int steps = (p.K + kNF4StepK - 1) / kNF4StepK, spb = p.split.steps_per_block;
  const int s_begin = blockIdx.x * spb, s_end = min(steps, s_begin + spb);
  const int M = rows.M;
  const T* x = rows.x;
  T* out = rows.out;
  const T* bias = static_cast<const T*>(p.bias);
  const int row_bytes = p.K / 2;

  auto load = [&](uint4(&wa)[kNF4Unroll], uint4(&wb)[kNF4Unroll], int s) {
#pragma unroll
    for (int u = 0; u < kNF4Unroll; ++u) {
      const int at = (s + u) * (kNF4StepK / 2) + 16 * gc;
      const bool ok = s + u < s_end && at < row_bytes;  // K % 128 == 64: the last step's second block is absent
      const uint4 zero = make_uint4(0, 0, 0, 0);
      wa[u] = ok && ra < p.N ? load_stream16(p.packed + static_cast<size_t>(ra) * row_bytes + at) : zero;
      wb[u] = ok && rb < p.N ? load_stream16(p.packed + static_cast<size_t>(rb) * row_bytes + at) : zero;
    }
  };
  let_dependents_launch();
  uint4 cur_a[kNF4Unroll], cur_b[kNF4Unroll];
  load(cur_a, cur_b, s_begin);  // in flight while the block builds its table and absmax, then stages activations

  const NF4Smem lay = nf4_smem(MT, spb);
  {  // thread b writes entry b's 32 copies, 16 bytes at a time, rotated by lane: a quarter warp covers 32 banks
    const int b = threadIdx.x;  // high nibble: the even k, the pair's first element
    const uint32_t v = Act<T>::pack(__ldg(p.code4 + (b >> 4)), __ldg(p.code4 + (b & 15)));
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      *reinterpret_cast<uint4*>(smem + (b << 8) + 16 * ((j + lane) & 7)) = make_uint4(v, v, v, v);
    }
  }
  // The slice's absmax, [row][64-wide block]: thread t resolves row t % 128's blocks t / 128, + 2, ...; a batch of
  // them issues all its first-level loads (codes), then all the second-level ones (nested code, absmax, offset),
  // two round trips per batch instead of two per block.
  static_assert(kThreads == 2 * kNF4TileN, "two threads per weight row of the tile resolve its absmax");
  float* am = reinterpret_cast<float*>(smem + lay.am_off);
  const int nb = 2 * (s_end - s_begin), blocks = p.K / 64, per_row = p.K / p.blocksize;
  const int r = threadIdx.x % kNF4TileN, n = n0 + r;
  const bool row_ok = n < p.N;
  const bool dq = p.double_quant;
  const int row_group = row_ok && dq ? __ldg(p.row_group + n) : 0;
  const int row_block = row_ok && dq ? __ldg(p.row_block + n) : 0;
  constexpr int kAbsBatch = 8;  // all of a thread's blocks at slices of up to 8 steps
  for (int lb0 = threadIdx.x / kNF4TileN; lb0 < nb; lb0 += 2 * kAbsBatch) {
    int code[kAbsBatch], group[kAbsBatch];
    bool ok[kAbsBatch];
    float v[kAbsBatch];
#pragma unroll
    for (int u = 0; u < kAbsBatch; ++u) {
      const int lb = lb0 + 2 * u, b64 = 2 * s_begin + lb;
      ok[u] = row_ok && lb < nb && b64 < blocks;
      const unsigned in_row = 64u * b64 / static_cast<unsigned>(p.blocksize);
      const size_t at = static_cast<size_t>(n) * per_row + in_row;
      code[u] = ok[u] && dq ? __ldg(static_cast<const uint8_t*>(p.absmax) + at) : 0;
      group[u] = row_group + static_cast<int>((row_block + in_row) / 256u);
      v[u] = ok[u] && !dq ? __ldg(static_cast<const float*>(p.absmax) + at) : 0.f;
    }
#pragma unroll
    for (int u = 0; u < kAbsBatch; ++u) {
      if (lb0 + 2 * u >= nb) break;
      if (dq && ok[u]) {  // nested_code[code] * nested_absmax[g] + nested_offset[g], rounded twice as bnb does
        v[u] = __fadd_rn(__fmul_rn(__ldg(p.ncode + code[u]), __ldg(p.nabs + group[u])), __ldg(p.noff + group[u]));
      }
      am[r * lay.am_stride + lb0 + 2 * u] = v[u];
    }
  }
  wait_for_inputs();
  char* xs = smem + lay.x_off;
  stage_x<T, false>(x, nullptr, M, p.K, s_begin * kNF4StepK, (s_end - s_begin) * (kNF4StepK / 8), MT, xs,
                    lay.x_stride, nullptr, 0);
  __syncthreads();

  const bool low = gc < 2;
  const int koff = 16 * ((gc & 1) * 2 + (gc >> 1));
  // Lane gc keeps the half of its 16 bytes in its own block and takes the partner's half in the other one.
  auto exchange = [&](const uint4& w, uint2& first, uint2& second) {
    const uint32_t r0 = __shfl_xor_sync(0xffffffffu, low ? w.z : w.x, 2);
    const uint32_t r1 = __shfl_xor_sync(0xffffffffu, low ? w.w : w.y, 2);
    first = low ? make_uint2(w.x, w.y) : make_uint2(r0, r1);
    second = low ? make_uint2(r0, r1) : make_uint2(w.z, w.w);
  };
  const uint32_t lane_bytes = lane << 2;
  // Byte i of q as its lane's table entry: byte 0 of the address = lane_bytes, byte 1 = byte i of q, the rest 0.
  auto lut = [&](uint32_t q, int i) {
    return *reinterpret_cast<const uint32_t*>(smem + __byte_perm(q, lane_bytes, 0x5504 | (i << 4)));
  };
  float tot[kTiles][4] = {};
  for (int s = s_begin; s < s_end; s += kNF4Unroll) {
    uint4 nxt_a[kNF4Unroll], nxt_b[kNF4Unroll];
    load(nxt_a, nxt_b, s + kNF4Unroll);
#pragma unroll
    for (int u = 0; u < kNF4Unroll; ++u) {
      const int ls = s + u - s_begin;
      if (s + u >= s_end) break;
      uint2 wa[2], wb[2];
      exchange(cur_a[u], wa[0], wa[1]);
      exchange(cur_b[u], wb[0], wb[1]);
#pragma unroll
      for (int blk = 0; blk < 2; ++blk) {
        const char* xrow = xs + gi * lay.x_stride + (ls * kNF4StepK + 64 * blk + koff) * 2;
        float acc[kTiles][4] = {};
#pragma unroll
        for (int half = 0; half < 2; ++half) {  // bytes 4 half .. 4 half + 3: k16 steps 2 half, 2 half + 1
          const uint32_t qa = half ? wa[blk].y : wa[blk].x, qb = half ? wb[blk].y : wb[blk].x;
          uint4 xv[kTiles];
#pragma unroll
          for (int t = 0; t < kTiles; ++t) {
            xv[t] = *reinterpret_cast<const uint4*>(xrow + 8 * t * lay.x_stride + 16 * half);
          }
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t a[4] = {lut(qa, 2 * h), lut(qb, 2 * h), lut(qa, 2 * h + 1), lut(qb, 2 * h + 1)};
#pragma unroll
            for (int t = 0; t < kTiles; ++t) Act<T>::mma(acc[t], a, h ? xv[t].z : xv[t].x, h ? xv[t].w : xv[t].y);
          }
        }
        const float sa = am[(16 * warp + gi) * lay.am_stride + 2 * ls + blk];
        const float sb = am[(16 * warp + gi + 8) * lay.am_stride + 2 * ls + blk];
#pragma unroll
        for (int t = 0; t < kTiles; ++t) {
          tot[t][0] = fmaf(sa, acc[t][0], tot[t][0]);
          tot[t][1] = fmaf(sa, acc[t][1], tot[t][1]);
          tot[t][2] = fmaf(sb, acc[t][2], tot[t][2]);
          tot[t][3] = fmaf(sb, acc[t][3], tot[t][3]);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kNF4Unroll; ++u) {
      cur_a[u] = nxt_a[u];
      cur_b[u] = nxt_b[u];
    }
  }

  // From 16 rows of M, a split's partials go through shared memory ([MT][kNF4TileN] in place of the activations)
  // to leave as one 16-byte reduction per 4 outputs instead of a scalar atomic per output: H100, 8B shapes, 1-4%
  // faster at M = 16; at M = 1 the two extra barriers cost more (1.5-2.4% slower) than the few atomics they save.
  const bool staged = MT > 8 && rows.split.splits > 1 && p.N % 4 == 0;
  float* part = reinterpret_cast<float*>(xs);
  if (staged) __syncthreads();
#pragma unroll
  for (int t = 0; t < kTiles; ++t) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {  // C (weight row, token): rows gi / gi + 8, tokens 2 gc, 2 gc + 1
      const int m = 8 * t + 2 * gc + (r & 1), n = r < 2 ? ra : rb;
      if (m >= M || n >= p.N) continue;
      if (staged) {
        part[m * kNF4TileN + n - n0] = tot[t][r];
      } else {
        emit(rows.split, out, bias, p.N, m, n, tot[t][r]);
      }
    }
  }
  if (staged) {
    __syncthreads();
    const int width = min(kNF4TileN, p.N - n0) / 4;
    for (int idx = threadIdx.x; idx < M * width; idx += kThreads) {
      const int m = idx / width, c = 4 * (idx - m * width);
      const float4 v = *reinterpret_cast<const float4*>(part + m * kNF4TileN + c);
      red_add4(rows.split.ws + static_cast<size_t>(m) * p.N + n0 + c, v.x, v.y, v.z, v.w);
    }
  }
  finish_split<T, 1>(rows.split, out, bias, M, p.N, blockIdx.y, n0, kNF4TileN);
}

// WNA16: N tiles vary fastest, so the blocks running together read whole rows of qweight.
template <typename T, int MT>
cudaError_t launch_wna16_t(const WNA16Params& p, cudaStream_t stream) {
  const dim3 grid(output_tiles(p.M, p.N, kWNA16TileN, kWNA16MaxRows), p.split.splits);
  return launch(wna16_kernel<T, MT>, p, grid,
                wna16_smem(MT, p.split.steps_per_block, p.group_steps, p.NG).bytes, stream);
}

// NF4: K slices vary fastest, so the blocks running together read whole rows of the row-major weight (one
// slice of many rows at a time would be a 2 KB-strided walk).
template <typename T, int MT>
cudaError_t launch_nf4_t(const NF4Params& p, cudaStream_t stream) {
  const dim3 grid(p.split.splits, output_tiles(p.M, p.N, kNF4TileN, kNF4MaxRows));
  return launch(nf4_kernel<T, MT>, p, grid, nf4_smem(MT, p.split.steps_per_block).bytes, stream);
}

// out = x[:, perm] for [M, K] 16-bit rows, K % 8 == 0: each thread gathers 8 columns of one row (perm stays in L1,
// the row in L1/L2) and stores them as one 16-byte vector. One short launch, where torch's index_select costs
// about three times a copy's.
__global__ void permute_cols_kernel(const uint16_t* __restrict__ x, const int32_t* __restrict__ perm,
                                    uint16_t* __restrict__ out, int M, int K) {
  const int chunks = K / 8, idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= M * chunks) return;
  const int m = idx / chunks, k = 8 * (idx - m * chunks);
  const uint16_t* row = x + static_cast<size_t>(m) * K;
  const int4 lo = __ldg(reinterpret_cast<const int4*>(perm + k)), hi = __ldg(reinterpret_cast<const int4*>(perm + k + 4));
  auto pair = [&](int a, int b) { return static_cast<uint32_t>(row[a]) | (static_cast<uint32_t>(row[b]) << 16); };
  *reinterpret_cast<uint4*>(out + static_cast<size_t>(m) * K + k) =
      make_uint4(pair(lo.x, lo.y), pair(lo.z, lo.w), pair(hi.x, hi.y), pair(hi.z, hi.w));
}

}  // namespace

cudaError_t launch_permute_cols(const void* x, const int32_t* perm, void* out, int M, int K, cudaStream_t stream) {
  const int threads = 256, blocks = (M * (K / 8) + threads - 1) / threads;
  permute_cols_kernel<<<blocks, threads, 0, stream>>>(static_cast<const uint16_t*>(x), perm,
                                                       static_cast<uint16_t*>(out), M, K);
  return cudaGetLastError();
}

cudaError_t launch_wna16(const WNA16Params& p, cudaStream_t stream) {
  switch (block_rows(p.M, kWNA16MaxRows)) {
    case 8: return p.bf16 ? launch_wna16_t<__nv_bfloat16, 8>(p, stream) : launch_wna16_t<__half, 8>(p, stream);
    case 16: return p.bf16 ? launch_wna16_t<__nv_bfloat16, 16>(p, stream) : launch_wna16_t<__half, 16>(p, stream);
    default: return p.bf16 ? launch_wna16_t<__nv_bfloat16, 32>(p, stream) : launch_wna16_t<__half, 32>(p, stream);
  }
}

cudaError_t launch_nf4(const NF4Params& p, cudaStream_t stream) {
  switch (block_rows(p.M, kNF4MaxRows)) {
    case 8: return p.bf16 ? launch_nf4_t<__nv_bfloat16, 8>(p, stream) : launch_nf4_t<__half, 8>(p, stream);
    case 16: return p.bf16 ? launch_nf4_t<__nv_bfloat16, 16>(p, stream) : launch_nf4_t<__half, 16>(p, stream);
    case 32: return p.bf16 ? launch_nf4_t<__nv_bfloat16, 32>(p, stream) : launch_nf4_t<__half, 32>(p, stream);
    default: return p.bf16 ? launch_nf4_t<__nv_bfloat16, 64>(p, stream) : launch_nf4_t<__half, 64>(p, stream);
  }
}

int nf4_smem_bytes(int rows, int steps_per_block) { return nf4_smem(rows, steps_per_block).bytes; }

}  // namespace quantkit
