// y = x @ dequant(Wq).T (+ b) for float32 x and y, with 4- / 8-bit affine-quantized weights
// held as stored (MLX's groups of 32 / 64 / 128 along K: w = scale * q + bias) and computed in
// bf16 on the CPU's bf16 dot-product unit.
//
// Why: the packed bf16 path (linear_bf16.cpp) is the fastest form for many rows, but a decode
// step reads 2 bytes per weight (3.5x a 4-bit model's bytes) and holds 4x its stored bytes.
// Here the weights stay in their quantized blocks; each 64-column panel is unpacked to bf16 in
// registers (a few rows: the unpack feeds the dot products directly) or, for more rows, once
// into a per-thread scratch panel (K x 256 bytes, L2-resident) that every block of rows then
// streams as linear_bf16.cpp streams its packed panel (the unpack is paid once per step, not
// per row).
//
// Bit-identical to linear_bf16.cpp on the dequantized weights: every weight is dequantized as
// mx.dequantize does (scale * q rounded, then + bias rounded: two roundings, not a fused
// multiply-add, hence the explicit-rounding intrinsics below, which -ffp-contract cannot fuse)
// and rounded to bf16 to nearest even (vcvtne2ps2bf16); x is rounded as there; and every
// output element is one float32 lane accumulated by vdpbf16ps over the k pairs in order from
// zero, the bias added last.  (vcvtne2ps2bf16 flushes a denormal weight to zero where
// astype(bfloat16) keeps it, but vdpbf16ps reads denormal inputs as zero, so the products
// agree.)  So the two paths (and any number of rows or threads) give the same bits.
//
// Layout (omlx/kernels/quant_bf16.py repacks it at load): N padded to a multiple of the panel;
// per (panel, k pair) the four 16-column registers' codes.  vcvtne2ps2bf16(a, b) puts b's 16
// floats in the low half, so register t's lane j (column 16t + j) gets the bf16 pair (b[2j],
// b[2j + 1]) for j < 8 and (a[2j - 16], a[2j - 15]) for j >= 8: b holds columns 16t .. 16t+7
// and a columns 16t+8 .. 16t+15, each as (k, k+1) in adjacent lanes.  4-bit: 16 bytes per
// register, byte i's low nibble b's lane i and its high nibble a's (one zero-extending load, a
// mask and a shift); 8-bit: 32 bytes, b's 16 lanes then a's.  Scales and biases per
// (panel, group) as 64 contiguous values in their stored dtype (float16, bfloat16 or
// float32), widened exactly and spread to the lane pairs once per group.

// MLX primitive over the quantized-bf16 kernel (quant_bf16_kernel.h: what it computes, its
// layout and why it is bit-identical to linear_bf16.cpp), optionally holding the same layer's
// packed bf16 panels too ("dual form", omlx/models/dual_form.py): a call with at least
// `packed_from_rows` rows then runs linear_bf16.cpp's loop over the packed panels (the shared
// bf16_panel.h micro-kernel, so the same bits), fewer rows the quantized codes.  The choice is
// made here, at evaluation, from the rows the call actually has, so one graph (also one
// mx.compile(shapeless=True) trace) serves every row count and a row's result never depends on
// which kernel ran.

#include <optional>
#include <stdexcept>
#include <string>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define OMLX_DPBF16 1
#else
#define OMLX_DPBF16 0
#endif

#include "common.h"
#include "quant_bf16_kernel.h"
#include "spin_pool_bindings.h"

namespace {

using omlx_quant_bf16::FUSED_ROWS;
using omlx_quant_bf16::PANEL;
using omlx_quant_bf16::Problem;

// linear_bf16.cpp's run over packed bf16 panels (N_pad / 64, K / 2, 128), for the rows a dual
// layer sends there.
void run_packed(const Problem& given, const uint16_t* packed) {
  Problem p = given;
  std::vector<float> gathered, bias;
  const std::vector<uint32_t> pairs = omlx_cpu::prepare_rows(p, gathered, bias);
#if OMLX_DPBF16
  omlx_cpu::for_panels(p, omlx_cpu::worth_threads(p), [&](int64_t panel) {  // packed bf16's rule
    const int64_t col0 = panel * PANEL;
    const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
    omlx_cpu::panel_micro_rows(pairs.data(), p.m, p.k_pairs, packed + panel * p.k_pairs * (2 * PANEL), p.y + col0,
                               p.n, cols, p.bias ? p.bias + col0 : nullptr);
  });
#else
  (void)packed;
  throw std::runtime_error("quantized bf16 linear: the packed rows need AVX512-BF16 in the build");
#endif
}

class QuantBf16Linear : public mx::Primitive {
 public:
  QuantBf16Linear(mx::Stream stream, int out_features, int bits, int group_size, bool has_bias, bool has_packed,
                  int packed_from_rows)
      : mx::Primitive(stream), out_features_(out_features), bits_(bits), group_size_(group_size),
        packed_from_rows_(packed_from_rows), has_bias_(has_bias), has_packed_(has_packed) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& x = inputs[0];
    const auto& codes = inputs[1];
    Problem p{};
    p.x = x.data<float>();
    p.codes = codes.data<uint8_t>();
    p.scales = inputs[2].data<void>();
    p.biases = inputs[3].data<void>();
    const auto dtype = inputs[2].dtype();
    const bool offsets = dtype != mx::float32 && inputs[3].dtype() == mx::float32;  // c = bias - 2^bits * scale
    using namespace omlx_quant_bf16;
    p.scale_type = dtype == mx::float16    ? (offsets ? kF16Offsets : kF16)
                   : dtype == mx::bfloat16 ? (offsets ? kBF16Offsets : kBF16)
                                           : kF32;
    p.y = out.data<float>();
    p.k = x.shape(-1);
    p.m = p.k ? int64_t(x.size()) / p.k : 0;
    p.n = out_features_;
    p.panels = codes.shape(0);
    p.k_pairs = codes.shape(1);
    p.bits = bits_;
    p.group_pairs = group_size_ / 2;
    p.groups = p.k / group_size_;
    // A strided x (a transposed, sliced or broadcast view) is read through its strides, as
    // linear_bf16.cpp does, instead of a contiguous() node in every call's graph.
    if (!x.flags().row_contiguous) {
      p.x_shape.assign(x.shape().begin(), x.shape().end());
      p.x_strides.assign(x.strides().begin(), x.strides().end());
    }
    if (has_bias_) {
      const auto& b = inputs[4];
      p.bias = b.data<float>();
      p.bias_stride = b.strides(0);
    }
    if (p.m == 0) return;
    if (has_packed_ && p.m >= packed_from_rows_) {
      const uint16_t* packed = inputs.back().data<uint16_t>();
      enc.dispatch([p = std::move(p), packed]() { run_packed(p, packed); });
      return;
    }
    enc.dispatch([p = std::move(p)]() { omlx_quant_bf16::run(p); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx quantized bf16 linear: this extension runs on the CPU only");
  }

  const char* name() const override {
    return "OmlxQuantBf16Linear";
  }

  // Lets mx.compile(shapeless=True) reuse one compiled graph for every row count.
  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = out_features_;
    return {shape};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const QuantBf16Linear*>(&other);
    return o && o->out_features_ == out_features_ && o->bits_ == bits_ && o->group_size_ == group_size_ &&
           o->has_bias_ == has_bias_ && o->has_packed_ == has_packed_ && o->packed_from_rows_ == packed_from_rows_;
  }

 private:
  int out_features_, bits_, group_size_, packed_from_rows_;
  bool has_bias_, has_packed_;
};

// x (..., K) any float dtype; codes (N_pad / 64, K / 2, 64 or 128) uint8; scales and biases
// (N_pad / 64, K / group_size, 64) float16, bfloat16 or float32 (float32 biases beside half
// scales are the offsets bias - 2^bits * scale); bias (N,) or None; packed
// (N_pad / 64, K / 2, 128) bfloat16, the same weights dequantized and packed as linear_bf16.cpp
// packs them, or None: with it, calls of packed_from_rows rows or more read it instead.
mx::array linear(const mx::array& x, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                 const std::optional<mx::array>& bias, int out_features, int bits, int group_size,
                 const std::optional<mx::array>& packed, int packed_from_rows, mx::StreamOrDevice s) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("quantized bf16 linear: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("quantized bf16 linear: group_size must be 32, 64 or 128");
  if (x.ndim() < 1) throw std::invalid_argument("quantized bf16 linear: x must have a feature axis");
  const int k = x.shape(-1);
  if (k <= 0 || k % group_size) throw std::invalid_argument("quantized bf16 linear: K must be a multiple of group_size");
  if (codes.dtype() != mx::uint8 || codes.ndim() != 3 || codes.shape(1) != k / 2 ||
      codes.shape(2) != (bits == 4 ? PANEL : 2 * PANEL))
    throw std::invalid_argument("quantized bf16 linear: codes must be (panels, K / 2, " +
                                std::to_string(bits == 4 ? PANEL : 2 * PANEL) + ") uint8 for x's " +
                                std::to_string(k) + " features");
  if (out_features <= 0 || (out_features + PANEL - 1) / PANEL != codes.shape(0))
    throw std::invalid_argument("quantized bf16 linear: out_features does not match the panels");
  for (const auto* a : {&scales, &biases}) {
    if (a->ndim() != 3 || a->shape(0) != codes.shape(0) || a->shape(1) != k / group_size || a->shape(2) != PANEL)
      throw std::invalid_argument("quantized bf16 linear: scales / biases must be (panels, K / group_size, 64)");
    if (a->dtype() != mx::float16 && a->dtype() != mx::bfloat16 && a->dtype() != mx::float32)
      throw std::invalid_argument("quantized bf16 linear: scales / biases must be float16, bfloat16 or float32");
  }
  // One dtype for both, or half-precision scales with float32 offsets (quant_bf16_kernel.h).
  if (scales.dtype() != biases.dtype() && (scales.dtype() == mx::float32 || biases.dtype() != mx::float32))
    throw std::invalid_argument("quantized bf16 linear: scales and biases must share a dtype, or be half-precision "
                                "scales with float32 offsets");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != out_features))
    throw std::invalid_argument("quantized bf16 linear: bias must have shape (out_features,)");
  if (packed && (packed->dtype() != mx::bfloat16 || packed->ndim() != 3 || packed->shape(0) != codes.shape(0) ||
                 packed->shape(1) != k / 2 || packed->shape(2) != 2 * PANEL))
    throw std::invalid_argument("quantized bf16 linear: packed must be the packed bf16 panels (panels, K / 2, 128)");
  if (packed && packed_from_rows < 1)
    throw std::invalid_argument("quantized bf16 linear: packed_from_rows must be at least 1");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // Only what is needed joins the graph: parameters are evaluated and contiguous (checked
  // here, copied only if not), and x is float32 in a float32 model.
  std::vector<mx::array> inputs = {x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream),
                                   omlx_cpu::as_rows(codes, stream), omlx_cpu::as_rows(scales, stream),
                                   omlx_cpu::as_rows(biases, stream)};
  if (bias) inputs.push_back(bias->dtype() == mx::float32 ? *bias : mx::astype(*bias, mx::float32, stream));
  if (packed) inputs.push_back(omlx_cpu::as_rows(*packed, stream));
  mx::Shape shape = x.shape();
  shape.back() = out_features;
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantBf16Linear>(stream, out_features, bits, group_size, bias.has_value(),
                                                     packed.has_value(), packed ? packed_from_rows : 0),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_quant_bf16_cpu, m) {
  m.doc() = "omlx linear layer over 4/8-bit affine-quantized weights unpacked to bf16 (MLX CPU primitive)";
  m.def("linear", &linear, "x"_a, "codes"_a, "scales"_a, "biases"_a, "bias"_a = nb::none(), nb::kw_only(),
        "out_features"_a, "bits"_a, "group_size"_a, "packed"_a = nb::none(), "packed_from_rows"_a = 0,
        "stream"_a = nb::none(),
        "y = x @ dequant(W).T (+ bias), W's codes unpacked to bf16 panels (see omlx/kernels/quant_bf16.py); "
        "with `packed`, calls of packed_from_rows rows or more read the packed bf16 panels instead.");
  m.attr("PANEL") = PANEL;
  m.attr("FUSED_ROWS") = FUSED_ROWS;
  m.def("isa", []() { return std::string(OMLX_DPBF16 ? "avx512_bf16" : "portable"); });
  m.def("num_threads", &omlx_cpu::openmp_threads);
  omlx_cpu::bind_pool_tools(m);
}
