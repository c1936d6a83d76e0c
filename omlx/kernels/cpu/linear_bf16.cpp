// A packed bf16 linear layer for MLX on the CPU: y = x @ W.T (+ b), float32 x and y, W held
// in bf16 and packed once at load into the layout the CPU's bf16 dot-product unit wants.
//
// Why: MLX's CPU bf16 matmul does not use BLAS (a few GFLOP/s), and its float32 matmul reads
// 4 bytes per weight.  Decode (a few rows per step) is bound by the bytes of weights read, so
// reading bf16 once for all rows of a step halves that; with AVX512-BF16 (`vdpbf16ps`: 16
// float32 lanes, each += two bf16 products) the multiply side also runs at twice float32's
// rate.
//
// Packed layout (omlx/kernels/linear.py packs it): W (N, K) is padded to N_pad (a multiple of
// the 64-column panel) and K_pad (even), then stored as (N_pad / 64, K_pad / 2, 64, 2): for
// each panel of 64 output columns, for each pair of input features, the 64 columns' pair of
// weights.  One k-pair step of a panel is 256 contiguous bytes = four zmm registers, each
// holding 16 columns' (W[n, k], W[n, k+1]) in the pairs `vdpbf16ps` multiplies against a
// broadcast (x[k], x[k+1]).  A panel streams once per block of rows, so a step reads the
// weights once however many rows it has.
//
// Batch invariance: every output element is accumulated by the same instruction sequence
// (k pairs in order, in one float32 lane) whatever the number of rows or where the row sits
// in the batch; nothing splits K.  A request's result does not depend on its neighbours.
//
// Without AVX512-BF16 at build time a portable loop computes the same products in the same
// pair order (not bit-identical to the instruction, which flushes denormals); omlx only
// chooses this module where the CPU has the instruction (omlx/kernels/cpu_features.py).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#define OMLX_DPBF16 1
#else
#define OMLX_DPBF16 0
#endif

#include "common.h"

namespace {

constexpr int PANEL = 64;  // output columns per packed panel (four 16-lane registers)
constexpr int ROWS = 6;    // rows per micro-kernel call: 6 x 4 accumulators + 4 weights + 1 <= 32 zmm

struct Problem {
  const float* x;          // (M, K) float32
  const uint16_t* w;       // packed bf16 (N_pad / 64, K_pad / 2, 64, 2)
  const float* bias;       // (N,) or null
  float* y;                // (M, N) float32
  int64_t m, n, k, k_pairs, panels;
  std::vector<int64_t> x_shape, x_strides;  // set when x is not row-contiguous
  int64_t bias_stride = 1;
};

// x's rows gathered through its strides (any rank; broadcast axes have stride 0).
std::vector<float> gather_rows(const Problem& p) {
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
void convert_rows(const Problem& p, uint32_t* pairs) {
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

#if OMLX_DPBF16
template <int R>
inline void micro(const uint32_t* x, int64_t kp, const uint16_t* panel, float* y, int64_t n_stride, int cols,
                  const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t k = 0; k < kp; ++k) {
    const uint16_t* wk = panel + k * (2 * PANEL);
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
  for (int t = 0; t < 4; ++t) {
    const int left = cols - 16 * t;
    if (left <= 0) break;
    const __mmask16 mask = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * t) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm512_mask_storeu_ps(y + r * n_stride + 16 * t, mask, _mm512_add_ps(acc[r][t], b));
  }
}

void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel) {
  const uint16_t* w = p.w + panel * p.k_pairs * (2 * PANEL);
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  const float* bias = p.bias ? p.bias + col0 : nullptr;
  int64_t r = 0;
  for (; r + ROWS <= p.m; r += ROWS)
    micro<ROWS>(pairs + r * p.k_pairs, p.k_pairs, w, p.y + r * p.n + col0, p.n, cols, bias);
  const uint32_t* x = pairs + r * p.k_pairs;
  float* y = p.y + r * p.n + col0;
  switch (p.m - r) {
    case 1: micro<1>(x, p.k_pairs, w, y, p.n, cols, bias); break;
    case 2: micro<2>(x, p.k_pairs, w, y, p.n, cols, bias); break;
    case 3: micro<3>(x, p.k_pairs, w, y, p.n, cols, bias); break;
    case 4: micro<4>(x, p.k_pairs, w, y, p.n, cols, bias); break;
    case 5: micro<5>(x, p.k_pairs, w, y, p.n, cols, bias); break;
    default: break;
  }
}
#else
void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel) {
  const uint16_t* w = p.w + panel * p.k_pairs * (2 * PANEL);
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  for (int64_t r = 0; r < p.m; ++r) {
    const uint16_t* xr = reinterpret_cast<const uint16_t*>(pairs + r * p.k_pairs);
    float acc[PANEL] = {};
    for (int64_t k = 0; k < p.k_pairs; ++k) {
      const float x0 = from_bf16(xr[2 * k]), x1 = from_bf16(xr[2 * k + 1]);
      const uint16_t* wk = w + k * (2 * PANEL);
      for (int c = 0; c < PANEL; ++c) acc[c] += x0 * from_bf16(wk[2 * c]) + x1 * from_bf16(wk[2 * c + 1]);
    }
    float* y = p.y + r * p.n + col0;
    for (int c = 0; c < cols; ++c) y[c] = acc[c] + (p.bias ? p.bias[col0 + c] : 0.0f);
  }
}
#endif

void run(const Problem& given) {
  Problem p = given;
  std::vector<float> gathered, bias;
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
  // Threads only pay off past a few hundred kFLOP (waking a sleeping OpenMP pool costs tens of
  // microseconds); below that one thread streams the weights alone.
  const bool parallel = p.panels > 1 && p.m * p.n * p.k >= (int64_t(1) << 19);
#pragma omp parallel for schedule(static) if (parallel)
  for (int64_t panel = 0; panel < p.panels; ++panel) panel_rows(p, pairs.data(), panel);
}

class PackedLinear : public mx::Primitive {
 public:
  PackedLinear(mx::Stream stream, int out_features, bool has_bias)
      : mx::Primitive(stream), out_features_(out_features), has_bias_(has_bias) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    Problem p{};
    p.x = x.data<float>();
    p.w = reinterpret_cast<const uint16_t*>(w.data<void>());
    p.y = out.data<float>();
    p.k = x.shape(-1);
    p.m = p.k ? int64_t(x.size()) / p.k : 0;
    p.n = out_features_;
    p.panels = w.shape(0);
    p.k_pairs = w.shape(1);
    // A strided x (a transposed, sliced or broadcast view) is read through its strides, as
    // MLX's own matmul does, instead of a contiguous() node in every call's graph: decode
    // builds ~200 of these calls per token and each graph node costs microseconds.
    if (!x.flags().row_contiguous) {
      p.x_shape.assign(x.shape().begin(), x.shape().end());
      p.x_strides.assign(x.strides().begin(), x.strides().end());
    }
    if (has_bias_) {
      const auto& b = inputs[2];
      p.bias = b.data<float>();
      p.bias_stride = b.strides(0);
    }
    if (p.m == 0) return;
    enc.dispatch([p = std::move(p)]() { run(p); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx packed linear: this extension runs on the CPU only");
  }

  const char* name() const override {
    return "OmlxPackedLinearBf16";
  }

  // Lets mx.compile(shapeless=True) reuse one compiled graph for every row count.
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = out_features_;
    return {shape};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const PackedLinear*>(&other);
    return o && o->out_features_ == out_features_ && o->has_bias_ == has_bias_;
  }

 private:
  int out_features_;
  bool has_bias_;
};

// x (..., K) any float dtype; packed (N_pad / 64, K_pad / 2, 128) bfloat16; bias (N,) or None.
mx::array linear(const mx::array& x, const mx::array& packed, const std::optional<mx::array>& bias,
                 int out_features, int in_features, mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("packed linear: x must have a feature axis");
  if (packed.ndim() != 3 || packed.shape(2) != 2 * PANEL || packed.dtype() != mx::bfloat16)
    throw std::invalid_argument("packed linear: weights must be packed bf16 (panels, k_pairs, 128)");
  const int k = x.shape(-1);
  if ((k + 1) / 2 != packed.shape(1) || (in_features >= 0 && k != in_features))
    throw std::invalid_argument("packed linear: x has " + std::to_string(k) + " features, the weights " +
                                std::to_string(2 * packed.shape(1)) + " (padded)");
  if (out_features <= 0 || (out_features + PANEL - 1) / PANEL != packed.shape(0))
    throw std::invalid_argument("packed linear: out_features does not match the packed panels");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != out_features))
    throw std::invalid_argument("packed linear: bias must have shape (out_features,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // Only what is needed joins the graph: the weights are evaluated, contiguous parameters
  // (checked here, copied only if not), and x is float32 in a float32 model.
  std::vector<mx::array> inputs = {x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream),
                                   omlx_cpu::as_rows(packed, stream)};
  if (bias) inputs.push_back(bias->dtype() == mx::float32 ? *bias : mx::astype(*bias, mx::float32, stream));
  mx::Shape shape = x.shape();
  shape.back() = out_features;
  return mx::array(shape, mx::float32, std::make_shared<PackedLinear>(stream, out_features, bias.has_value()),
                   std::move(inputs));
}

// MoE experts: the same panel kernel, rows grouped by expert (gather_mm's job).
#include "linear_bf16_experts.h"

}  // namespace

NB_MODULE(_linear_cpu, m) {
  m.doc() = "omlx packed bf16 linear layer (MLX CPU primitive)";
  m.def("linear", &linear, "x"_a, "packed"_a, "bias"_a = nb::none(), nb::kw_only(), "out_features"_a,
        "in_features"_a = -1, "stream"_a = nb::none(), "y = x @ W.T (+ bias) with W packed bf16 (see omlx/kernels/linear.py).");
  m.def("expert_linear", &expert_linear, "x"_a, "experts"_a, "packed"_a, "bias"_a = nb::none(), nb::kw_only(),
        "out_features"_a, "in_features"_a = -1, "row_axis"_a = false, "stream"_a = nb::none(),
        "y[r] = x[r / fan] @ W[experts[r]].T (+ bias[experts[r]]), W packed bf16 per expert (omlx/kernels/expert_linear.py).");
  m.attr("PANEL") = PANEL;
  m.def("isa", []() { return std::string(OMLX_DPBF16 ? "avx512_bf16" : "portable"); });
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
