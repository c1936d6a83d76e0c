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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#define OMLX_DPBF16 1
#else
#define OMLX_DPBF16 0
#endif

#include "mlx/types/half_types.h"

#include "common.h"
#include "bf16_panel.h"

namespace {

constexpr int PANEL = omlx_cpu::BF16_PANEL;  // output columns per panel: four 16-lane registers (as linear_bf16.cpp)
using omlx_cpu::from_bf16;
using omlx_cpu::to_bf16;
constexpr int FUSED_ROWS = 4;  // up to this many rows unpack in registers, each pair used R times

enum ScaleType { kF16 = 0, kBF16 = 1, kF32 = 2 };

struct Problem {
  const float* x;  // (M, K) float32
  const uint8_t* codes;  // (panels, k_pairs, 64 or 128)
  const void* scales;  // (panels, groups, 64)
  const void* biases;
  const float* bias;  // (N,) or null
  float* y;  // (M, N)
  int64_t m, n, k, k_pairs, panels, groups;
  int bits, group_pairs, scale_type;
  std::vector<int64_t> x_shape, x_strides;  // set when x is not row-contiguous
  int64_t bias_stride = 1;

  int64_t pair_bytes() const {
    return bits == 4 ? PANEL : 2 * PANEL;
  }
};

inline float scale_value(const void* base, int type, int64_t i) {
  if (type == kF32) return static_cast<const float*>(base)[i];
  const uint16_t h = static_cast<const uint16_t*>(base)[i];
  if (type == kBF16) return from_bf16(h);
  mx::float16_t v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

#if OMLX_DPBF16
constexpr int ROUND = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// Codes become floats without a conversion instruction (those compete with the multiplies
// for the FP pipes): OR-ing a code q < 2^23 into the bits of 2^23 gives the float 2^23 + q,
// and fma(2^23 + q, scale, -2^23 * scale) is exactly scale * q rounded once, which is
// mx.dequantize's product (-2^23 * scale is exact: a power-of-two multiple).
constexpr int MAGIC = 0x4B000000;  // 2^23 as float32 bits
constexpr float TWO_23 = 8388608.0f;

// One group's scales and biases for one 16-column register of a panel, spread to the lane
// pairs of its b / a halves, with the offsets -2^23 * scale that undo the magic.  Six
// registers: a register's columns run through a whole group with these held (the four
// registers' 24 would spill, and reloading them costs more than the unpack).
struct Scales {
  __m512 sb, sa, ob, oa, bb, ba;
};

inline __m512 load16(const void* base, int type, int64_t at) {
  if (type == kF32) return _mm512_loadu_ps(static_cast<const float*>(base) + at);
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + at));
  if (type == kF16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline Scales load_scales(const Problem& p, int64_t panel, int64_t g, int t) {
  const __m512i low = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
  const int64_t at = (panel * p.groups + g) * PANEL + 16 * t;
  const __m512 sc = load16(p.scales, p.scale_type, at);
  const __m512 bi = load16(p.biases, p.scale_type, at);
  Scales s;
  s.sb = _mm512_permutexvar_ps(low, sc);
  s.sa = _mm512_permutexvar_ps(high, sc);
  s.ob = _mm512_mul_ps(s.sb, _mm512_set1_ps(-TWO_23));
  s.oa = _mm512_mul_ps(s.sa, _mm512_set1_ps(-TWO_23));
  s.bb = _mm512_permutexvar_ps(low, bi);
  s.ba = _mm512_permutexvar_ps(high, bi);
  return s;
}

// scale * q rounded, then + bias rounded (the add cannot be contracted: explicit rounding).
inline __m512 dequant(__m512i magic_q, __m512 scale, __m512 offset, __m512 bias) {
  return _mm512_add_round_ps(_mm512_fmadd_ps(_mm512_castsi512_ps(magic_q), scale, offset), bias, ROUND);
}

// Register t of one k pair of a panel (the pair's codes at `src`) as linear_bf16.cpp's bf16
// weight register t.
template <int BITS>
inline __m512bh unpack(const uint8_t* src, int t, const Scales& s) {
  const __m512i magic = _mm512_set1_epi32(MAGIC);
  __m512i qb, qa;
  if constexpr (BITS == 4) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 16 * t)));
    qb = _mm512_ternarylogic_epi32(v, _mm512_set1_epi32(0x0F), magic, 0xEA);  // (v & 15) | magic
    qa = _mm512_or_si512(_mm512_srli_epi32(v, 4), magic);
  } else {
    qb = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * t))), magic);
    qa = _mm512_or_si512(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + 32 * t + 16))),
                         magic);
  }
  return _mm512_cvtne2ps_pbh(dequant(qa, s.sa, s.oa, s.ba), dequant(qb, s.sb, s.ob, s.bb));
}

// Register T's columns through group g for R rows: each k pair unpacked once in registers
// and used by all R rows.  A column's pairs are still accumulated in k order.
template <int BITS, int R, int T>
inline void fused_register(const Problem& p, const uint32_t* x, int64_t panel, int64_t g, __m512 (&acc)[R][4]) {
  const Scales s = load_scales(p, panel, g, T);
  const int64_t kp0 = g * p.group_pairs;
  const uint8_t* src = p.codes + (panel * p.k_pairs + kp0) * p.pair_bytes();
  for (int64_t kp = kp0; kp < kp0 + p.group_pairs; ++kp, src += p.pair_bytes()) {
    const __m512bh w = unpack<BITS>(src, T, s);
    for (int r = 0; r < R; ++r)
      acc[r][T] = _mm512_dpbf16_ps(acc[r][T], (__m512bh)_mm512_set1_epi32(int(x[r * p.k_pairs + kp])), w);
  }
}

// Few rows: the weights unpacked in registers, never stored.
template <int BITS, int R>
void fused_rows(const Problem& p, const uint32_t* x, int64_t panel, float* y, int cols, const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    fused_register<BITS, R, 0>(p, x, panel, g, acc);
    if (cols > 16) fused_register<BITS, R, 1>(p, x, panel, g, acc);
    if (cols > 32) fused_register<BITS, R, 2>(p, x, panel, g, acc);
    if (cols > 48) fused_register<BITS, R, 3>(p, x, panel, g, acc);
  }
  omlx_cpu::store_rows<R>(acc, y, p.n, cols, bias);
}

// A whole panel unpacked into `scratch` in linear_bf16.cpp's packed layout (k pairs x 64
// columns x 2 bf16).
template <int BITS>
void unpack_panel(const Problem& p, int64_t panel, uint16_t* scratch) {
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int t = 0; t < 4; ++t) {
      const Scales s = load_scales(p, panel, g, t);
      const int64_t first = g * p.group_pairs;
      const uint8_t* src = p.codes + (panel * p.k_pairs + first) * p.pair_bytes();
      uint16_t* dst = scratch + first * (2 * PANEL) + 32 * t;
      for (int64_t kp = 0; kp < p.group_pairs; ++kp, src += p.pair_bytes(), dst += 2 * PANEL)
        _mm512_store_si512(dst, (__m512i)unpack<BITS>(src, t, s));
    }
  }
}

template <int BITS>
void panel_fused(const Problem& p, const uint32_t* pairs, int64_t panel, float* y, int cols, const float* bias) {
  switch (p.m) {
    case 1: fused_rows<BITS, 1>(p, pairs, panel, y, cols, bias); break;
    case 2: fused_rows<BITS, 2>(p, pairs, panel, y, cols, bias); break;
    case 3: fused_rows<BITS, 3>(p, pairs, panel, y, cols, bias); break;
    case 4: fused_rows<BITS, 4>(p, pairs, panel, y, cols, bias); break;
    default: break;
  }
}

// More rows: the panel unpacked once into the thread's scratch (K x 256 bytes, in L2 for
// the models we run), then every block of rows streams it as linear_bf16.cpp streams its
// packed panel.
template <int BITS>
void panel_scratch(const Problem& p, const uint32_t* pairs, int64_t panel, float* y0, int cols, const float* bias,
                   uint16_t* scratch) {
  unpack_panel<BITS>(p, panel, scratch);
  omlx_cpu::panel_micro_rows(pairs, p.m, p.k_pairs, scratch, y0, p.n, cols, bias);
}

// `scratch` (k_pairs x 128 bf16, 64-byte aligned) is the calling thread's, used past FUSED_ROWS rows.
void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t* scratch) {
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  const float* bias = p.bias ? p.bias + col0 : nullptr;
  float* y = p.y + col0;
  const bool fused = p.m <= FUSED_ROWS;
  if (p.bits == 4)
    fused ? panel_fused<4>(p, pairs, panel, y, cols, bias) : panel_scratch<4>(p, pairs, panel, y, cols, bias, scratch);
  else
    fused ? panel_fused<8>(p, pairs, panel, y, cols, bias) : panel_scratch<8>(p, pairs, panel, y, cols, bias, scratch);
}
#else
// Without AVX512-BF16 at build time: the same products in the same pair order, one column at a
// time (not bit-identical to the instruction, which flushes denormals; omlx chooses this
// module only where the CPU has the instruction, as for linear_bf16.cpp).
void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t*) {
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  const uint8_t* src = p.codes + panel * p.k_pairs * p.pair_bytes();
  for (int c = 0; c < cols; ++c) {
    const int t = c / 16, j = c % 16, half = j / 8, lane = 2 * (j % 8);
    for (int64_t r = 0; r < p.m; ++r) {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(pairs + r * p.k_pairs);
      float acc = 0.f;
      for (int64_t kp = 0; kp < p.k_pairs; ++kp) {
        const int64_t at = (panel * p.groups + kp / p.group_pairs) * PANEL + c;
        const float s = scale_value(p.scales, p.scale_type, at), b = scale_value(p.biases, p.scale_type, at);
        const uint8_t* pair = src + kp * p.pair_bytes();
        for (int e = 0; e < 2; ++e) {
          int q;
          if (p.bits == 4) {
            const uint8_t byte = pair[16 * t + lane + e];
            q = half ? byte >> 4 : byte & 0x0F;
          } else {
            q = pair[32 * t + 16 * half + lane + e];
          }
          const volatile float scaled = s * float(q);  // rounded before the bias add, as MLX does
          acc += from_bf16(xr[2 * kp + e]) * from_bf16(to_bf16(scaled + b));
        }
      }
      p.y[r * p.n + col0 + c] = acc + (p.bias ? p.bias[col0 + c] : 0.0f);
    }
  }
}
#endif

void run(const Problem& given) {
  Problem p = given;
  std::vector<float> gathered, bias;
  const std::vector<uint32_t> pairs = omlx_cpu::prepare_rows(p, gathered, bias);
  const bool parallel = omlx_cpu::worth_threads(p);  // as for linear_bf16.cpp
  const size_t scratch_size = p.m > FUSED_ROWS ? size_t(p.k_pairs) * 2 * PANEL : 0;
#pragma omp parallel if (parallel)
  {
    std::vector<uint16_t> scratch(scratch_size + 32);  // + 32: room to align to 64 bytes
    const auto at = reinterpret_cast<uintptr_t>(scratch.data());
    uint16_t* aligned = scratch.data() + ((64 - at % 64) % 64) / 2;
#pragma omp for schedule(static)
    for (int64_t panel = 0; panel < p.panels; ++panel) panel_rows(p, pairs.data(), panel, aligned);
  }
}

class QuantBf16Linear : public mx::Primitive {
 public:
  QuantBf16Linear(mx::Stream stream, int out_features, int bits, int group_size, bool has_bias)
      : mx::Primitive(stream), out_features_(out_features), bits_(bits), group_size_(group_size),
        has_bias_(has_bias) {}

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
    p.scale_type = dtype == mx::float16 ? kF16 : dtype == mx::bfloat16 ? kBF16 : kF32;
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
    enc.dispatch([p = std::move(p)]() { run(p); });
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
           o->has_bias_ == has_bias_;
  }

 private:
  int out_features_, bits_, group_size_;
  bool has_bias_;
};

// x (..., K) any float dtype; codes (N_pad / 64, K / 2, 64 or 128) uint8; scales and biases
// (N_pad / 64, K / group_size, 64) float16, bfloat16 or float32; bias (N,) or None.
mx::array linear(const mx::array& x, const mx::array& codes, const mx::array& scales, const mx::array& biases,
                 const std::optional<mx::array>& bias, int out_features, int bits, int group_size,
                 mx::StreamOrDevice s) {
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
  if (scales.dtype() != biases.dtype())
    throw std::invalid_argument("quantized bf16 linear: scales and biases differ in dtype");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != out_features))
    throw std::invalid_argument("quantized bf16 linear: bias must have shape (out_features,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // Only what is needed joins the graph: parameters are evaluated and contiguous (checked
  // here, copied only if not), and x is float32 in a float32 model.
  std::vector<mx::array> inputs = {x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream),
                                   omlx_cpu::as_rows(codes, stream), omlx_cpu::as_rows(scales, stream),
                                   omlx_cpu::as_rows(biases, stream)};
  if (bias) inputs.push_back(bias->dtype() == mx::float32 ? *bias : mx::astype(*bias, mx::float32, stream));
  mx::Shape shape = x.shape();
  shape.back() = out_features;
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantBf16Linear>(stream, out_features, bits, group_size, bias.has_value()),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_quant_bf16_cpu, m) {
  m.doc() = "omlx linear layer over 4/8-bit affine-quantized weights unpacked to bf16 (MLX CPU primitive)";
  m.def("linear", &linear, "x"_a, "codes"_a, "scales"_a, "biases"_a, "bias"_a = nb::none(), nb::kw_only(),
        "out_features"_a, "bits"_a, "group_size"_a, "stream"_a = nb::none(),
        "y = x @ dequant(W).T (+ bias), W's codes unpacked to bf16 panels (see omlx/kernels/quant_bf16.py).");
  m.attr("PANEL") = PANEL;
  m.attr("FUSED_ROWS") = FUSED_ROWS;
  m.def("isa", []() { return std::string(OMLX_DPBF16 ? "avx512_bf16" : "portable"); });
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
