// y = x @ dequant(Wq).T (+ b) for float32 x and y, reading 4- or 8-bit weights as they are
// stored (MLX's affine groups: w = scale * q + bias per group of 32 / 64 / 128 along K).
//
// Why: one stream of a small model is bound by the bytes of weights it reads per token.
// Widening 4-bit weights to float32 reads 8x the bytes, and MLX's own CPU quantized matmul
// is an unblocked scalar loop.  Here each row of x is quantized on the fly, one symmetric
// scale per weight group (xq = round(x * levels / max|x|)), and the integer dot products run
// on AVX512-VNNI (`vpdpbusd`: u8 x s8 -> i32, four products per lane).  MLX's affine codes q
// are unsigned (0..15 or 0..255), so they are the u8 operand and the signed activations the
// s8 one: no sign trick is needed.  Activations are int8 (levels 127, precision 1) or, the
// default, ~15 bits (levels 127 * 128) held as two int8 parts, each dotted with the same
// weight vector (precision 2): int8 activations cost SmolLM2 3.4% of its float32 top-1
// choices, the split none (bench/README.md).  Per group g of one output n:
//
//   sum_k w_k x_k  ~=  xs_g * (scale_g * sum_k q_k xq_k + bias_g * sum_k xq_k)
//
// i.e. exactly dequant(Wq) @ dequant(xq) up to float rounding (the accuracy contract the
// tests check): the integer dot and the integer sum of xq are exact, then two fused
// multiply-adds per group fold in the scales.  Using the quantized sum (not the float one)
// keeps the error proportional to the centred weights scale*q + bias rather than to scale*q.
//
// Layout (repacked once at load, omlx/kernels/quant_linear.py): output rows in tiles of 16
// (N padded with zero rows); inside a tile, K in steps of 8 (4-bit) or 4 (8-bit), each step
// one 64-byte vector whose lane n holds that row's codes for 4 consecutive k (the dpbusd
// operand order).  For 4-bit a byte's low nibble is k..k+3 and its high nibble k+4..k+7 of
// the same 8-step.  Scales and biases per (tile, group) as 16 contiguous float16 (when the
// source values round-trip through float16, as GGUF's do) or float32.
//
// Every row's arithmetic is the same sequence of operations whatever the other rows are
// (rows are processed in register blocks, but each keeps its own accumulators, and threads
// split output tiles, never K), so a row's result is bit-identical alone or in any batch.
// Without AVX512-VNNI an AVX2 path (vpmaddubsw + vpmaddwd, 8 lanes per half tile) and a
// scalar portable path compute the same integer dots and the same float epilogue, so all three
// give bit-identical results (the tests check it by forcing each).  Precision 3 is the
// measured alternative: 4-bit codes unpacked to bf16 in registers and vdpbf16ps on bf16 x.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include <immintrin.h>

#include "mlx/types/half_types.h"

#include "common.h"

namespace {

constexpr int TILE = 16;  // output rows per tile: one zmm of int32 / float32 lanes
constexpr int ROWS = 4;  // rows of x per register block
constexpr int ROW_CHUNK = 64;  // rows whose quantized x stays in cache while all tiles pass

// __builtin_cpu_supports takes only a literal name, and only on x86.
#if defined(__x86_64__) || defined(__i386__)
#define OMLX_CPU_SUPPORTS(feature) __builtin_cpu_supports(feature)
#else
#define OMLX_CPU_SUPPORTS(feature) false
#endif

bool cpu_has_vnni() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();  // static initialisers may run before the runtime's own
#endif
  return OMLX_CPU_SUPPORTS("avx512f") && OMLX_CPU_SUPPORTS("avx512bw") && OMLX_CPU_SUPPORTS("avx512vl") &&
         OMLX_CPU_SUPPORTS("avx512dq") && OMLX_CPU_SUPPORTS("avx512vnni");
}

const bool kHasVnni = cpu_has_vnni();
const bool kHasBf16 = kHasVnni && OMLX_CPU_SUPPORTS("avx512bf16");
const bool kHasAvx2 = OMLX_CPU_SUPPORTS("avx2") && OMLX_CPU_SUPPORTS("fma") && OMLX_CPU_SUPPORTS("f16c");

#define OMLX_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,f16c,fma")))
#define OMLX_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,f16c,fma")))
#define OMLX_AVX2 __attribute__((target("avx2,fma,f16c")))

enum class Isa { Auto, Vnni, Avx2, Portable };

Isa best_isa() {
  return kHasVnni ? Isa::Vnni : kHasAvx2 ? Isa::Avx2 : Isa::Portable;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Vnni: return "avx512-vnni";
    case Isa::Avx2: return "avx2";
    case Isa::Portable: return "portable";
    default: return "auto";
  }
}

Isa parse_isa(const std::string& name) {
  if (name == "auto") return best_isa();
  Isa isa = name == "avx512-vnni" ? Isa::Vnni : name == "avx2" ? Isa::Avx2 : name == "portable" ? Isa::Portable : Isa::Auto;
  if (isa == Isa::Auto) throw std::invalid_argument("quant_linear: isa must be auto, avx512-vnni, avx2 or portable");
  if ((isa == Isa::Vnni && !kHasVnni) || (isa == Isa::Avx2 && !kHasAvx2))
    throw std::invalid_argument(std::string("quant_linear: this CPU cannot run the ") + name + " path");
  return isa;
}

// x as given: row-contiguous, or any strides (copied to rows first, in the task).
struct Strided {
  std::vector<int64_t> shape, strides;  // in elements; empty when x is row-contiguous
};

struct Job {
  const float* x;  // (M, K) rows (after `strided` is resolved)
  float* y;  // (M, N)
  const uint8_t* w;  // tiles, see the layout above
  const void* scales;  // (tiles, groups, 16) float16 or float32
  const void* biases;
  const float* bias;  // (N,) or null
  int64_t M;
  int N, K, bits, group;
  bool half_scales;
  Isa isa;  // the path this call runs (resolved: never Isa::Auto)
  // Activation precision: 1 = int8 codes v in [-127, 127]; 2 = ~15-bit codes v in
  // [-16256, 16256] held as two int8 parts v = 128 * hi + lo (hi in [-127, 127], lo in
  // [-64, 63]), each multiplied with the same weight vector: twice the dot products,
  // 128x finer activations, the same weight bytes.
  int precision;
  // Quantized activations: (M, K) int8 (the high parts when split) and the low parts,
  // and per (row, group) xs and xs * sum(v).
  int8_t* xq;
  int8_t* xl;
  // Precision 3 (the bf16 alternative, 4-bit weights): x rounded to bf16, per 4-block in the
  // order x0 x2 x1 x3, and xsum the per-group sums of the rounded values.
  uint16_t* xb;
  float* xs;
  float* xsum;

  int groups() const {
    return K / group;
  }
  int tiles() const {
    return (N + TILE - 1) / TILE;
  }
  int64_t tile_bytes() const {
    return int64_t(TILE) * K * bits / 8;
  }
};

inline float half_to_float(uint16_t h) {
  mx::float16_t v;
  std::memcpy(&v, &h, 2);
  return static_cast<float>(v);
}

inline float scale_at(const void* base, bool half, int64_t i) {
  return half ? half_to_float(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

// ---------------------------------------------------------------------------- activations
// v = round(x * levels / max|x|) per group, levels 127 (int8) or 127 * 128 (split).  Both
// versions give the same bits: max is exact, the scale one float division, the product one
// float multiply, rounding to nearest even (vcvtps2dq under the default MXCSR and nearbyintf
// alike), the split and the sum of codes integer arithmetic.
constexpr int SPLIT_LEVELS = 127 * 128;

inline int levels_of(int precision) {
  return precision == 2 ? SPLIT_LEVELS : 127;
}

void quantize_row_portable(const float* x, int K, int group, int precision, int8_t* hi, int8_t* lo, float* xs,
                           float* xsum) {
  const int levels = levels_of(precision);
  for (int g = 0; g * group < K; ++g) {
    const float* xg = x + g * group;
    float amax = 0.f;
    for (int i = 0; i < group; ++i) amax = std::max(amax, std::fabs(xg[i]));
    const float inv = amax > 0.f ? float(levels) / amax : 0.f;
    int sum = 0;
    for (int i = 0; i < group; ++i) {
      const int v = std::clamp(int(std::nearbyintf(xg[i] * inv)), -levels, levels);
      sum += v;
      if (precision == 2) {
        const int h = (v + 64) >> 7;  // floor((v + 64) / 128): v - 128 h in [-64, 63]
        hi[g * group + i] = int8_t(h);
        lo[g * group + i] = int8_t(v - 128 * h);
      } else {
        hi[g * group + i] = int8_t(v);
      }
    }
    xs[g] = amax / float(levels);
    xsum[g] = float(sum) * xs[g];
  }
}

OMLX_VNNI void quantize_row_vnni(const float* x, int K, int group, int precision, int8_t* hi, int8_t* lo, float* xs,
                                 float* xsum) {
  const int levels = levels_of(precision);
  const __m512 sign = _mm512_set1_ps(-0.f);
  const __m512i vmin = _mm512_set1_epi32(-levels), vmax = _mm512_set1_epi32(levels);
  const __m512i half = _mm512_set1_epi32(64);
  for (int g = 0; g * group < K; ++g) {
    const float* xg = x + g * group;
    __m512 m = _mm512_setzero_ps();
    for (int i = 0; i < group; i += 16) m = _mm512_max_ps(m, _mm512_andnot_ps(sign, _mm512_loadu_ps(xg + i)));
    const float amax = _mm512_reduce_max_ps(m);
    const float inv = amax > 0.f ? float(levels) / amax : 0.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i sum = _mm512_setzero_si512();
    for (int i = 0; i < group; i += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xg + i), vinv));
      v = _mm512_min_epi32(_mm512_max_epi32(v, vmin), vmax);
      sum = _mm512_add_epi32(sum, v);
      if (precision == 2) {
        const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(v, half), 7);
        const __m512i l = _mm512_sub_epi32(v, _mm512_slli_epi32(h, 7));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + g * group + i), _mm512_cvtepi32_epi8(h));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + g * group + i), _mm512_cvtepi32_epi8(l));
      } else {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + g * group + i), _mm512_cvtepi32_epi8(v));
      }
    }
    xs[g] = amax / float(levels);
    xsum[g] = float(_mm512_reduce_add_epi32(sum)) * xs[g];
  }
}

void quantize_rows(const Job& j, int64_t r0, int64_t r1) {
  const int G = j.groups();
  for (int64_t r = r0; r < r1; ++r) {
    int8_t* lo = j.precision == 2 ? j.xl + r * j.K : nullptr;
    if (j.isa != Isa::Vnni)
      quantize_row_portable(j.x + r * j.K, j.K, j.group, j.precision, j.xq + r * j.K, lo, j.xs + r * G,
                            j.xsum + r * G);
    else
      quantize_row_vnni(j.x + r * j.K, j.K, j.group, j.precision, j.xq + r * j.K, lo, j.xs + r * G, j.xsum + r * G);
  }
}

// ---------------------------------------------------------------------------- VNNI tiles
OMLX_VNNI inline __m512 load_scales(const void* base, bool half, int64_t at) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + at)));
  return _mm512_loadu_ps(static_cast<const float*>(base) + at);
}

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Where rows r0 .. r0+R-1's quantized activations start: their (high) codes, and with SPLIT
// their low parts (null without).  The VNNI and AVX2 register blocks read the same rows.
template <int R, bool SPLIT>
inline void row_codes(const Job& j, int64_t r0, const int8_t* (&xq)[R], const int8_t* (&xl)[R]) {
  for (int r = 0; r < R; ++r) {
    xq[r] = j.xq + (r0 + r) * j.K;
    xl[r] = SPLIT ? j.xl + (r0 + r) * j.K : nullptr;
  }
}

// Rows r0 .. r0+R-1 of x against output tile t.
template <int BITS, int R, bool SPLIT>
OMLX_VNNI void tile_rows_vnni(const Job& j, int t, int64_t r0) {
  const int G = j.groups();
  const uint8_t* w = j.w + int64_t(t) * j.tile_bytes();
  // a0 / a1: the dot with x's (high) codes, split over two chains; b0 / b1: the low parts.
  const int8_t* xq[R];
  const int8_t* xl[R];
  row_codes<R, SPLIT>(j, r0, xq, xl);
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int g = 0; g < G; ++g) {
    __m512i a0[R], a1[R], b0[R], b1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = b0[r] = b1[r] = _mm512_setzero_si512();
    const int k0 = g * j.group;
    if constexpr (BITS == 4) {
      for (int k = k0; k < k0 + j.group; k += 8, w += 64) {
        const __m512i v = _mm512_loadu_si512(w);
        const __m512i lo = _mm512_and_si512(v, nibble);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          a0[r] = _mm512_dpbusd_epi32(a0[r], lo, _mm512_set1_epi32(load4(xq[r] + k)));
          a1[r] = _mm512_dpbusd_epi32(a1[r], hi, _mm512_set1_epi32(load4(xq[r] + k + 4)));
          if constexpr (SPLIT) {
            b0[r] = _mm512_dpbusd_epi32(b0[r], lo, _mm512_set1_epi32(load4(xl[r] + k)));
            b1[r] = _mm512_dpbusd_epi32(b1[r], hi, _mm512_set1_epi32(load4(xl[r] + k + 4)));
          }
        }
      }
    } else {
      for (int k = k0; k < k0 + j.group; k += 8, w += 128) {
        const __m512i v0 = _mm512_loadu_si512(w);
        const __m512i v1 = _mm512_loadu_si512(w + 64);
        for (int r = 0; r < R; ++r) {
          a0[r] = _mm512_dpbusd_epi32(a0[r], v0, _mm512_set1_epi32(load4(xq[r] + k)));
          a1[r] = _mm512_dpbusd_epi32(a1[r], v1, _mm512_set1_epi32(load4(xq[r] + k + 4)));
          if constexpr (SPLIT) {
            b0[r] = _mm512_dpbusd_epi32(b0[r], v0, _mm512_set1_epi32(load4(xl[r] + k)));
            b1[r] = _mm512_dpbusd_epi32(b1[r], v1, _mm512_set1_epi32(load4(xl[r] + k + 4)));
          }
        }
      }
    }
    const int64_t at = (int64_t(t) * G + g) * TILE;
    const __m512 s = load_scales(j.scales, j.half_scales, at);
    const __m512 b = load_scales(j.biases, j.half_scales, at);
    for (int r = 0; r < R; ++r) {
      const int64_t rg = (r0 + r) * G + g;
      __m512i idot = _mm512_add_epi32(a0[r], a1[r]);
      if constexpr (SPLIT) idot = _mm512_add_epi32(_mm512_slli_epi32(idot, 7), _mm512_add_epi32(b0[r], b1[r]));
      const __m512 dot = _mm512_cvtepi32_ps(idot);
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(s, _mm512_set1_ps(j.xs[rg])), acc[r]);
      acc[r] = _mm512_fmadd_ps(b, _mm512_set1_ps(j.xsum[rg]), acc[r]);
    }
  }
  const int n0 = t * TILE;
  const int valid = std::min(TILE, j.N - n0);
  const __mmask16 mask = valid == TILE ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(j.y + (r0 + r) * j.N + n0, mask, _mm512_add_ps(acc[r], bias));
}

template <int BITS, bool SPLIT>
OMLX_VNNI void tile_vnni(const Job& j, int t, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + ROWS <= r1; r += ROWS) tile_rows_vnni<BITS, ROWS, SPLIT>(j, t, r);
  switch (r1 - r) {
    case 3: tile_rows_vnni<BITS, 3, SPLIT>(j, t, r); break;
    case 2: tile_rows_vnni<BITS, 2, SPLIT>(j, t, r); break;
    case 1: tile_rows_vnni<BITS, 1, SPLIT>(j, t, r); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------- bf16 alternative
// The other way the issue asked to try: unpack 4-bit codes to bf16 in registers and use
// vdpbf16ps on x rounded to bf16 (no activation quantization).  A code q becomes the bf16
// 128 + q by OR-ing its byte into 0x4300 (128.0; the mantissa step at 128 is 1), so each
// 64-byte weight vector costs two masks per nibble half; the 128 * sum(x) this adds is taken
// off per group.  A lane's 32 bits hold codes k..k+3 (low nibbles): its even bytes make the
// bf16 pair (k, k+2) and its odd bytes (k+1, k+3), hence x's order x0 x2 x1 x3.
inline uint16_t to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFF + ((bits >> 16) & 1);  // round to nearest even (x is finite here)
  return uint16_t(bits >> 16);
}

inline float from_bf16(uint16_t h) {
  const uint32_t bits = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

void prepare_rows_bf16(const Job& j, int64_t r0, int64_t r1) {
  const int G = j.groups();
  static constexpr int order[4] = {0, 2, 1, 3};
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = j.x + r * j.K;
    uint16_t* xb = j.xb + r * j.K;
    for (int g = 0; g < G; ++g) {
      float sum = 0.f;
      for (int k = g * j.group; k < (g + 1) * j.group; k += 4)
        for (int i = 0; i < 4; ++i) {
          const uint16_t h = to_bf16(x[k + order[i]]);
          xb[k + i] = h;
          sum += from_bf16(h);
        }
      j.xsum[r * G + g] = sum;
    }
  }
}

template <int R>
OMLX_BF16 void tile_rows_bf16(const Job& j, int t, int64_t r0) {
  const int G = j.groups();
  const uint8_t* w = j.w + int64_t(t) * j.tile_bytes();
  const uint16_t* xb[R];
  for (int r = 0; r < R; ++r) xb[r] = j.xb + (r0 + r) * j.K;
  __m512 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  const __m512i even = _mm512_set1_epi32(0x00FF00FF);
  const __m512i base = _mm512_set1_epi32(0x43004300);
  const __m512 one28 = _mm512_set1_ps(128.f);
  for (int g = 0; g < G; ++g) {
    __m512 d0[R], d1[R];
    for (int r = 0; r < R; ++r) d0[r] = d1[r] = _mm512_setzero_ps();
    const int k0 = g * j.group;
    for (int k = k0; k < k0 + j.group; k += 8, w += 64) {
      const __m512i v = _mm512_loadu_si512(w);
      const __m512i lo = _mm512_and_si512(v, nibble);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      // (a & b) | c: ternary-logic table 0xEA.
      const __m512i lo_e = _mm512_ternarylogic_epi32(lo, even, base, 0xEA);
      const __m512i lo_o = _mm512_ternarylogic_epi32(_mm512_srli_epi32(lo, 8), even, base, 0xEA);
      const __m512i hi_e = _mm512_ternarylogic_epi32(hi, even, base, 0xEA);
      const __m512i hi_o = _mm512_ternarylogic_epi32(_mm512_srli_epi32(hi, 8), even, base, 0xEA);
      for (int r = 0; r < R; ++r) {
        int32_t p0, p1, p2, p3;
        std::memcpy(&p0, xb[r] + k, 4);
        std::memcpy(&p1, xb[r] + k + 2, 4);
        std::memcpy(&p2, xb[r] + k + 4, 4);
        std::memcpy(&p3, xb[r] + k + 6, 4);
        d0[r] = _mm512_dpbf16_ps(d0[r], (__m512bh)lo_e, (__m512bh)_mm512_set1_epi32(p0));
        d1[r] = _mm512_dpbf16_ps(d1[r], (__m512bh)lo_o, (__m512bh)_mm512_set1_epi32(p1));
        d0[r] = _mm512_dpbf16_ps(d0[r], (__m512bh)hi_e, (__m512bh)_mm512_set1_epi32(p2));
        d1[r] = _mm512_dpbf16_ps(d1[r], (__m512bh)hi_o, (__m512bh)_mm512_set1_epi32(p3));
      }
    }
    const int64_t at = (int64_t(t) * G + g) * TILE;
    const __m512 s = load_scales(j.scales, j.half_scales, at);
    const __m512 b = load_scales(j.biases, j.half_scales, at);
    for (int r = 0; r < R; ++r) {
      const __m512 xsum = _mm512_set1_ps(j.xsum[(r0 + r) * G + g]);
      const __m512 dot = _mm512_fnmadd_ps(one28, xsum, _mm512_add_ps(d0[r], d1[r]));
      acc[r] = _mm512_fmadd_ps(dot, s, acc[r]);
      acc[r] = _mm512_fmadd_ps(b, xsum, acc[r]);
    }
  }
  const int n0 = t * TILE;
  const int valid = std::min(TILE, j.N - n0);
  const __mmask16 mask = valid == TILE ? __mmask16(0xFFFF) : __mmask16((1u << valid) - 1);
  const __m512 bias = j.bias ? _mm512_maskz_loadu_ps(mask, j.bias + n0) : _mm512_setzero_ps();
  for (int r = 0; r < R; ++r)
    _mm512_mask_storeu_ps(j.y + (r0 + r) * j.N + n0, mask, _mm512_add_ps(acc[r], bias));
}

OMLX_BF16 void tile_bf16(const Job& j, int t, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + ROWS <= r1; r += ROWS) tile_rows_bf16<ROWS>(j, t, r);
  switch (r1 - r) {
    case 3: tile_rows_bf16<3>(j, t, r); break;
    case 2: tile_rows_bf16<2>(j, t, r); break;
    case 1: tile_rows_bf16<1>(j, t, r); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------- AVX2
// No vpdpbusd: vpmaddubsw multiplies u8 codes by s8 activations into 16-bit pair sums
// (|.| <= 2 * 15 * 127: 8-bit codes go as two nibbles so nothing saturates) and vpmaddwd
// adds pairs into 32 bits with a weight: 1, 16 for an 8-bit code's high nibble, 128 for the
// high part of a split activation.  One exact int32 accumulator per row and half tile.
OMLX_AVX2 inline __m256 load_scales8(const void* base, bool half, int64_t at) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + at)));
  return _mm256_loadu_ps(static_cast<const float*>(base) + at);
}

OMLX_AVX2 inline __m256i dot_pairs(__m256i codes, int32_t x4, __m256i weight) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, _mm256_set1_epi32(x4)), weight);
}

template <int BITS, int R, bool SPLIT>
OMLX_AVX2 void tile_rows_avx2(const Job& j, int t, int64_t r0) {
  const int G = j.groups();
  const uint8_t* w = j.w + int64_t(t) * j.tile_bytes();
  const int8_t* xq[R];
  const int8_t* xl[R];
  row_codes<R, SPLIT>(j, r0, xq, xl);
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  const __m256i one = _mm256_set1_epi16(1);
  const __m256i x_hi = _mm256_set1_epi16(SPLIT ? 128 : 1);  // weight of x's (high) codes
  const __m256i c16 = _mm256_set1_epi16(16);
  const __m256i c16_hi = _mm256_set1_epi16(SPLIT ? 2048 : 16);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int g = 0; g < G; ++g) {
    __m256i a[R][2];
    for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_si256();
    const int k0 = g * j.group;
    for (int k = k0; k < k0 + j.group; k += BITS == 4 ? 8 : 4, w += 64) {
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * h));
        const __m256i lo = _mm256_and_si256(v, nibble);
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          __m256i sum;
          if constexpr (BITS == 4) {  // low nibbles: k..k+3, high nibbles: k+4..k+7
            sum = _mm256_add_epi32(dot_pairs(lo, load4(xq[r] + k), x_hi), dot_pairs(hi, load4(xq[r] + k + 4), x_hi));
            if constexpr (SPLIT)
              sum = _mm256_add_epi32(sum, _mm256_add_epi32(dot_pairs(lo, load4(xl[r] + k), one),
                                                           dot_pairs(hi, load4(xl[r] + k + 4), one)));
          } else {  // both nibbles of codes k..k+3
            sum = _mm256_add_epi32(dot_pairs(lo, load4(xq[r] + k), x_hi), dot_pairs(hi, load4(xq[r] + k), c16_hi));
            if constexpr (SPLIT)
              sum = _mm256_add_epi32(sum, _mm256_add_epi32(dot_pairs(lo, load4(xl[r] + k), one),
                                                           dot_pairs(hi, load4(xl[r] + k), c16)));
          }
          a[r][h] = _mm256_add_epi32(a[r][h], sum);
        }
      }
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t at = (int64_t(t) * G + g) * TILE + 8 * h;
      const __m256 s = load_scales8(j.scales, j.half_scales, at);
      const __m256 b = load_scales8(j.biases, j.half_scales, at);
      for (int r = 0; r < R; ++r) {
        const int64_t rg = (r0 + r) * G + g;
        const __m256 dot = _mm256_cvtepi32_ps(a[r][h]);
        acc[r][h] = _mm256_fmadd_ps(dot, _mm256_mul_ps(s, _mm256_set1_ps(j.xs[rg])), acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(b, _mm256_set1_ps(j.xsum[rg]), acc[r][h]);
      }
    }
  }
  const int n0 = t * TILE;
  for (int h = 0; h < 2; ++h) {
    const int valid = std::clamp(j.N - n0 - 8 * h, 0, 8);
    if (valid == 0) break;
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), lanes);
    const __m256 bias = j.bias ? _mm256_maskload_ps(j.bias + n0 + 8 * h, mask) : _mm256_setzero_ps();
    for (int r = 0; r < R; ++r)
      _mm256_maskstore_ps(j.y + (r0 + r) * j.N + n0 + 8 * h, mask, _mm256_add_ps(acc[r][h], bias));
  }
}

template <int BITS, bool SPLIT>
OMLX_AVX2 void tile_avx2(const Job& j, int t, int64_t r0, int64_t r1) {
  int64_t r = r0;
  for (; r + 2 <= r1; r += 2) tile_rows_avx2<BITS, 2, SPLIT>(j, t, r);
  if (r < r1) tile_rows_avx2<BITS, 1, SPLIT>(j, t, r);
}

// ---------------------------------------------------------------------------- portable
// The same operations, one (row, output) at a time: the code of output n_local for k sits
// at byte (k / step) * 64 + n_local * 4 + k % 4 of its tile (4-bit: nibble k % 8 / 4).
void tile_portable(const Job& j, int t, int64_t r0, int64_t r1) {
  const int G = j.groups();
  const uint8_t* w = j.w + int64_t(t) * j.tile_bytes();
  const int n0 = t * TILE;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* xq = j.xq + r * j.K;
    const int8_t* xl = j.precision == 2 ? j.xl + r * j.K : nullptr;
    for (int nl = 0; nl < TILE && n0 + nl < j.N; ++nl) {
      float acc = 0.f;
      for (int g = 0; g < G; ++g) {
        int32_t dot = 0;
        for (int k = g * j.group; k < (g + 1) * j.group; ++k) {
          int q;
          if (j.bits == 4) {
            const uint8_t byte = w[(k / 8) * 64 + nl * 4 + k % 4];
            q = (k % 8) < 4 ? (byte & 0x0F) : (byte >> 4);
          } else {
            q = w[(k / 4) * 64 + nl * 4 + k % 4];
          }
          dot += q * (xl ? 128 * xq[k] + xl[k] : xq[k]);
        }
        const int64_t at = (int64_t(t) * G + g) * TILE + nl;
        const float s = scale_at(j.scales, j.half_scales, at);
        const float b = scale_at(j.biases, j.half_scales, at);
        const int64_t rg = r * G + g;
        acc = std::fma(float(dot), s * j.xs[rg], acc);
        acc = std::fma(b, j.xsum[rg], acc);
      }
      j.y[r * j.N + n0 + nl] = acc + (j.bias ? j.bias[n0 + nl] : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------- the call
int64_t min_thread_work() {
  // Waking the pool's sleeping threads (OMP_WAIT_POLICY=PASSIVE, see backend.py) costs tens
  // of microseconds: a matrix that one thread streams faster than that stays on one thread.
  // bench/quant_matmul_bench.py measured the default; OMLX_QUANT_THREAD_WORK overrides.
  const char* env = std::getenv("OMLX_QUANT_THREAD_WORK");
  return env ? std::atoll(env) : (int64_t(1) << 21);
}

std::atomic<int64_t> kMinThreadWork{min_thread_work()};

bool worth_threads(const Job& j) {
  return int64_t(j.N) * j.K * std::max<int64_t>(j.M, 1) >= kMinThreadWork.load(std::memory_order_relaxed);
}

// Gathers a strided x into rows (shape (..., K), element strides).
void gather_rows(const float* src, const Strided& st, float* dst) {
  const int nd = int(st.shape.size());
  std::vector<int64_t> idx(nd, 0);
  int64_t total = 1;
  for (auto d : st.shape) total *= d;
  for (int64_t i = 0; i < total; ++i) {
    int64_t off = 0;
    for (int d = 0; d < nd; ++d) off += idx[d] * st.strides[d];
    dst[i] = src[off];
    for (int d = nd - 1; d >= 0; --d) {
      if (++idx[d] < st.shape[d]) break;
      idx[d] = 0;
    }
  }
}

void run(Job j, const Strided& strided) {
  std::vector<float> rows;
  if (!strided.shape.empty()) {
    rows.resize(size_t(j.M) * j.K);
    gather_rows(j.x, strided, rows.data());
    j.x = rows.data();
  }
  const bool bf16 = j.precision == 3;
  std::vector<int8_t> xq(bf16 ? 0 : size_t(j.M) * j.K), xl(j.precision == 2 ? size_t(j.M) * j.K : 0);
  std::vector<uint16_t> xb(bf16 ? size_t(j.M) * j.K : 0);
  j.xl = xl.data();
  j.xb = xb.data();
  std::vector<float> xs(size_t(j.M) * j.groups()), xsum(size_t(j.M) * j.groups());
  j.xq = xq.data();
  j.xs = xs.data();
  j.xsum = xsum.data();
  const bool threads = worth_threads(j);
  const int tiles = j.tiles();
  for (int64_t c0 = 0; c0 < j.M; c0 += ROW_CHUNK) {
    const int64_t c1 = std::min(j.M, c0 + ROW_CHUNK);
    if (bf16)
      prepare_rows_bf16(j, c0, c1);
    else
      quantize_rows(j, c0, c1);
#pragma omp parallel for schedule(static) if (threads)
    for (int t = 0; t < tiles; ++t) {
      if (bf16)
        tile_bf16(j, t, c0, c1);
      else if (j.isa == Isa::Portable)
        tile_portable(j, t, c0, c1);
      else if (j.isa == Isa::Avx2) {
        if (j.bits == 4)
          j.precision == 2 ? tile_avx2<4, true>(j, t, c0, c1) : tile_avx2<4, false>(j, t, c0, c1);
        else
          j.precision == 2 ? tile_avx2<8, true>(j, t, c0, c1) : tile_avx2<8, false>(j, t, c0, c1);
      }
      else if (j.bits == 4)
        j.precision == 2 ? tile_vnni<4, true>(j, t, c0, c1) : tile_vnni<4, false>(j, t, c0, c1);
      else
        j.precision == 2 ? tile_vnni<8, true>(j, t, c0, c1) : tile_vnni<8, false>(j, t, c0, c1);
    }
  }
}

class QuantLinear : public mx::Primitive {
 public:
  QuantLinear(mx::Stream stream, int n, int bits, int group, int precision, bool has_bias, Isa isa)
      : mx::Primitive(stream), n_(n), bits_(bits), group_(group), precision_(precision), has_bias_(has_bias),
        isa_(isa) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    // inputs: x (M, K) float32, packed (bytes,) uint8, scales, biases (tiles*groups*16,), [bias (N,)]
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& x = inputs[0];
    for (size_t i = 1; i < inputs.size(); ++i)
      if (!inputs[i].flags().row_contiguous)
        throw std::invalid_argument("quant_linear: weights, scales, biases and bias must be contiguous");
    Job j{};
    j.x = x.data<float>();
    Strided strided;
    if (!x.flags().row_contiguous) {
      strided.shape.assign(x.shape().begin(), x.shape().end());
      strided.strides.assign(x.strides().begin(), x.strides().end());
    }
    j.y = out.data<float>();
    j.w = inputs[1].data<uint8_t>();
    j.scales = inputs[2].data<void>();
    j.biases = inputs[3].data<void>();
    j.half_scales = inputs[2].dtype() == mx::float16;
    j.bias = has_bias_ ? inputs[4].data<float>() : nullptr;
    j.K = int(x.shape(-1));
    j.M = int64_t(x.size()) / j.K;
    j.N = n_;
    j.bits = bits_;
    j.group = group_;
    j.precision = precision_;
    j.isa = isa_;
    if (j.M == 0) return;
    enc.dispatch([j, strided = std::move(strided)]() { run(j, strided); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx quant_linear: this extension runs on the CPU only");
  }

  const char* name() const override {
    return "OmlxQuantLinear";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const QuantLinear*>(&other);
    return o && o->n_ == n_ && o->bits_ == bits_ && o->group_ == group_ && o->precision_ == precision_ &&
           o->has_bias_ == has_bias_ &&
           o->isa_ == isa_;
  }

 private:
  int n_, bits_, group_, precision_;
  bool has_bias_;
  Isa isa_;
};

// x (..., K) any float dtype; packed / scales / biases as made by quant_linear.py's repack.
mx::array quant_linear(const mx::array& x, const mx::array& packed, const mx::array& scales,
                       const mx::array& biases, const std::optional<mx::array>& bias, int n, int bits,
                       int group_size, int precision, const std::string& isa_name_, mx::StreamOrDevice s) {
  const Isa isa = parse_isa(isa_name_);
  if (precision != 1 && precision != 2 && precision != 3)
    throw std::invalid_argument("quant_linear: precision must be 1 (int8 x), 2 (split ~15-bit x) or 3 (bf16)");
  if (precision == 3 && (bits != 4 || isa != Isa::Vnni || !kHasBf16))
    throw std::invalid_argument("quant_linear: the bf16 variant needs 4-bit weights and a CPU with AVX512-BF16");
  if (bits != 4 && bits != 8) throw std::invalid_argument("quant_linear: bits must be 4 or 8");
  if (group_size != 32 && group_size != 64 && group_size != 128)
    throw std::invalid_argument("quant_linear: group_size must be 32, 64 or 128");
  if (x.ndim() < 1) throw std::invalid_argument("quant_linear: x must be (..., K)");
  const int k = int(x.shape(-1));
  if (k <= 0 || k % group_size != 0) throw std::invalid_argument("quant_linear: K must be a multiple of group_size");
  if (n <= 0) throw std::invalid_argument("quant_linear: N must be positive");
  const int64_t tiles = (n + TILE - 1) / TILE;
  if (packed.dtype() != mx::uint8 || packed.size() != size_t(tiles * TILE * int64_t(k) * bits / 8))
    throw std::invalid_argument("quant_linear: packed weights do not match (N, K, bits)");
  const size_t scale_count = size_t(tiles * (k / group_size) * TILE);
  for (const auto* a : {&scales, &biases}) {
    if (a->size() != scale_count) throw std::invalid_argument("quant_linear: scales / biases do not match (N, K, group)");
    if (a->dtype() != mx::float16 && a->dtype() != mx::float32)
      throw std::invalid_argument("quant_linear: scales / biases must be float16 or float32");
  }
  if (scales.dtype() != biases.dtype()) throw std::invalid_argument("quant_linear: scales and biases differ in dtype");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != n))
    throw std::invalid_argument("quant_linear: bias must have shape (N,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // x may stay strided (the task gathers it); the others must be contiguous.
  std::vector<mx::array> inputs = {
      x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream),
      omlx_cpu::as_rows(packed, stream),
      omlx_cpu::as_rows(scales, stream),
      omlx_cpu::as_rows(biases, stream),
  };
  if (bias) inputs.push_back(omlx_cpu::as_rows(bias->dtype() == mx::float32 ? *bias : mx::astype(*bias, mx::float32, stream), stream));
  mx::Shape shape = x.shape();
  shape.back() = n;
  return mx::array(shape, mx::float32,
                   std::make_shared<QuantLinear>(stream, n, bits, group_size, precision, bias.has_value(), isa),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_quant_linear_cpu, m) {
  m.doc() = "omlx linear layers over 4/8-bit affine-quantized weights read as stored (MLX CPU primitive)";
  m.def("quant_linear", &quant_linear, "x"_a, "packed"_a, "scales"_a, "biases"_a, "bias"_a = nb::none(),
        nb::kw_only(), "n"_a, "bits"_a, "group_size"_a, "precision"_a = 2, "isa"_a = "auto", "stream"_a = nb::none(),
        "y = x @ dequant(W).T (+ bias) with x quantized per group, to int8 (precision 1) or to ~15 bits held "
        "as two int8 parts (precision 2) (see omlx/kernels/quant_linear.py).");
  m.def("split_levels", []() { return SPLIT_LEVELS; });
  m.def("has_bf16", []() { return kHasBf16; }, "Whether the bf16 variant (precision 3) runs here.");
  m.def("isa", []() { return std::string(isa_name(best_isa())); },
        "The instruction set the kernel uses on this CPU.");
  m.def("tile", []() { return TILE; });
  m.def("min_thread_work", []() { return kMinThreadWork.load(); },
        "Rows x N x K below which a call runs on one thread.");
  m.def("set_min_thread_work", [](int64_t work) { kMinThreadWork.store(work); }, "work"_a,
        "Set that threshold (the bench measures it; OMLX_QUANT_THREAD_WORK sets it at load).");
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
