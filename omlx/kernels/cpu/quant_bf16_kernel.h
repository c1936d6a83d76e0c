// The quantized-bf16 kernel itself (quant_bf16.cpp wraps it in an MLX primitive): y = x @
// dequant(Wq).T (+ b) for float32 x and y, with 4- / 8-bit affine-quantized weights held as
// stored (MLX's groups of 32 / 64 / 128 along K: w = scale * q + bias), computed in bf16 on the
// CPU's bf16 dot-product unit.  No MLX types here beyond half_types.h, so a stand-alone
// harness can time and profile it.
//
// Why: the packed bf16 path (linear_bf16.cpp) reads 2 bytes per weight, which bounds one decode
// stream; here the weights stay in their quantized blocks (4.5 bits a weight for 4-bit groups of
// 32) and each 64-column panel is unpacked to bf16 in registers (up to FUSED_ROWS rows: the
// unpack feeds the dot products directly) or, for more rows, once per step into a per-thread
// scratch panel (K x 256 bytes, L2-resident) that every block of rows then streams as
// linear_bf16.cpp streams its packed panel.
//
// Bit-identical to linear_bf16.cpp on the dequantized weights: every weight is dequantized as
// mx.dequantize does in float32 (scale * q rounded, then + bias rounded) and rounded to bf16 to
// nearest even (vcvtne2ps2bf16); x is rounded as there; and every output element is one float32
// lane accumulated by vdpbf16ps over the k pairs in order from zero, the bias added last.  So
// the two paths (and any number of rows or threads) give the same bits.  For float16 and
// bfloat16 scales the product scale * q is exact in float32 (11 + 8 significant bits), so one
// fused multiply-add gives mx.dequantize's two-rounding result; float32 scales take the
// explicitly rounded multiply and add (intrinsics -ffp-contract cannot fuse).  (vcvtne2ps2bf16
// flushes a denormal weight to zero where astype(bfloat16) keeps it, but vdpbf16ps reads
// denormal inputs as zero, so the products agree.)
//
// Layout (omlx/kernels/quant_bf16.py repacks it at load), N padded to a multiple of the panel.
// A panel's weight register t (columns 16t .. 16t+15) for one k pair is vcvtne2ps2bf16(a, b):
// b's float lanes 2j, 2j+1 are column 16t+j at k, k+1 (j < 8), a's the same for column 16t+8+j.
// The codes come in blocks of 4 k pairs: one 32-bit word per float lane holds that lane's codes
// for the block's 4 pairs (pair i in byte i), so a lane's codes arrive in its own lane: no
// widening loads, no cross-lane shuffles.  4-bit: one word per register t holds both halves
// (b's code in byte i's low nibble, a's in its high one), 256 bytes a block; 8-bit: b's word,
// then a's, 512 bytes a block.  Scales and biases per (panel, group) as 64 contiguous values in
// their stored dtype (float16, bfloat16 or float32), widened exactly and spread to the lane
// pairs once per group.
//
// The offsets form (quant_bf16.py's repack chooses it where exact for every group): with
// half-precision scales, float32 c = bias - M * scale in place of the biases, M = 256 for 8-bit
// codes and 4-bit b halves, 16 for 4-bit a halves.  One shift puts a code at the mantissa bits
// above ulp 1 of [M, 2M) and a ternary-logic op ORs in M's exponent: the float M + q, built by
// integer ops, and fma(M + q, scale, c) = scale * q + bias rounded once.  Otherwise a 4-bit code
// becomes a float by a 16-entry vpermps (it reads only an index's low 4 bits), an 8-bit one by a
// mask and a conversion, and the dequantization is fma(q, scale, bias) (half scales) or the
// explicitly rounded multiply and add (float32 scales).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "mlx/types/half_types.h"

#include "bf16_panel.h"
#include "spin_pool.h"

namespace omlx_quant_bf16 {

namespace mx = mlx::core;

constexpr int PANEL = omlx_cpu::BF16_PANEL;  // output columns per panel: four 16-lane registers (as linear_bf16.cpp)
constexpr int BLOCK_PAIRS = 4;  // k pairs per block of codes: one 32-bit word per lane holds them
// Where pair i's code of half h (0: b, 1: a) sits in its lane's word: 4-bit words hold both
// halves (b's in the low nibble of byte i, a's in the high one), 8-bit words one half (byte i).
constexpr int code_bit(int bits, int i, int h) {
  return bits == 4 ? 8 * i + 4 * h : 8 * i;
}
// Byte offset of register t's word (half h) in a block: 4-bit, one word per register (64 bytes,
// a block 256); 8-bit, b's then a's (128 bytes per register, a block 512).
constexpr int word_offset(int bits, int t, int h) {
  return bits == 4 ? 64 * t : 128 * t + 64 * h;
}
// Up to this many rows the weights are unpacked in registers and each used by every row; past
// it, once per step into the scratch panel.  One 1536 x 576 4-bit call, one thread, in cache:
// in registers 7% faster than the scratch path at 5 and 6 rows, 10% at 7, level at 8.
constexpr int FUSED_ROWS = 8;

// How the scales and biases are stored: both in one dtype, or (the offsets form) half-precision
// scales with float32 offsets c = bias - 2^bits * scale.
enum ScaleType { kF16 = 0, kBF16 = 1, kF32 = 2, kF16Offsets = 3, kBF16Offsets = 4 };

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
  if (type == kBF16) return omlx_cpu::from_bf16(h);
  mx::float16_t v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

// The code of column `c` at k index `k` of a panel whose codes start at `panel_codes`.
inline int code_at(const Problem& p, const uint8_t* panel_codes, int c, int64_t k) {
  const int64_t kp = k / 2, block = kp / BLOCK_PAIRS;
  const int i = int(kp % BLOCK_PAIRS), t = c / 16, half = (c % 16) / 8, lane = 2 * (c % 8) + int(k % 2);
  uint32_t word;
  std::memcpy(&word, panel_codes + block * BLOCK_PAIRS * p.pair_bytes() + word_offset(p.bits, t, half) + lane * 4, 4);
  return int((word >> code_bit(p.bits, i, half)) & ((1u << p.bits) - 1));
}

// Whether a layer's biases are offsets (see quant_bf16.py's repack): float32 c = bias - M *
// scale beside half-precision scales, M = magic(bits, half) of the column's register half.
constexpr bool offsets(int st) {
  return st == kF16Offsets || st == kBF16Offsets;
}
constexpr int scale_load(int st) {
  return st == kF16Offsets ? kF16 : st == kBF16Offsets ? kBF16 : st;
}
constexpr int bias_load(int st) {
  return offsets(st) ? kF32 : st;
}
// The code's lowest bit goes to mantissa bit magic_bit (ulp 1 of [M, 2M), M = 2^(23 -
// magic_bit)): 4-bit b codes to bit 15 and a codes to bit 19, so one shift of a word that holds
// both (4 bits apart) places both; 8-bit codes to bit 15.
constexpr int magic_bit(int bits, int h) {
  return bits == 4 ? 15 + 4 * h : 15;
}
constexpr float magic(int bits, int h) {
  return float(1 << (23 - magic_bit(bits, h)));
}

#if OMLX_DPBF16
constexpr int ROUND = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

// One group's scales and biases (or offsets) for one 16-column register of a panel, spread to
// the lane pairs of its b / a halves.
struct Affine {
  __m512 sb, sa, bb, ba;
};

template <int LT>
inline __m512 load16(const void* base, int64_t at) {
  if constexpr (LT == kF32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + at);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + at));
    if constexpr (LT == kF16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
}

template <int ST>
inline Affine load_affine(const Problem& p, int64_t panel, int64_t g, int t) {
  const __m512i low = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
  const int64_t at = (panel * p.groups + g) * PANEL + 16 * t;
  const __m512 sc = load16<scale_load(ST)>(p.scales, at);
  const __m512 bi = load16<bias_load(ST)>(p.biases, at);
  return {_mm512_permutexvar_ps(low, sc), _mm512_permutexvar_ps(high, sc), _mm512_permutexvar_ps(low, bi),
          _mm512_permutexvar_ps(high, bi)};
}

// Pair I's codes of half H of a block's word register as floats.  With offsets: the code moved
// to mantissa bit magic_bit and M's exponent OR-ed in (integer ops only), so the float is M + q,
// and fma(M + q, scale, c) is exactly scale * q + bias rounded once.  Without: q itself (a
// 16-entry permute for 4 bits: vpermps reads only an index's low 4 bits; a mask and a
// conversion for 8).
template <int SHIFT>
inline __m512i shifted(__m512i word) {
  if constexpr (SHIFT > 0) return _mm512_slli_epi32(word, SHIFT);
  if constexpr (SHIFT < 0) return _mm512_srli_epi32(word, -SHIFT);
  return word;
}

template <int BITS, int ST, int I, int H>
inline __m512 codes_as_floats(__m512i word) {
  constexpr int AT = code_bit(BITS, I, H);
  if constexpr (offsets(ST)) {
    constexpr int P = magic_bit(BITS, H);
    const __m512i v = shifted<P - AT>(word);
    const __m512i mask = _mm512_set1_epi32(((1 << BITS) - 1) << P);
    const __m512i exponent = _mm512_set1_epi32((127 + 23 - P) << 23);
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(v, mask, exponent, 0xEA));  // (v & mask) | exponent
  } else {
    const __m512i v = shifted<-AT>(word);
    if constexpr (BITS == 4) {
      const __m512 values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      return _mm512_permutexvar_ps(v, values);
    } else {
      return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0xFF)));
    }
  }
}

// mx.dequantize's float32 scale * q + bias, two roundings: one fused multiply-add where the
// product is exact (half-precision scales) or the offsets make it so.
template <int ST>
inline __m512 dequant(__m512 q, __m512 scale, __m512 bias) {
  if constexpr (ST == kF32)
    return _mm512_add_round_ps(_mm512_mul_round_ps(q, scale, ROUND), bias, ROUND);
  else
    return _mm512_fmadd_ps(q, scale, bias);
}

// Pair I's bf16 weight register from its block's b / a words.
template <int BITS, int ST, int I>
inline __m512bh weights_at(__m512i wb, __m512i wa, const Affine& s) {
  const __m512 fb = dequant<ST>(codes_as_floats<BITS, ST, I, 0>(wb), s.sb, s.bb);
  const __m512 fa = dequant<ST>(codes_as_floats<BITS, ST, I, 1>(wa), s.sa, s.ba);
  return _mm512_cvtne2ps_pbh(fa, fb);
}

template <int BITS>
inline __m512i load_word(const uint8_t* block, int t, int half) {
  return _mm512_loadu_si512(block + word_offset(BITS, t, half));
}

// f<I>() for I = 0 .. N - 1, in order, each I a compile-time constant (shift counts are
// immediates).
template <int N, class F>
inline void for_each_pair(F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) { (f.template operator()<I>(), ...); }(
      std::make_integer_sequence<int, N>{});
}

// Registers T0 .. T0 + TG - 1 of a panel through group g for R rows: each k pair's weights
// unpacked once in registers and used by all R rows; TG registers side by side give the
// vdpbf16ps chains TG x R independent accumulators (one alone waits on its own latency).  A
// column's pairs are still accumulated in k order.
template <int BITS, int ST, int R, int T0, int TG>
inline void fused_registers(const Problem& p, const uint32_t* x, int64_t panel, int64_t g, __m512 (&acc)[R][4]) {
  constexpr int W = BLOCK_PAIRS;
  constexpr int BLOCK_BYTES = W * (BITS == 4 ? PANEL : 2 * PANEL);
  Affine s[TG];
  for (int j = 0; j < TG; ++j) s[j] = load_affine<ST>(p, panel, g, T0 + j);
  const int64_t kp0 = g * p.group_pairs;
  const uint8_t* block = p.codes + (panel * p.k_pairs + kp0) * p.pair_bytes();
  for (int64_t kb = kp0; kb < kp0 + p.group_pairs; kb += W, block += BLOCK_BYTES) {
    __m512i wb[TG], wa[TG];
    for (int j = 0; j < TG; ++j) {
      wb[j] = load_word<BITS>(block, T0 + j, 0);
      wa[j] = BITS == 4 ? wb[j] : load_word<BITS>(block, T0 + j, 1);
    }
    for_each_pair<W>([&]<int I>() {
      __m512bh w[TG];
      for (int j = 0; j < TG; ++j) w[j] = weights_at<BITS, ST, I>(wb[j], wa[j], s[j]);
      for (int r = 0; r < R; ++r) {
        const __m512bh xb = (__m512bh)_mm512_set1_epi32(int(x[r * p.k_pairs + kb + I]));
        for (int j = 0; j < TG; ++j) acc[r][T0 + j] = _mm512_dpbf16_ps(acc[r][T0 + j], xb, w[j]);
      }
    });
  }
}

// Few rows: the weights unpacked in registers, never stored.  Two registers at a time up to 4
// rows (2R chains, 8 scale registers), one at a time past that (R chains, 4 scale registers:
// 8 rows' 16 accumulators would not fit beside two registers' state).
template <int BITS, int ST, int R>
void fused_rows(const Problem& p, const uint32_t* x, int64_t panel, float* y, int cols, const float* bias) {
  __m512 acc[R][4];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < 4; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < p.groups; ++g) {
    if constexpr (R <= 4) {
      fused_registers<BITS, ST, R, 0, 2>(p, x, panel, g, acc);
      if (cols > 32) fused_registers<BITS, ST, R, 2, 2>(p, x, panel, g, acc);
    } else {
      fused_registers<BITS, ST, R, 0, 1>(p, x, panel, g, acc);
      if (cols > 16) fused_registers<BITS, ST, R, 1, 1>(p, x, panel, g, acc);
      if (cols > 32) fused_registers<BITS, ST, R, 2, 1>(p, x, panel, g, acc);
      if (cols > 48) fused_registers<BITS, ST, R, 3, 1>(p, x, panel, g, acc);
    }
  }
  omlx_cpu::store_rows<R>(acc, y, p.n, cols, bias);
}

// A whole panel unpacked into `scratch` in linear_bf16.cpp's packed layout (k pairs x 64
// columns x 2 bf16).
template <int BITS, int ST>
void unpack_panel(const Problem& p, int64_t panel, uint16_t* scratch) {
  constexpr int W = BLOCK_PAIRS;
  constexpr int BLOCK_BYTES = W * (BITS == 4 ? PANEL : 2 * PANEL);
  for (int64_t g = 0; g < p.groups; ++g) {
    for (int t = 0; t < 4; ++t) {
      const Affine s = load_affine<ST>(p, panel, g, t);
      const int64_t kp0 = g * p.group_pairs;
      const uint8_t* block = p.codes + (panel * p.k_pairs + kp0) * p.pair_bytes();
      uint16_t* dst = scratch + kp0 * (2 * PANEL) + 32 * t;
      for (int64_t kb = 0; kb < p.group_pairs; kb += W, block += BLOCK_BYTES, dst += W * (2 * PANEL)) {
        const __m512i wb = load_word<BITS>(block, t, 0), wa = BITS == 4 ? wb : load_word<BITS>(block, t, 1);
        for_each_pair<W>([&]<int I>() {
          _mm512_store_si512(dst + I * (2 * PANEL), (__m512i)weights_at<BITS, ST, I>(wb, wa, s));
        });
      }
    }
  }
}

// One or two rows with every call inlined: the accumulators stay in registers across groups
// (one 1536 x 576 call in cache, one thread: 6% faster at one row, 4% at two; inlined for 8
// rows the body spilled and lost 28%).
template <int BITS, int ST, int R>
__attribute__((flatten)) void fused_rows_inlined(const Problem& p, const uint32_t* x, int64_t panel, float* y,
                                                 int cols, const float* bias) {
  fused_rows<BITS, ST, R>(p, x, panel, y, cols, bias);
}

template <int BITS, int ST>
void panel_fused(const Problem& p, const uint32_t* x, int64_t panel, float* y, int cols, const float* bias) {
  switch (p.m) {
    case 1: fused_rows_inlined<BITS, ST, 1>(p, x, panel, y, cols, bias); break;
    case 2: fused_rows_inlined<BITS, ST, 2>(p, x, panel, y, cols, bias); break;
    case 3: fused_rows<BITS, ST, 3>(p, x, panel, y, cols, bias); break;
    case 4: fused_rows<BITS, ST, 4>(p, x, panel, y, cols, bias); break;
    case 5: fused_rows<BITS, ST, 5>(p, x, panel, y, cols, bias); break;
    case 6: fused_rows<BITS, ST, 6>(p, x, panel, y, cols, bias); break;
    case 7: fused_rows<BITS, ST, 7>(p, x, panel, y, cols, bias); break;
    case 8: fused_rows<BITS, ST, 8>(p, x, panel, y, cols, bias); break;
    default: break;
  }
}

// `scratch` (k_pairs x 128 bf16, 64-byte aligned) is the calling thread's, used past FUSED_ROWS rows.
template <int BITS, int ST>
void panel_rows_typed(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t* scratch) {
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  const float* bias = p.bias ? p.bias + col0 : nullptr;
  float* y = p.y + col0;
  if (p.m <= FUSED_ROWS) {
    panel_fused<BITS, ST>(p, pairs, panel, y, cols, bias);
  } else {
    unpack_panel<BITS, ST>(p, panel, scratch);
    omlx_cpu::panel_micro_rows(pairs, p.m, p.k_pairs, scratch, y, p.n, cols, bias);
  }
}

template <int BITS>
void panel_rows_bits(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t* scratch) {
  switch (p.scale_type) {
    case kF16: panel_rows_typed<BITS, kF16>(p, pairs, panel, scratch); break;
    case kBF16: panel_rows_typed<BITS, kBF16>(p, pairs, panel, scratch); break;
    case kF16Offsets: panel_rows_typed<BITS, kF16Offsets>(p, pairs, panel, scratch); break;
    case kBF16Offsets: panel_rows_typed<BITS, kBF16Offsets>(p, pairs, panel, scratch); break;
    default: panel_rows_typed<BITS, kF32>(p, pairs, panel, scratch); break;
  }
}

inline void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t* scratch) {
  if (p.bits == 4)
    panel_rows_bits<4>(p, pairs, panel, scratch);
  else
    panel_rows_bits<8>(p, pairs, panel, scratch);
}
#else
// Without AVX512-BF16 at build time: the same products in the same pair order, one column at a
// time (not bit-identical to the instruction, which flushes denormals; omlx chooses this
// module only where the CPU has the instruction, as for linear_bf16.cpp).
inline void panel_rows(const Problem& p, const uint32_t* pairs, int64_t panel, uint16_t*) {
  const int64_t col0 = panel * PANEL;
  const int cols = int(std::min<int64_t>(PANEL, p.n - col0));
  const uint8_t* src = p.codes + panel * p.k_pairs * p.pair_bytes();
  for (int c = 0; c < cols; ++c) {
    for (int64_t r = 0; r < p.m; ++r) {
      const uint16_t* xr = reinterpret_cast<const uint16_t*>(pairs + r * p.k_pairs);
      float acc = 0.f;
      for (int64_t k = 0; k < 2 * p.k_pairs; ++k) {
        const int64_t at = (panel * p.groups + k / (2 * p.group_pairs)) * PANEL + c;
        const float s = scale_value(p.scales, scale_load(p.scale_type), at);
        float b = scale_value(p.biases, bias_load(p.scale_type), at);
        if (offsets(p.scale_type)) b += magic(p.bits, (c % 16) / 8) * s;  // the stored bias, exactly
        const volatile float scaled = s * float(code_at(p, src, c, k));  // rounded before the bias add, as MLX does
        acc += omlx_cpu::from_bf16(xr[k]) * omlx_cpu::from_bf16(omlx_cpu::to_bf16(scaled + b));
      }
      p.y[r * p.n + col0 + c] = acc + (p.bias ? p.bias[col0 + c] : 0.0f);
    }
  }
}
#endif

// OpenMP's rule (OMLX_KERNEL_SPIN_US=0): a second thread pays only past about a million
// weight-rows: omlx's OpenMP threads sleep between calls (OMP_WAIT_POLICY=PASSIVE,
// omlx/kernels/linear.py), and waking one costs ~20 us a call, about what one core takes to
// unpack 1M weights at one row (~20 Gweights/s a core); decode's 576 x 576 and 576 x 960
// projections run faster on one.  Past FUSED_ROWS rows the scratch path streams the unpacked
// panel like packed bf16, and packed bf16's rule applies.
inline bool worth_threads(const Problem& p) {
  if (p.m > FUSED_ROWS) return omlx_cpu::worth_threads(p);
  return p.panels > 1 && p.n * p.k * std::max<int64_t>(p.m, 2) >= (int64_t(1) << 21);
}

// The calling thread's scratch panel (k_pairs x 128 bf16, 64-byte aligned), kept between calls.
inline uint16_t* thread_scratch(size_t elements) {
  thread_local std::vector<uint16_t> scratch;
  if (scratch.size() < elements + 32) scratch.resize(elements + 32);  // + 32: room to align to 64 bytes
  const auto at = reinterpret_cast<uintptr_t>(scratch.data());
  return scratch.data() + ((64 - at % 64) % 64) / 2;
}

inline void run(const Problem& given) {
  Problem p = given;
  std::vector<float> gathered, bias;
  const std::vector<uint32_t> pairs = omlx_cpu::prepare_rows(p, gathered, bias);
  const size_t scratch_size = p.m > FUSED_ROWS ? size_t(p.k_pairs) * 2 * PANEL : 0;
  omlx_cpu::for_panels(p, worth_threads(p), [&](int64_t panel) {
    panel_rows(p, pairs.data(), panel, scratch_size ? thread_scratch(scratch_size) : nullptr);
  });
}

}  // namespace omlx_quant_bf16
