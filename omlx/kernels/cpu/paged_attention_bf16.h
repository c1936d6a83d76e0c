// The paged attention kernel's tile arithmetic for bfloat16 pools on CPUs with AVX512-BF16
// (vdpbf16ps: 32 bf16 products a zmm, float32 accumulation, twice an fp32 FMA's work).
//
// The float path borrows the tile transpose (tile_transpose below) for float32 pools: its
// transposed key tile as before, bit for bit, without 32 x dk scalar strided stores a tile.
//
// Why a path of its own: a bf16 pool widened to float32 key by key and transposed with scalar
// stores cost ~150 cycles a key and KV head, most of a one-row decode call's time, and a
// prefill's scores ran at fp32 FMA speed.  Here a tile of 32 keys is packed once into the
// layout vdpbf16ps wants (in-register 16x16 dword transposes, no widening), queries and
// probabilities are rounded to bf16 (float32 accumulation, as GPUs' bf16 attention does), and
// both products run on the bf16 unit.
//
// Batch invariance (paged_attention.cpp's header): every score and output element is made by
// the same instruction sequence whatever the unit's row count: a score is a chain of
// vdpbf16ps over dim pairs in order from zero, an output element one over key pairs in order
// from the row's rescaled state, each tile's 32 keys always (keys a row does not see carry a
// zero probability and a zero value, so their products add exact zeros).
#pragma once

#include <cstdint>
#include <cstring>

#include <immintrin.h>

#if defined(__AVX512F__)
#define OMLX_ATTENTION_TRANSPOSE 1

// A tile's key rows into dim-major order with in-register transposes, for any 32-bit element
// (a float, or a pair of bf16): the float path's transposed tile (bit copies: its arithmetic
// and bits are unchanged) and the bf16 path's dim-pair tile.
namespace tile_transpose {

constexpr int NT = 32;  // keys per tile (paged_attention.cpp's grid)

// 16 rows of 16 dwords transposed in registers (unpack 32 / 64-bit, then 128-bit lanes).
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    r[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    r[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    r[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  // r[4k + c], 128-bit lane L: column 4L + c of rows 4k..4k+3.
  for (int c = 0; c < 4; ++c) {
    const __m512i a88 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88);
    const __m512i aDD = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xDD);
    const __m512i b88 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88);
    const __m512i bDD = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xDD);
    t[c] = _mm512_shuffle_i32x4(a88, b88, 0x88);  // lane 0: row c
    t[8 + c] = _mm512_shuffle_i32x4(a88, b88, 0xDD);  // lane 2: row 8 + c
    t[4 + c] = _mm512_shuffle_i32x4(aDD, bDD, 0x88);  // lane 1: row 4 + c
    t[12 + c] = _mm512_shuffle_i32x4(aDD, bDD, 0xDD);  // lane 3: row 12 + c
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}

// NT rows of `words` dwords each (`row[j]`; a zero row where a key is not read) into
// out[w * NT + j] = row[j][w].  words % 16 == 0.
template <typename T>
inline void transpose_tile(const T* const* row, void* out_tile, int words) {
  static_assert(sizeof(T) <= 4 && 4 % sizeof(T) == 0);
  uint32_t* out = static_cast<uint32_t*>(out_tile);
  __m512i r[16];
  for (int jb = 0; jb < NT; jb += 16)
    for (int wb = 0; wb < words; wb += 16) {
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row[jb + i] + wb * (4 / sizeof(T)));
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + (wb + i) * NT + jb, r[i]);
    }
}

}  // namespace tile_transpose
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define OMLX_ATTENTION_BF16 1

namespace bf16_tiles {

constexpr int NT = tile_transpose::NT;
constexpr int PAIRS = NT / 2;  // key pairs per tile

inline __m512bh as_bh(__m512i v) {
  return (__m512bh)v;
}

// Keys of a tile, `krow[j]` (dk bf16 each; a zero row where a key is not read), into dim-pair
// major order: kp[d2 * NT + j] = (k[j][2 d2], k[j][2 d2 + 1]).  dk % 32 == 0.
inline void pack_keys(const uint16_t* const* krow, uint32_t* kp, int dk) {
  tile_transpose::transpose_tile(krow, kp, dk / 2);
}

// Values of a tile, `vrow[j]` (dv bf16 each), into key-pair major order:
// vp[j2 * dv + c] = (v[2 j2][c], v[2 j2 + 1][c]).  dv % 32 == 0.
inline void pack_values(const uint16_t* const* vrow, uint32_t* vp, int dv) {
  const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38,
                                      6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int j2 = 0; j2 < PAIRS; ++j2) {
    const uint16_t* a = vrow[2 * j2];
    const uint16_t* b = vrow[2 * j2 + 1];
    uint32_t* dst = vp + j2 * dv;
    for (int c = 0; c < dv; c += 32) {
      const __m512i va = _mm512_loadu_si512(a + c), vb = _mm512_loadu_si512(b + c);
      _mm512_storeu_si512(dst + c, _mm512_permutex2var_epi16(va, lo, vb));
      _mm512_storeu_si512(dst + c + 16, _mm512_permutex2var_epi16(va, hi, vb));
    }
  }
}

// `n` floats (n % 32 == 0) rounded to bf16 (nearest even), pairs in dwords.
inline void round_rows(const float* src, uint32_t* dst, int n) {
  for (int i = 0; i < n; i += 32) {
    const __m512bh b = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + i + 16), _mm512_loadu_ps(src + i));
    _mm512_storeu_si512(dst + i / 2, (__m512i)b);
  }
}

// 32 probabilities (two vectors) as bf16 pairs.
inline void store_pairs(__m512 lo, __m512 hi, uint32_t* dst) {
  _mm512_storeu_si512(dst, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
}

// The sum of the 32 values store_pairs wrote (as rounded), in 16 lanes: lane i holds keys
// 2i and 2i + 1 (a bf16 is the top half of its float32).
template <typename V>
inline V pair_sums(const uint32_t* src) {
  const __m512i v = _mm512_loadu_si512(src);
  const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
  const __m512 sum = _mm512_add_ps(even, odd);
  V out;
  std::memcpy(&out, &sum, sizeof(V));
  return out;
}

// S[r, 0:NT] = Q[r] . K[0:NT] for R rows: qp rows of dk / 2 pairs, kp from pack_keys.
template <int R>
inline void scores(const uint32_t* qp, const uint32_t* kp, float* s, int dk) {
  const int pairs = dk / 2;
  __m512 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int d2 = 0; d2 < pairs; ++d2) {
    const __m512bh k0 = as_bh(_mm512_loadu_si512(kp + d2 * NT));
    const __m512bh k1 = as_bh(_mm512_loadu_si512(kp + d2 * NT + 16));
    for (int r = 0; r < R; ++r) {
      const __m512bh q = as_bh(_mm512_set1_epi32(int(qp[r * pairs + d2])));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], q, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], q, k1);
    }
  }
  for (int r = 0; r < R; ++r) {
    _mm512_storeu_ps(s + r * NT, acc[r][0]);
    _mm512_storeu_ps(s + r * NT + 16, acc[r][1]);
  }
}

inline void scores_block(const uint32_t* qp, const uint32_t* kp, float* s, int rows, int dk) {
  const int pairs = dk / 2;
  int r = 0;
  for (; r + 8 <= rows; r += 8) scores<8>(qp + r * pairs, kp, s + r * NT, dk);
  const uint32_t* q = qp + r * pairs;
  float* out = s + r * NT;
  switch (rows - r) {
    case 7: scores<7>(q, kp, out, dk); break;
    case 6: scores<6>(q, kp, out, dk); break;
    case 5: scores<5>(q, kp, out, dk); break;
    case 4: scores<4>(q, kp, out, dk); break;
    case 3: scores<3>(q, kp, out, dk); break;
    case 2: scores<2>(q, kp, out, dk); break;
    case 1: scores<1>(q, kp, out, dk); break;
  }
}

// O[r, c0:c0 + 16 C] = corr[r] O[r, ...] + sum_j P[r, j] V[j, c0:...] for R rows: pp rows of
// PAIRS probability pairs, vp from pack_values, corr the online softmax's rescale factors.
template <int R, int C>
inline void pv(const uint32_t* pp, const uint32_t* vp, const float* corr, float* o, int dv, int c0) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r) {
    const __m512 f = _mm512_set1_ps(corr[r]);
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * dv + c0 + 16 * c), f);
  }
  for (int j2 = 0; j2 < PAIRS; ++j2) {
    __m512bh v[C];
    for (int c = 0; c < C; ++c) v[c] = as_bh(_mm512_loadu_si512(vp + j2 * dv + c0 + 16 * c));
    for (int r = 0; r < R; ++r) {
      const __m512bh p = as_bh(_mm512_set1_epi32(int(pp[r * PAIRS + j2])));
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], p, v[c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(o + r * dv + c0 + 16 * c, acc[r][c]);
}

template <int R>
inline void pv_rows(const uint32_t* pp, const uint32_t* vp, const float* corr, float* o, int dv) {
  int c0 = 0;
  for (; c0 + 64 <= dv; c0 += 64) pv<R, 4>(pp, vp, corr, o, dv, c0);
  if (c0 < dv) pv<R, 2>(pp, vp, corr, o, dv, c0);  // dv % 32 == 0
}

inline void pv_block(const uint32_t* pp, const uint32_t* vp, const float* corr, float* o, int rows, int dv) {
  int r = 0;
  for (; r + 4 <= rows; r += 4) pv_rows<4>(pp + r * PAIRS, vp, corr + r, o + r * dv, dv);
  switch (rows - r) {
    case 3: pv_rows<3>(pp + r * PAIRS, vp, corr + r, o + r * dv, dv); break;
    case 2: pv_rows<2>(pp + r * PAIRS, vp, corr + r, o + r * dv, dv); break;
    case 1: pv_rows<1>(pp + r * PAIRS, vp, corr + r, o + r * dv, dv); break;
  }
}

}  // namespace bf16_tiles
#endif
