// Fused paged attention for MLX on the CPU: one custom primitive that reads keys and values
// straight out of omlx's block pool through each sequence's block table.
//
// Why: MLX's CPU attention is unfused (scores materialised, a slow scalar softmax, then a
// second matmul) and needs every row's blocks gathered into a contiguous copy first.  Here
// each work unit (a sequence's tile of query tokens, one KV head) streams its keys in tiles
// of 32, keeps an online softmax (flash-attention style) and never materialises more than a
// tile of scores.  The query heads of one KV head are processed together, so every key and
// value loaded serves all of them (GQA).
//
// One call covers a whole ragged step: decode rows (one query each), prefill chunks at any
// offset (causal within the chunk), and shared-prefix groups (sequences whose block tables
// start with the same blocks attend to those blocks together, once, before each attends to
// its own rest; the softmax state carries over exactly).  Pools may be float32, float16,
// bfloat16, or MLX's affine 4/8-bit quantized layout (dequantised a tile at a time).  Over a
// bfloat16 pool on a CPU with AVX512-BF16 both products run on the bf16 unit, queries and
// probabilities rounded to bf16 (paged_attention_bf16.h); every other pool keeps float32
// arithmetic, bit for bit what it was.
//
// Layers that see less than the whole context: a sliding window (the query at position p
// sees keys p - window < k <= p: Gemma 3, gpt-oss, OLMo 3) or chunked attention (keys k <= p
// with k / chunk == p / chunk: Llama 4).  Each token gets the first key position it may see;
// a unit's key loop starts at its earliest token's bound, so the tiles and blocks below it
// are never read (a window's cost is bounded by the window, not the context), and rows of a
// partly visible tile are masked.  Shared-prefix groups stay in use and exact: in the
// prefix phase every row is masked by its own token's bound too (keys of the prefix that
// left a query's window do not count for it), and a prefix unit starts at the smallest
// bound among its tokens (a prefix wholly out of reach costs nothing).  Attention sinks
// (gpt-oss: a learned logit per query head that joins the softmax denominator with no
// value, as in mx.fast.scaled_dot_product_attention(..., sinks=)) fold in when a row is
// normalised.
//
// Layout contract (omlx/kernels/paged_attention.py): a pool is `(blocks * kv_heads *
// block_size, dim)` rows, block-major then head-major, so the rows of one (block, head) are
// contiguous.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <nanobind/stl/vector.h>

#include "mlx/types/half_types.h"

#include "common.h"
#include "paged_attention_bf16.h"

namespace {

// ---------------------------------------------------------------------------- vectors
// GCC/Clang vector extensions: the compiler picks AVX-512 / AVX2 / NEON from -march.
#if defined(__AVX512F__)
constexpr int VW = 16;
#else
constexpr int VW = 8;
#endif
typedef float vf __attribute__((vector_size(VW * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VW * 4), aligned(4)));

constexpr int NT = 32;  // keys per tile
constexpr int DOT_ROWS = 8;  // up to this many query rows per unit, keys are not transposed
constexpr int NV = NT / VW;  // vectors per score row
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline vf splat(float x) {
  return vf{} + x;
}
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(vf));
  return v;
}
inline void vstore(float* p, vf v) {
  std::memcpy(p, &v, sizeof(vf));
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < VW; ++i) m = std::max(m, v[i]);
  return m;
}
typedef float v4f __attribute__((vector_size(16), aligned(4)));
inline float hsum(vf v) {
  // Fold halves down to four lanes (vector adds), then the last four.
  v4f acc;
  std::memcpy(&acc, &v, sizeof(v4f));
  for (int i = 1; i < VW / 4; ++i) {
    v4f part;
    std::memcpy(&part, reinterpret_cast<const char*>(&v) + i * sizeof(v4f), sizeof(v4f));
    acc += part;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// exp(x) to ~2 ulp: round-to-nearest range reduction by ln2, a degree-6 polynomial, and
// the exponent built in the float's bits.  x <= -87 (incl. -inf) gives exactly 0.
inline vf vexp(vf x) {
  const vf dead = x < -87.0f ? splat(0.f) : splat(1.f);  // as a 0/1 factor
  x = x < -87.0f ? splat(-87.0f) : x;
  x = x > 88.0f ? splat(88.0f) : x;
  const vf magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  vf t = x * 1.44269504088896341f + magic;
  vf n = t - magic;
  vi ni;
  std::memcpy(&ni, &t, sizeof(vi));
  ni -= 0x4B400000;  // bits of `magic`: what remains is the integer n
  vf r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187045e-06f;
  vf p = splat(1.0f / 720);
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  vi bits = (ni + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  return p * scale * dead;
}
inline float sexp(float x) {
  vf v = splat(x);
  return vexp(v)[0];
}

// ---------------------------------------------------------------------------- pools
enum class Kind { F32, F16, BF16, Q4, Q8 };

struct Pool {
  Kind kind;
  const void* data;  // float rows, or packed uint32 words
  const void* scales = nullptr;  // quantized: one per group, in `scale_kind`
  const void* biases = nullptr;
  Kind scale_kind = Kind::F32;
  int dim;  // logical head dim
  int row_words = 0;  // quantized: uint32 words per row
  int group = 64;

  inline float scalar(const void* base, int64_t i, Kind k) const {
    switch (k) {
      case Kind::F16:
        return static_cast<float>(static_cast<const mx::float16_t*>(base)[i]);
      case Kind::BF16:
        return static_cast<float>(static_cast<const mx::bfloat16_t*>(base)[i]);
      default:
        return static_cast<const float*>(base)[i];
    }
  }

  // value = scale * q + bias per group of `group` values; q packed little-end first in
  // uint32 words (MLX's affine layout).  `bits` constant so the unpacking vectorises.
  template <int BITS>
  inline void dequantize(int64_t row, float* out) const {
    constexpr int per_word = 32 / BITS;
    constexpr uint32_t mask = (1u << BITS) - 1;
    const uint32_t* words = static_cast<const uint32_t*>(data) + row * row_words;
    const int groups = dim / group;
    const int words_per_group = group / per_word;
    for (int g = 0; g < groups; ++g) {
      const float s = scalar(scales, row * groups + g, scale_kind);
      const float b = scalar(biases, row * groups + g, scale_kind);
      const uint32_t* w = words + g * words_per_group;
      float* o = out + g * group;
      for (int i = 0; i < words_per_group; ++i) {
        const uint32_t word = w[i];
        for (int k = 0; k < per_word; ++k)
          o[i * per_word + k] = s * static_cast<float>((word >> (k * BITS)) & mask) + b;
      }
    }
  }

  // A pointer to row `row` as floats: the pool itself for float32, else `scratch` filled.
  inline const float* row(int64_t row, float* scratch) const {
    switch (kind) {
      case Kind::F32:
        return static_cast<const float*>(data) + row * dim;
      case Kind::F16:
      case Kind::BF16:
        for (int d = 0; d < dim; ++d) scratch[d] = scalar(data, row * dim + d, kind);
        return scratch;
      case Kind::Q4:
        dequantize<4>(row, scratch);
        return scratch;
      case Kind::Q8:
        dequantize<8>(row, scratch);
        return scratch;
    }
    return nullptr;
  }
};

// ---------------------------------------------------------------------------- the step
struct Step {
  const float* q;  // (T, Hq, Dk), read through its strides (a view needs no copy)
  int64_t q_token_stride, q_head_stride, q_dim_stride;  // in floats
  float* out;  // (T, Hq, Dv)
  Pool k, v;
  const int32_t* tables;  // (S, W)
  const int32_t* seqs;  // (S, 4): q_start, q_len, pos0, group (-1: none)
  const int32_t* groups;  // (G, 4): first seq, seq count, table row, shared blocks
  int num_seqs, num_groups, width;
  int q_heads, kv_heads, dk, dv, block_size;
  float scale;
  int window = 0, chunk = 0;  // 0: no limit
  const int32_t* lo = nullptr;  // (T,) first key position each token sees; null: 0 for all
  const float* sinks = nullptr;  // (Hq,) sink logits; null: none
  // Softmax state of rows that attended a shared prefix: max, sum, unnormalised output.
  float* state_m = nullptr;  // (T, Hq)
  float* state_l = nullptr;
  float* state_o = nullptr;  // (T, Hq, Dv)

  int rep() const {
    return q_heads / kv_heads;
  }
};

// Floats of a row's running softmax sum: bf16 units keep a vector of partial sums (one
// horizontal add when the row is finished, not one a tile); the float path keeps its scalar.
// The saved state of a shared-prefix unit holds the same, so the sums carry over exactly.
constexpr int sum_lanes(bool bf16) {
  return bf16 ? VW : 1;
}

// Per-thread scratch, kept by each thread across calls (a decode call is a few microseconds
// of arithmetic: allocating and zeroing ~40 KB of scratch every call was a visible share of it).
// Nothing here is read before the unit writes it.
struct Scratch {
  std::vector<float> q, s, kt, krows, vrows, o, m, l, tmp, m_new, corr;
  std::vector<const float*> kptr, vptr;
  // bf16 pools (paged_attention_bf16.h): queries / probabilities as bf16 pairs, packed tiles,
  // the tile's key / value rows, and a zero row for keys a unit does not read.
  std::vector<uint32_t> qp, pp, kp, vp;
  std::vector<const uint16_t*> krow16, vrow16;
  std::vector<uint16_t> zero16;
  std::vector<float> zero32;
  void size(const Step& st, int max_rows) {
    auto grow = [](auto& v, size_t n) {
      if (v.size() < n) v.resize(n);
    };
    grow(q, size_t(max_rows) * st.dk);
    grow(s, size_t(max_rows) * NT);
    grow(kt, size_t(st.dk) * NT);
    grow(krows, size_t(NT) * st.dk);
    grow(vrows, size_t(NT) * st.dv);
    grow(o, size_t(max_rows) * st.dv);
    const size_t padded_rows = (size_t(max_rows) + VW - 1) / VW * VW;  // read in whole vectors
    grow(m, padded_rows);
    grow(l, padded_rows * VW);  // bf16 units: a vector of partial sums a row
    grow(m_new, padded_rows);
    grow(corr, padded_rows);
    grow(tmp, std::max(st.dk, st.dv));
    grow(kptr, NT);
    grow(vptr, NT);
    grow(qp, size_t(max_rows) * st.dk / 2);
    grow(pp, size_t(max_rows) * NT / 2);
    grow(kp, size_t(st.dk) / 2 * NT);
    grow(vp, size_t(NT) / 2 * st.dv);
    grow(krow16, NT);
    grow(vrow16, NT);
    grow(zero16, std::max(st.dk, st.dv));  // value-initialised: zeros, never written
    grow(zero32, std::max(st.dk, st.dv));
  }
};

// S[r, 0:NT] = Q[r, :] . Kt[:, 0:NT] for R rows at once (R*NV accumulators in registers).
template <int R>
inline void scores_rows(const float* q, const float* kt, float* s, int dk) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = splat(0.f);
  for (int d = 0; d < dk; ++d) {
    vf k[NV];
    for (int v = 0; v < NV; ++v) k[v] = vload(kt + d * NT + v * VW);
    for (int r = 0; r < R; ++r) {
      const vf qv = splat(q[r * dk + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] += qv * k[v];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) vstore(s + r * NT + v * VW, acc[r][v]);
}

// O[r, c0:c0+C*VW] += sum_j P[r, j] * V[j, c0:...] for R rows, over n keys.
template <int R, int C>
inline void pv_rows(const float* p, const float* const* vrow, float* o, int n, int dv, int c0) {
  vf acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vload(o + r * dv + c0 + c * VW);
  for (int j = 0; j < n; ++j) {
    vf val[C];
    for (int c = 0; c < C; ++c) val[c] = vload(vrow[j] + c0 + c * VW);
    for (int r = 0; r < R; ++r) {
      const vf pr = splat(p[r * NT + j]);
      for (int c = 0; c < C; ++c) acc[r][c] += pr * val[c];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) vstore(o + r * dv + c0 + c * VW, acc[r][c]);
}

template <int R>
inline void pv_block(const float* p, const float* const* vrow, float* o, int n, int dv) {
  int c0 = 0;
  for (; c0 + 4 * VW <= dv; c0 += 4 * VW) pv_rows<R, 4>(p, vrow, o, n, dv, c0);
  for (; c0 + VW <= dv; c0 += VW) pv_rows<R, 1>(p, vrow, o, n, dv, c0);
  for (; c0 < dv; ++c0)  // head dims that are not a multiple of the vector width
    for (int r = 0; r < R; ++r) {
      float acc = o[r * dv + c0];
      for (int j = 0; j < n; ++j) acc += p[r * NT + j] * vrow[j][c0];
      o[r * dv + c0] = acc;
    }
}

// Scores a row may not count in tile [kb, kb + n): keys past its token's position `qpos`
// (and the tile's tail past n), and with a window / chunk those below the token's first
// visible key `lo`.
template <bool LIMITED>
inline void mask_row(float* srow, int64_t qpos, int kb, int n, const int32_t* lo) {
  const int64_t visible = std::min<int64_t>(n, qpos - kb + 1);  // keys kb..kb+visible-1
  for (int j = std::max<int64_t>(visible, 0); j < NT; ++j) srow[j] = NEG_INF;
  if (LIMITED && lo) {
    const int64_t hidden = std::min<int64_t>(n, int64_t(*lo) - kb);
    for (int j = 0; j < hidden; ++j) srow[j] = NEG_INF;
  }
}

#ifdef OMLX_ATTENTION_BF16
// The online-softmax step of a bf16 unit's tile: mask, each row's new running max, the
// rescale factors of all rows in 16-lane vectors (one exp per 16 rows, not one per row), then
// each row's probabilities (written as bf16 pairs for the value product) and partial sums.
// A row that has seen nothing yet keeps its state: factor 1, probabilities 0.
template <bool LIMITED>
inline void softmax_tile_bf16(const Step& st, Scratch& sc, int rows, int t0, int64_t pos0, int kb, int n) {
  const int rep = st.rep();
  float* S = sc.s.data();
  float* M = sc.m.data();
  float* L = sc.l.data();
  float* M_new = sc.m_new.data();
  float* corr = sc.corr.data();
  for (int rr = 0; rr < rows; ++rr) {
    float* srow = S + rr * NT;
    mask_row<LIMITED>(srow, pos0 + rr / rep, kb, n, st.lo ? st.lo + t0 + rr / rep : nullptr);
    const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_loadu_ps(srow), _mm512_loadu_ps(srow + 16)));
    M_new[rr] = std::max(M[rr], tile_max);
  }
  for (int r0 = 0; r0 < rows; r0 += VW) {  // lanes past `rows` are padding, never read
    const vf m = vload(M + r0), m_new = vload(M_new + r0);
    vstore(corr + r0, vexp(m_new == NEG_INF ? splat(0.f) : m - m_new));
  }
  for (int rr = 0; rr < rows; ++rr) {
    const float* srow = S + rr * NT;
    uint32_t* prow = sc.pp.data() + rr * bf16_tiles::PAIRS;
    const float m_new = M_new[rr];
    if (m_new == NEG_INF) {
      std::memset(prow, 0, sizeof(uint32_t) * bf16_tiles::PAIRS);
      continue;
    }
    const vf mn = splat(m_new);
    // The sum counts the probabilities as rounded for the value product: the output is then
    // a weighted mean of the values with exactly the weights used.
    const vf p0 = vexp(vload(srow) - mn), p1 = vexp(vload(srow + VW) - mn);
    bf16_tiles::store_pairs(p0, p1, prow);
    vstore(L + rr * VW, vload(L + rr * VW) * corr[rr] + bf16_tiles::pair_sums<vf>(prow));
    M[rr] = m_new;
  }
}
#endif

// One work unit: query tokens [t0, t0 + nt) (all of KV head `head`'s query heads) against
// key positions [k0, k1) of `table`.  Token i sits at absolute position `pos0 + i` and sees
// keys at positions <= its own (pos0 = INT_MAX: no causal limit, a shared prefix), and none
// below `st.lo[t0 + i]` when a window / chunk is set (the caller has already raised k0 to
// the smallest of those bounds: tiles below it are skipped, not masked).
// `init`: start from the saved softmax state (the rows attended a shared prefix first).
// `finish`: write normalised outputs; else save the state for a later unit.
// `LIMITED`: a window, chunk or sinks may be set; the plain instantiation is the kernel as it
// was before those existed, without a single added test in its loops.
// `BF16`: both pools bf16 and the bf16 unit present (paged_attention_bf16.h): chosen per call
// by the pools' form and head dims alone, never by the unit's size.
template <bool LIMITED, bool BF16>
void attend(const Step& st, Scratch& sc, int head, int t0, int nt, int64_t pos0,
            const int32_t* table, int k0, int k1, bool init, bool finish) {
  constexpr int LW = sum_lanes(BF16);
  const int rep = st.rep(), dk = st.dk, dv = st.dv;
  const int rows = nt * rep;
  float* Q = sc.q.data();
  float* O = sc.o.data();
  float* M = sc.m.data();
  float* L = sc.l.data();
  // Gather this unit's queries (token-major, then query head), pre-scaled.
  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < rep; ++j) {
      const int r = i * rep + j;
      const int qh = head * rep + j;
      const float* src = st.q + int64_t(t0 + i) * st.q_token_stride + int64_t(qh) * st.q_head_stride;
      if (st.q_dim_stride == 1) {
        for (int d = 0; d < dk; ++d) Q[r * dk + d] = src[d] * st.scale;
      } else {
        for (int d = 0; d < dk; ++d) Q[r * dk + d] = src[d * st.q_dim_stride] * st.scale;
      }
      const int64_t sidx = int64_t(t0 + i) * st.q_heads + qh;
      if (init) {
        M[r] = st.state_m[sidx];
        std::memcpy(L + r * LW, st.state_l + sidx * LW, sizeof(float) * LW);
        std::memcpy(O + r * dv, st.state_o + sidx * dv, sizeof(float) * dv);
      } else {
        M[r] = NEG_INF;
        std::fill(L + r * LW, L + (r + 1) * LW, 0.f);
        std::memset(O + r * dv, 0, sizeof(float) * dv);
      }
    }
#ifdef OMLX_ATTENTION_BF16
  uint32_t* Qp = sc.qp.data();
  const uint32_t* Pp = sc.pp.data();
  if constexpr (BF16)
    for (int r = 0; r < rows; ++r) bf16_tiles::round_rows(Q + r * dk, Qp + r * dk / 2, dk);
#endif
  // Keys past the last token's position are never seen by any row of this unit.
  const int64_t last_pos = pos0 + nt - 1;
  if (int64_t(k1) > last_pos + 1) k1 = int(last_pos + 1);

  float* S = sc.s.data();
  float* Kt = sc.kt.data();
  // Key tiles sit on the absolute grid of NT positions whatever the unit's first key, so a
  // token meets the same tiles (the online softmax rescales at the same keys) alone, in a
  // shared-prefix group or in a chunk of any length: its result does not depend on its batch.
  // Keys of the first tile below k0 are below every row's window start (or k0 is on the
  // grid): they are masked, never counted.
  for (int kb = k0 - k0 % NT; kb < k1; kb += NT) {
    const int n = std::min(NT, k1 - kb);
    if constexpr (BF16) {
#ifdef OMLX_ATTENTION_BF16
      // Row pointers into the pool (a zero row for keys not read), packed for vdpbf16ps.
      const uint16_t* kpool = static_cast<const uint16_t*>(st.k.data);
      const uint16_t* vpool = static_cast<const uint16_t*>(st.v.data);
      const uint16_t* zero = sc.zero16.data();
      int block_index = kb / st.block_size, offset = kb % st.block_size;
      for (int j = 0; j < NT; ++j) {
        if (j >= n) {
          sc.krow16[j] = sc.vrow16[j] = zero;
          continue;
        }
        const int64_t prow = (int64_t(table[block_index]) * st.kv_heads + head) * st.block_size + offset;
        if (++offset == st.block_size) {
          offset = 0;
          ++block_index;
        }
        const bool read = kb + j >= k0;  // before the unit's first key: never read, masked
        sc.krow16[j] = read ? kpool + prow * dk : zero;
        sc.vrow16[j] = read ? vpool + prow * dv : zero;
      }
      bf16_tiles::pack_keys(sc.krow16.data(), sc.kp.data(), dk);
      bf16_tiles::scores_block(Qp, sc.kp.data(), S, rows, dk);
      bf16_tiles::pack_values(sc.vrow16.data(), sc.vp.data(), dv);
#endif
    } else {
      // Keys of this tile transposed (dk, NT), values as row pointers (converted / dequantised
      // into scratch when the pool is not float32).  Always the transposed tile, whatever the
      // unit's row count: a dot product per key row sums a score in another order, and
      // choosing by the row count (which depends on how the step chunked the prompt) made a
      // token's bits depend on its batch.  Rows are transposed in registers (the same bits as
      // the scalar copy): a float32 pool's in place, others' once widened / dequantised.
#ifdef OMLX_ATTENTION_TRANSPOSE
      const bool in_registers = dk % 16 == 0;
#else
      constexpr bool in_registers = false;
#endif
      const float* zero = sc.zero32.data();
      int block_index = kb / st.block_size, offset = kb % st.block_size;  // walked, not divided per key
      for (int j = 0; j < n; ++j) {
        const int64_t prow = (int64_t(table[block_index]) * st.kv_heads + head) * st.block_size + offset;
        if (++offset == st.block_size) {
          offset = 0;
          ++block_index;
        }
        if (kb + j < k0) {  // before the unit's first key: never read (it may be out of reach)
          if (in_registers)
            sc.kptr[j] = zero;
          else
            for (int d = 0; d < dk; ++d) Kt[d * NT + j] = 0.f;
          sc.vptr[j] = zero;  // its score is masked: p = 0 times a zero value adds exactly 0
          continue;
        }
        if (in_registers) {
          sc.kptr[j] = st.k.row(prow, sc.krows.data() + size_t(j) * dk);
        } else {
          const float* krow = st.k.row(prow, sc.tmp.data());
          for (int d = 0; d < dk; ++d) Kt[d * NT + j] = krow[d];
        }
        sc.vptr[j] = st.v.row(prow, sc.vrows.data() + size_t(j) * dv);
      }
      if (in_registers) {
#ifdef OMLX_ATTENTION_TRANSPOSE
        for (int j = n; j < NT; ++j) sc.kptr[j] = zero;
        tile_transpose::transpose_tile(sc.kptr.data(), Kt, dk);
#endif
      } else {
        for (int j = n; j < NT; ++j)
          for (int d = 0; d < dk; ++d) Kt[d * NT + j] = 0.f;
      }
      int r = 0;
      for (; r + 4 <= rows; r += 4) scores_rows<4>(Q + r * dk, Kt, S + r * NT, dk);
      for (; r < rows; ++r) scores_rows<1>(Q + r * dk, Kt, S + r * NT, dk);
    }

    if constexpr (BF16) {
#ifdef OMLX_ATTENTION_BF16
      softmax_tile_bf16<LIMITED>(st, sc, rows, t0, pos0, kb, n);
      bf16_tiles::pv_block(Pp, sc.vp.data(), sc.corr.data(), O, rows, dv);
#endif
    } else {
      // Causal mask and tile tail, then the online-softmax update of each row.
      for (int rr = 0; rr < rows; ++rr) {
        float* srow = S + rr * NT;
        mask_row<LIMITED>(srow, pos0 + rr / rep, kb, n, st.lo ? st.lo + t0 + rr / rep : nullptr);
        vf mv = vload(srow);
        for (int v = 1; v < NV; ++v) mv = mv > vload(srow + v * VW) ? mv : vload(srow + v * VW);
        const float tile_max = hmax(mv);
        const float m_new = std::max(M[rr], tile_max);
        if (m_new == NEG_INF) continue;  // nothing visible yet
        const float corr = sexp(M[rr] - m_new);
        vf sum = splat(0.f);
        const vf mn = splat(m_new);
        for (int v = 0; v < NV; ++v) {
          vf p = vexp(vload(srow + v * VW) - mn);
          vstore(srow + v * VW, p);
          sum += p;
        }
        L[rr] = L[rr] * corr + hsum(sum);
        M[rr] = m_new;
        if (corr != 1.f) {
          float* orow = O + rr * dv;
          for (int d = 0; d < dv; ++d) orow[d] *= corr;
        }
      }
      // Rows whose tile was all masked hold -inf scores: their probabilities must be zero.
      for (int rr = 0; rr < rows; ++rr) {
        float* srow = S + rr * NT;
        if (M[rr] == NEG_INF) std::memset(srow, 0, sizeof(float) * NT);
      }
      int r = 0;
      for (; r + 4 <= rows; r += 4) pv_block<4>(S + r * NT, sc.vptr.data(), O + r * dv, n, dv);
      switch (rows - r) {
        case 3: pv_block<3>(S + r * NT, sc.vptr.data(), O + r * dv, n, dv); break;
        case 2: pv_block<2>(S + r * NT, sc.vptr.data(), O + r * dv, n, dv); break;
        case 1: pv_block<1>(S + r * NT, sc.vptr.data(), O + r * dv, n, dv); break;
      }
    }
  }

  for (int i = 0; i < nt; ++i)
    for (int j = 0; j < rep; ++j) {
      const int rr = i * rep + j;
      const int64_t sidx = int64_t(t0 + i) * st.q_heads + head * rep + j;
      if (finish) {
        float l = BF16 ? hsum(vload(L + rr * LW)) : L[rr], corr = 1.f;
        if (LIMITED && st.sinks) {
          // softmax over [sink, scores]: the sink joins the running max and the sum, with
          // no value.  A row that saw no key gives zeros (the sink takes all the weight),
          // as mx.fast.scaled_dot_product_attention does.
          const float sink = st.sinks[head * rep + j];
          const float top = std::max(M[rr], sink);
          if (top == NEG_INF) {
            l = 0.f;
          } else {
            corr = M[rr] == NEG_INF ? 0.f : std::exp(M[rr] - top);
            l = l * corr + std::exp(sink - top);
          }
        }
        const float inv = l > 0.f ? corr / l : 0.f;
        float* dst = st.out + sidx * dv;
        for (int d = 0; d < dv; ++d) dst[d] = O[rr * dv + d] * inv;
      } else {
        st.state_m[sidx] = M[rr];
        std::memcpy(st.state_l + sidx * LW, L + rr * LW, sizeof(float) * LW);
        std::memcpy(st.state_o + sidx * dv, O + rr * dv, sizeof(float) * dv);
      }
    }
}

struct Unit {
  int head, t0, nt;
  int64_t pos0;
  int table_row, k0, k1;
  bool init, finish;
  int64_t cost;
};

// Query tokens per unit: enough rows (tokens x query heads per KV head) to reuse each key
// tile many times, few enough that a long prefill splits across threads.
int tile_tokens(int rep) {
  return std::max(1, 48 / rep);
}

// The bf16 tile path serves a call when both pools are bf16, their head dims fill whole
// vectors, and the kernel was built for a CPU with the bf16 unit.
bool bf16_tiles_serve(const Step& st) {
#ifdef OMLX_ATTENTION_BF16
  return st.k.kind == Kind::BF16 && st.v.kind == Kind::BF16 && st.dk % 32 == 0 && st.dv % 32 == 0;
#else
  return false;
#endif
}

template <bool LIMITED, bool BF16>
void run_unit(const Step& st, Scratch& sc, const Unit& w) {
  const int32_t* table = st.tables + int64_t(w.table_row) * st.width;
  attend<LIMITED, BF16>(st, sc, w.head, w.t0, w.nt, w.pos0, table, w.k0, w.k1, w.init, w.finish);
}

// The scratch of the calling thread (MLX's stream thread, or an OpenMP worker), kept for its
// next call.
Scratch& thread_scratch(const Step& st, int max_rows) {
  thread_local Scratch sc;
  sc.size(st, max_rows);
  return sc;
}

void run_units(const Step& st, std::vector<Unit>& units, int max_rows) {
  // Longest first, so the dynamic schedule ends balanced.
  std::sort(units.begin(), units.end(), [](const Unit& a, const Unit& b) { return a.cost > b.cost; });
  const int count = int(units.size());
  const bool limited = st.lo != nullptr || st.sinks != nullptr;
  const bool bf16 = bf16_tiles_serve(st);
  auto unit_runner = [&]() {
    if (limited) return bf16 ? &run_unit<true, true> : &run_unit<true, false>;
    return bf16 ? &run_unit<false, true> : &run_unit<false, false>;
  };
  const auto run = unit_runner();
  int64_t total = 0;
  for (const Unit& w : units) total += w.cost;
  // Threads pay only above ~0.2 ms of work: waking a sleeping thread costs ~10-50 us (and an
  // OpenMP region for one thread still costs its setup).  A unit of cost is one key against
  // one token's query heads: tens of cycles from float rows; on the bf16 unit ~35 cycles in
  // a decode row (its tile's packing serves one token: 1.3 us a tile of 32 keys and 3 KV
  // heads here), ~20 in a prefill unit.  One row of SmolLM2 stays on the calling thread up
  // to ~5K keys; 32 decode rows at 300 keys take both.
  const int64_t worth_threads = int64_t(1) << 14;
  const bool parallel = omlx_cpu::openmp_threads() > 1 && count > 1 && total > worth_threads;
  if (!parallel) {
    Scratch& sc = thread_scratch(st, max_rows);
    for (int u = 0; u < count; ++u) run(st, sc, units[u]);
    return;
  }
#ifdef _OPENMP
#pragma omp parallel
  {
    Scratch& sc = thread_scratch(st, max_rows);
#pragma omp for schedule(dynamic, 1)
    for (int u = 0; u < count; ++u) run(st, sc, units[u]);
  }
#endif
}

// The first key position the query at `pos` sees under a window / chunk (0: all).
inline int32_t first_visible(int64_t pos, int window, int chunk) {
  int64_t lo = 0;
  if (window > 0) lo = std::max<int64_t>(lo, pos - window + 1);
  if (chunk > 0) lo = std::max<int64_t>(lo, pos - pos % chunk);
  return int32_t(lo);
}

void run_step(Step st) {
  const int rep = st.rep();
  const int tile = tile_tokens(rep);
  const int max_rows = tile * rep;
  const int64_t no_limit = std::numeric_limits<int32_t>::max();
  int64_t T = 0;
  for (int s = 0; s < st.num_seqs; ++s)
    T = std::max<int64_t>(T, st.seqs[s * 4] + st.seqs[s * 4 + 1]);
  std::vector<int32_t> lo;
  if (st.window > 0 || st.chunk > 0) {
    lo.assign(T, 0);
    for (int s = 0; s < st.num_seqs; ++s) {
      const int32_t* si = st.seqs + s * 4;
      for (int i = 0; i < si[1]; ++i) lo[si[0] + i] = first_visible(int64_t(si[2]) + i, st.window, st.chunk);
    }
    st.lo = lo.data();
  }
  std::vector<float> sm, sl, so;
  std::vector<Unit> shared;
  if (st.num_groups > 0) {
    sm.assign(T * st.q_heads, 0.f);
    sl.assign(T * st.q_heads * sum_lanes(bf16_tiles_serve(st)), 0.f);
    so.assign(T * st.q_heads * st.dv, 0.f);
    st.state_m = sm.data();
    st.state_l = sl.data();
    st.state_o = so.data();
    // Phase 1: every group's queries against its shared blocks (keys read once per group).
    for (int g = 0; g < st.num_groups; ++g) {
      const int32_t* gi = st.groups + g * 4;
      const int first = gi[0], count = gi[1];
      const int t_begin = st.seqs[first * 4];
      const int t_end = st.seqs[(first + count - 1) * 4] + st.seqs[(first + count - 1) * 4 + 1];
      // The shared keys end on the NT grid (their own phase picks up the rest), so the tiles
      // are those a member meets alone.
      const int k1 = gi[3] * st.block_size / NT * NT;
      for (int h = 0; h < st.kv_heads; ++h)
        for (int t = t_begin; t < t_end; t += tile) {
          const int nt = std::min(tile, t_end - t);
          // Tokens of several sequences: start at the smallest window / chunk bound among
          // them (rows are masked by their own).  A unit that sees nothing still runs: it
          // saves the empty softmax state the sequences' own units start from.
          int k0 = 0;
          if (st.lo) {
            k0 = std::numeric_limits<int32_t>::max();
            for (int i = 0; i < nt; ++i) k0 = std::min(k0, st.lo[t + i]);
            k0 = std::min(k0, k1);
          }
          shared.push_back({h, t, nt, no_limit - nt, gi[2], k0, k1, false, false,
                            int64_t(nt) * std::max(1, k1 - k0)});
        }
    }
    run_units(st, shared, max_rows);
  }
  // Phase 2: each sequence's tokens against its own blocks (after its shared prefix).
  std::vector<Unit> own;
  for (int s = 0; s < st.num_seqs; ++s) {
    const int32_t* si = st.seqs + s * 4;
    const int q_start = si[0], q_len = si[1], pos0 = si[2], group = si[3];
    const int k0 = group >= 0 ? st.groups[group * 4 + 3] * st.block_size / NT * NT : 0;
    for (int h = 0; h < st.kv_heads; ++h)
      for (int i = 0, nt; i < q_len; i += nt) {
        nt = std::min(tile, q_len - i);
        // A unit never straddles a chunk boundary (its later tokens would not see the keys
        // its earlier ones do).
        if (st.chunk > 0) nt = std::min(nt, st.chunk - (pos0 + i) % st.chunk);
        const int k1 = pos0 + i + nt;
        // Keys below the first token's window / chunk start are seen by no token of the
        // unit (bounds grow with position): the loop starts there.
        const int start = st.lo ? std::max(k0, st.lo[q_start + i]) : k0;
        own.push_back({h, q_start + i, nt, int64_t(pos0) + i, s, start, k1, group >= 0, true,
                       int64_t(nt) * std::max(1, k1 - start)});
      }
  }
  run_units(st, own, max_rows);
}

Kind kind_of(mx::Dtype t) {
  if (t == mx::float32) return Kind::F32;
  if (t == mx::float16) return Kind::F16;
  if (t == mx::bfloat16) return Kind::BF16;
  throw std::invalid_argument("paged_attention: pool dtype must be float32, float16 or bfloat16");
}

// ---------------------------------------------------------------------------- operands
// The node is built on its inputs as they come: a `contiguous` node per input cost six graph
// nodes a layer (180 a SmolLM2 decode step), each paid every step, for arrays that are
// nearly always row-contiguous already.  An input that is not (a view) is copied into rows
// here, inside the step's task, where its data is ready.

// A strided array's elements in row-major order, `T` of the element's size (a bit copy).
template <typename T>
void copy_rows(const T* src, T* dst, const mx::Shape& shape, const mx::Strides& strides) {
  const int nd = int(shape.size());
  if (nd == 0) {
    *dst = *src;
    return;
  }
  const int64_t inner = shape[nd - 1], step = strides[nd - 1];
  int64_t outer = 1;
  for (int k = 0; k < nd - 1; ++k) outer *= shape[k];
  std::vector<int64_t> index(std::max(nd - 1, 1), 0);
  for (int64_t o = 0; o < outer; ++o) {
    int64_t at = 0;
    for (int k = 0; k < nd - 1; ++k) at += index[k] * strides[k];
    for (int64_t i = 0; i < inner; ++i) dst[i] = src[at + i * step];
    dst += inner;
    for (int k = nd - 2; k >= 0 && ++index[k] == shape[k]; --k) index[k] = 0;
  }
}

struct RowCopy {
  const void* src;  // data<void>(): the view's offset included
  void* dst;
  size_t itemsize;
  mx::Shape shape;
  mx::Strides strides;

  void run() const {
    switch (itemsize) {
      case 1: copy_rows(static_cast<const uint8_t*>(src), static_cast<uint8_t*>(dst), shape, strides); break;
      case 2: copy_rows(static_cast<const uint16_t*>(src), static_cast<uint16_t*>(dst), shape, strides); break;
      case 4: copy_rows(static_cast<const uint32_t*>(src), static_cast<uint32_t*>(dst), shape, strides); break;
      case 8: copy_rows(static_cast<const uint64_t*>(src), static_cast<uint64_t*>(dst), shape, strides); break;
      default: throw std::runtime_error("paged_attention: unsupported element size");
    }
  }
};

// `a` itself when row-contiguous (read in place); else a buffer of its shape, registered with
// the encoder so it lives until the task has run, and the copy that fills it in the task.
mx::array rows_of(const mx::array& a, mx::cpu::CommandEncoder& enc, std::vector<RowCopy>& copies) {
  if (a.flags().row_contiguous) return a;
  mx::array tmp(a.shape(), a.dtype(), nullptr, {});
  tmp.set_data(mx::allocator::malloc(tmp.nbytes()));
  copies.push_back({a.data<void>(), tmp.data<void>(), a.itemsize(), a.shape(), a.strides()});
  enc.add_temporary(tmp);
  return tmp;
}

// ---------------------------------------------------------------------------- primitive
class PagedAttention : public mx::Primitive {
 public:
  PagedAttention(mx::Stream stream, int kv_heads, int block_size, float scale, int bits, int group_size,
                 int k_parts, int window, int chunk, bool has_sinks, bool merge_heads = false)
      : mx::Primitive(stream), kv_heads_(kv_heads), block_size_(block_size), scale_(scale), bits_(bits),
        group_size_(group_size), k_parts_(k_parts), window_(window), chunk_(chunk), has_sinks_(has_sinks),
        merge_heads_(merge_heads) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    // inputs: q, tables, seqs, groups, k parts (1 or 3), v parts (1 or 3), [sinks]
    // q is (T, Hq, Dk) or (T, Hq, 1, Dk), any strides; the rest are read as rows.
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    std::vector<RowCopy> copies;
    std::vector<mx::array> in = {inputs[0]};
    for (size_t i = 1; i < inputs.size(); ++i) in.push_back(rows_of(inputs[i], enc, copies));

    const auto& q = in[0];
    const int dim_axis = q.ndim() - 1;
    Step st{};
    st.q = q.data<float>();
    st.q_token_stride = q.strides(0);
    st.q_head_stride = q.strides(1);
    st.q_dim_stride = q.strides(dim_axis);
    st.out = out.data<float>();
    st.tables = in[1].data<int32_t>();
    st.seqs = in[2].data<int32_t>();
    st.groups = in[3].data<int32_t>();
    st.width = int(in[1].shape(1));
    st.num_seqs = int(in[2].shape(0));
    st.num_groups = int(in[3].shape(0));
    st.q_heads = int(q.shape(1));
    st.dk = int(q.shape(dim_axis));
    // A merged output (T, 1, Hq * Dv) is laid out as (T, Hq, Dv): the same rows.
    st.dv = merge_heads_ ? int(out.shape(-1)) / st.q_heads : int(out.shape(dim_axis));
    st.kv_heads = kv_heads_;
    st.block_size = block_size_;
    st.scale = scale_;
    st.k = pool_of(in, 4, st.dk);
    st.v = pool_of(in, 4 + k_parts_, st.dv);
    st.window = window_;
    st.chunk = chunk_;
    if (has_sinks_) st.sinks = in.back().data<float>();
    enc.dispatch([st, copies = std::move(copies)]() {
      for (const RowCopy& c : copies) c.run();
      run_step(st);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx paged_attention: this extension runs on the CPU only");
  }

  const char* name() const override {
    return "OmlxPagedAttention";
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const PagedAttention*>(&other);
    return o && o->kv_heads_ == kv_heads_ && o->block_size_ == block_size_ && o->scale_ == scale_ &&
           o->bits_ == bits_ && o->group_size_ == group_size_ && o->k_parts_ == k_parts_ &&
           o->window_ == window_ && o->chunk_ == chunk_ && o->has_sinks_ == has_sinks_ &&
           o->merge_heads_ == merge_heads_;
  }

 private:
  Pool pool_of(const std::vector<mx::array>& inputs, int at, int dim) const {
    Pool p{};
    p.dim = dim;
    if (bits_ == 0) {
      p.kind = kind_of(inputs[at].dtype());
      p.data = inputs[at].data<void>();
    } else {
      p.kind = bits_ == 4 ? Kind::Q4 : Kind::Q8;
      p.data = inputs[at].data<void>();
      p.scales = inputs[at + 1].data<void>();
      p.biases = inputs[at + 2].data<void>();
      p.scale_kind = kind_of(inputs[at + 1].dtype());
      p.row_words = int(inputs[at].shape(1));
      p.group = group_size_;
    }
    return p;
  }

  int kv_heads_, block_size_;
  float scale_;
  int bits_, group_size_, k_parts_;
  int window_, chunk_;
  bool has_sinks_;
  bool merge_heads_;
};

// q (T, Hq, Dk), or (T, Hq, 1, Dk) as an attention layer holds it (the output then has that
// rank too: no reshape node on either side); any strides.  Pools as lists: [rows] for float,
// [packed, scales, biases] for quantized; views are accepted (copied into rows in the task).
// window / chunk: 0 for none; sinks: (Hq,) logits (used as float32; round them to the
// attention's dtype first to match mx.fast.scaled_dot_product_attention).
mx::array paged_attention(const mx::array& q, const std::vector<mx::array>& k_pool,
                          const std::vector<mx::array>& v_pool, const mx::array& tables,
                          const mx::array& seqs, const mx::array& groups, int kv_heads, int block_size,
                          float scale, int bits, int group_size, int window, int chunk,
                          const std::optional<mx::array>& sinks, bool merge_heads, mx::StreamOrDevice s) {
  if (q.ndim() != 3 && !(q.ndim() == 4 && q.shape(2) == 1))
    throw std::invalid_argument("paged_attention: queries must be (tokens, heads, dim) or (tokens, heads, 1, dim)");
  if (k_pool.size() != v_pool.size() || (k_pool.size() != 1 && k_pool.size() != 3))
    throw std::invalid_argument("paged_attention: pools are [rows] or [packed, scales, biases]");
  const bool quantized = k_pool.size() == 3;
  if (quantized != (bits != 0)) throw std::invalid_argument("paged_attention: bits must match the pool form");
  if (quantized && bits != 4 && bits != 8) throw std::invalid_argument("paged_attention: bits must be 4 or 8");
  if (kv_heads <= 0 || q.shape(1) % kv_heads != 0)
    throw std::invalid_argument("paged_attention: query heads must be a multiple of kv heads");
  if (block_size <= 0) throw std::invalid_argument("paged_attention: block_size must be positive");
  if (window < 0 || chunk < 0) throw std::invalid_argument("paged_attention: window and chunk must be >= 0");
  if (sinks && (sinks->ndim() != 1 || sinks->shape(0) != q.shape(1)))
    throw std::invalid_argument("paged_attention: sinks must have shape (query heads,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // astype adds a node only where the dtype differs (its output is row-contiguous).
  std::vector<mx::array> inputs = {
      mx::astype(q, mx::float32, stream),
      mx::astype(tables, mx::int32, stream),
      mx::astype(seqs, mx::int32, stream),
      mx::astype(groups, mx::int32, stream),
  };
  for (auto* pool : {&k_pool, &v_pool})
    for (const auto& part : *pool) {
      if (part.ndim() != 2) throw std::invalid_argument("paged_attention: pool arrays must be 2-D");
      inputs.push_back(part);
    }
  const int dk = int(q.shape(-1));
  int dv;
  if (quantized) {
    dv = int(v_pool[0].shape(1)) * 32 / bits;
    if (int(k_pool[0].shape(1)) * 32 / bits != dk)
      throw std::invalid_argument("paged_attention: key pool width does not match the query dim");
  } else {
    dv = int(v_pool[0].shape(1));
    if (k_pool[0].shape(1) != dk)
      throw std::invalid_argument("paged_attention: key pool width does not match the query dim");
  }
  if (inputs[2].ndim() != 2 || inputs[2].shape(1) != 4 || inputs[3].ndim() != 2 || inputs[3].shape(1) != 4 ||
      inputs[1].ndim() != 2)
    throw std::invalid_argument("paged_attention: tables (S, W), seqs (S, 4), groups (G, 4)");
  if (sinks) inputs.push_back(mx::astype(*sinks, mx::float32, stream));
  mx::Shape shape = q.shape();
  shape.back() = dv;
  // merge_heads: (T, 1, Hq * Dv), the shape the layer's output projection takes (no reshape
  // node after the attention).
  if (merge_heads) shape = {q.shape(0), 1, q.shape(1) * dv};
  return mx::array(shape, mx::float32,
                   std::make_shared<PagedAttention>(stream, kv_heads, block_size, scale, bits, group_size,
                                                    int(k_pool.size()), window, chunk, sinks.has_value(), merge_heads),
                   std::move(inputs));
}

}  // namespace

NB_MODULE(_paged_attention_cpu, m) {
  m.doc() = "omlx fused paged attention (MLX CPU primitive)";
  m.def("paged_attention", &paged_attention, "q"_a, "k_pool"_a, "v_pool"_a, "tables"_a, "seqs"_a, "groups"_a,
        nb::kw_only(), "kv_heads"_a, "block_size"_a, "scale"_a, "bits"_a = 0, "group_size"_a = 64,
        "window"_a = 0, "chunk"_a = 0, "sinks"_a = nb::none(), "merge_heads"_a = false, "stream"_a = nb::none(),
        "Attention of ragged query tokens over a paged KV pool (see omlx/kernels/paged_attention.py).");
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
