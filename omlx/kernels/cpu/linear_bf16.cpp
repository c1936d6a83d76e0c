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
#include "bf16_panel.h"
#include "spin_pool_bindings.h"

namespace {

constexpr int PANEL = omlx_cpu::BF16_PANEL;  // output columns per packed panel (four 16-lane registers)
using omlx_cpu::convert_rows;
using omlx_cpu::from_bf16;
using omlx_cpu::gather_rows;

struct Problem {
  const float* x;          // (M, K) float32
  const uint16_t* w;       // packed bf16 (N_pad / 64, K_pad / 2, 64, 2)
  const float* bias;       // (N,) or null
  float* y;                // (M, N) float32
  int64_t m, n, k, k_pairs, panels;
  std::vector<int64_t> x_shape, x_strides;  // set when x is not row-contiguous
  int64_t bias_stride = 1;
};

#if OMLX_DPBF16
void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel) {
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  omlx_cpu::panel_micro_rows(pairs, p.m, p.k_pairs, p.w + panel * p.k_pairs * (2 * PANEL), p.y + col0, p.n, cols,
                             p.bias ? p.bias + col0 : nullptr);
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
  const std::vector<uint32_t> pairs = omlx_cpu::prepare_rows(p, gathered, bias);
  omlx_cpu::for_panels(p, omlx_cpu::worth_threads(p), [&](int64_t panel) { panel_rows(p, pairs.data(), panel); });
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
  omlx_cpu::bind_pool_tools(m);
}
