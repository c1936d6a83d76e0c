// What the two bf16 panel kernels share: linear_bf16.cpp (weights packed bf16 at load) and
// quant_bf16.cpp (4- / 8-bit codes unpacked to the same bf16 panels) read x the same way,
// round it to bf16 pairs the same way, and multiply R rows against a 64-column panel with the
// same `vdpbf16ps` micro-kernel, so that their results are the same bits.  One copy here keeps
// them so.
//
// The includer defines OMLX_DPBF16 (1 where the build has AVX512-BF16) and includes common.h
// first.  A kernel's problem type P has the fields these read: x, m, k, k_pairs, n, panels,
// x_shape / x_strides (set when x is not row-contiguous), bias and bias_stride.
#pragma once

#include <cstdlib>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "spin_pool.h"

namespace omlx_cpu {

constexpr int BF16_PANEL = 64;  // output columns per panel (four 16-lane registers)
constexpr int BF16_ROWS = 6;    // rows per micro-kernel call: 6 x 4 accumulators + 4 weights + 1 <= 32 zmm

// x's rows gathered through its strides (any rank; broadcast axes have stride 0).
template <class P>
std::vector<float> gather_rows(const P& p) {
  std::vector<float> rows(size_t(p.m * p.k));
  const int nd = int(p.x_shape.size());
  std::vector<int64_t> index(nd, 0);
  for (int64_t i = 0; i < p.m * p.k; ++i) {
    int64_t at = 0;
    for (int d = 0; d < nd; ++d) at += index[d] * p.x_strides[d];
    rows[i] = p.x[at];
    for (int d = nd - 1; d >= 0 && ++index[d] == p.x_shape[d]; --d) index[d] = 0;
  }
  return rows;
}

// float32 -> bf16, round to nearest even (what vcvtneps2bf16 and MLX's astype do), NaN kept NaN.
inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float from_bf16(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x rows as bf16 pairs (one uint32 per (x[k], x[k+1])), K padded to even with a zero.
template <class P>
void convert_rows(const P& p, uint32_t* pairs) {
  const int64_t k = p.k, kp = p.k_pairs;
  for (int64_t r = 0; r < p.m; ++r) {
    const float* src = p.x + r * k;
    uint16_t* dst = reinterpret_cast<uint16_t*>(pairs + r * kp);
    int64_t i = 0;
#if OMLX_DPBF16
    for (; i + 16 <= k; i += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + i)));
#endif
    for (; i < k; ++i) dst[i] = to_bf16(src[i]);
    if (k & 1) dst[k] = 0;
  }
}

// The start of a kernel's run: a strided x gathered into `gathered` and a strided bias into
// `bias` (p then points at them), then x's rows as bf16 pairs.
template <class P>
std::vector<uint32_t> prepare_rows(P& p, std::vector<float>& gathered, std::vector<float>& bias) {
  if (!p.x_shape.empty()) {
    gathered = gather_rows(p);
    p.x = gathered.data();
  }
  if (p.bias && p.bias_stride != 1) {
    bias.resize(size_t(p.n));
    for (int64_t j = 0; j < p.n; ++j) bias[j] = p.bias[j * p.bias_stride];
    p.bias = bias.data();
  }
  std::vector<uint32_t> pairs(size_t(p.m * p.k_pairs));
  convert_rows(p, pairs.data());
  return pairs;
}

// Threads pay off only where a call's work outweighs waking the sleeping OpenMP pool (tens of
// microseconds a call) and a second core adds throughput.  At decode row counts packed bf16 is
// bound by memory, and on a 2-core machine one core already streams it at the machine's
// bandwidth (31.1 GB/s one thread, 29.5 two, bench/llama_cpp_bench.py): there a second thread
// adds only its wake-up, so calls below 8M multiply-adds (a one-row SmolLM2 step's every call
// but the LM head) run on one (bench/decode_step_env.py: one-row step 0.84-0.87x, 4 rows 0.95x,
// 32 rows unchanged).  With more cores one core no longer saturates memory: the threshold stays
// a few hundred kFLOP.  OMLX_THREAD_MIN_WORK (m * n * k) overrides it (read once).
inline int64_t thread_min_work() {
  static const int64_t value = [] {
    const char* env = std::getenv("OMLX_THREAD_MIN_WORK");
    if (env != nullptr && *env) return std::max<int64_t>(1, std::atoll(env));
    return openmp_threads() <= 2 ? int64_t(1) << 23 : int64_t(1) << 19;
  }();
  return value;
}

template <class P>
bool worth_threads(const P& p) {
  return p.panels > 1 && p.m * p.n * p.k >= thread_min_work();
}

// f(panel) for every panel of a call: decode's small calls split over the spin pool's hot worker
// (spin_pool.h: pool_runs / pool_splits), the rest over OpenMP's threads where `threads` (the
// caller's rule: worth_threads above for packed panels; all calls when the pool is off,
// OMLX_KERNEL_SPIN_US=0).  Panels are independent, so the split never changes a bit.
template <class P, class F>
void for_panels(const P& p, bool threads, F&& f) {
  const int64_t work = p.m * p.n * p.k;
  if (pool_runs(p.m)) {
    auto panels = [&](int64_t begin, int64_t end) {
      for (int64_t panel = begin; panel < end; ++panel) f(panel);
    };
    if (pool_splits(p.panels, work))
      SpinPool::instance().for_ranges(p.panels, 1, panels);
    else
      panels(0, p.panels);
    return;
  }
#pragma omp parallel for schedule(static) if (threads)
  for (int64_t panel = 0; panel < p.panels; ++panel) f(panel);
}

#if OMLX_DPBF16
inline __mmask16 column_mask(int cols, int t) {
  const int left = cols - 16 * t;
  return left >= 16 ? __mmask16(0xffff) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
}

// R rows' accumulators + bias (a missing bias adds zero) into y's first `cols` columns.
template <int R>
inline void store_rows(__m512 (&acc)[R][4], float* y, int64_t n_stride, int cols, const float* bias) {
  for (int t = 0; t < 4; ++t) {
    const __mmask16 mask = column_mask(cols, t);
    if (!mask) break;
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * t) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * n_stride + 16 * t, mask, _mm512_add_ps(acc[r][t], b));
  }
}

// R rows of bf16 pairs against one bf16 panel (k pairs x 64 columns x 2): every output element
// one float32 lane accumulated over the k pairs in order from zero, the bias added last.
template <int R>
inline void micro(const uint32_t* x, int64_t kp, const uint16_t* panel, float* y, int64_t n_stride, int cols,
                  const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    const uint16_t* wk = panel + k * (2 * BF16_PANEL);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wk);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wk + 32);
    const __m512bh w2 = (__m512bh)_mm512_loadu_si512(wk + 64);
    const __m512bh w3 = (__m512bh)_mm512_loadu_si512(wk + 96);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(x[r * kp + k]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], xb, w2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], xb, w3);
    }
  }
  store_rows<R>(acc, y, n_stride, cols, bias);
}

// All m rows against one panel: blocks of BF16_ROWS, then the remainder in one call.
inline void panel_micro_rows(const uint32_t* pairs, int64_t m, int64_t kp, const uint16_t* panel, float* y0,
                             int64_t n_stride, int cols, const float* bias) {
  int64_t r = 0;
  for (; r + BF16_ROWS <= m; r += BF16_ROWS)
    micro<BF16_ROWS>(pairs + r * kp, kp, panel, y0 + r * n_stride, n_stride, cols, bias);
  const uint32_t* x = pairs + r * kp;
  float* y = y0 + r * n_stride;
  switch (m - r) {
    case 1: micro<1>(x, kp, panel, y, n_stride, cols, bias); break;
    case 2: micro<2>(x, kp, panel, y, n_stride, cols, bias); break;
    case 3: micro<3>(x, kp, panel, y, n_stride, cols, bias); break;
    case 4: micro<4>(x, kp, panel, y, n_stride, cols, bias); break;
    case 5: micro<5>(x, kp, panel, y, n_stride, cols, bias); break;
    default: break;
  }
}
#endif

}  // namespace omlx_cpu
