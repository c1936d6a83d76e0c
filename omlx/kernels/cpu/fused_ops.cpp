// Per-token elementwise work of a decoder layer as single MLX CPU primitives.
//
// Why: on the CPU `mx.fast.rms_norm` and `mx.fast.rope` have no kernel; MLX builds their
// fallback graphs (RMSNorm ~7 nodes, RoPE ~20) at every call, and a graph node costs a few
// microseconds to build and dispatch whatever its size.  On a 30-layer model at one decode row
// those nodes are most of a step that is not matmuls (bench/step_floor.py).  Here each is one
// node:
//
// - `rms_norm(x, weight, eps)`: y = x / sqrt(mean(x^2) + eps) * weight over the last axis,
//   float32.  Each row is reduced by the same instruction sequence whatever the batch holds
//   (16 float32 lanes, then the lanes in a fixed order), so a row's result does not depend on
//   its neighbours; it is not bit-identical to MLX's fallback (different summation order),
//   which is why omlx uses it only where the weights are packed bf16 (the path whose contract
//   is batch invariance, not equality with mlx-lm's float32).
// - `rope_rotate(x, table, dims, traditional)`: the rotation of RoPE given the cos / sin table
//   MLX's own fallback computed for the pass (omlx/models/shared_rope.py).  Each element is
//   x1 * cos - x2 * sin (or x1 * sin + x2 * cos), each product and the sum rounded on its own
//   as the fallback's separate multiply / subtract / add nodes do: contraction into fused
//   multiply-adds is turned off for it, so it is bit-identical to `mx.fast.rope` on the CPU.

#include <cmath>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <optional>
#include <limits>
#include <stdexcept>
#include <string>

#include <nanobind/stl/vector.h>

#include "common.h"

namespace {

// ------------------------------------------------------------------------------ rms_norm

constexpr int LANES = 16;

// A strided array's elements in row-major order (any rank; broadcast axes have stride 0).
std::vector<float> gather(const float* src, const std::vector<int64_t>& shape, const std::vector<int64_t>& strides) {
  int64_t total = 1;
  for (auto n : shape) total *= n;
  std::vector<float> out(static_cast<size_t>(total));
  const int nd = int(shape.size());
  std::vector<int64_t> index(nd, 0);
  for (int64_t i = 0; i < total; ++i) {
    int64_t at = 0;
    for (int k = 0; k < nd; ++k) at += index[k] * strides[k];
    out[i] = src[at];
    for (int k = nd - 1; k >= 0 && ++index[k] == shape[k]; --k) index[k] = 0;
  }
  return out;
}

// An operand as a task reads it: a row-contiguous array in place, a strided one (a view)
// gathered into rows inside the task (its layout captured at eval, no copy node).
struct RowsOf {
  const float* src;
  std::vector<int64_t> shape, strides;  // empty: row-contiguous

  explicit RowsOf(const mx::array& a) : src(a.data<float>()) {
    if (!a.flags().row_contiguous) {
      shape.assign(a.shape().begin(), a.shape().end());
      strides.assign(a.strides().begin(), a.strides().end());
    }
  }

  // The rows, in `keep` when they had to be gathered.
  const float* read(std::vector<float>& keep) const {
    if (shape.empty()) return src;
    keep = gather(src, shape, strides);
    return keep.data();
  }
};

void rms_rows(const float* x, const float* w, float* y, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    float lanes[LANES] = {};
    int64_t i = 0;
    for (; i + LANES <= d; i += LANES)
      for (int l = 0; l < LANES; ++l) lanes[l] += xr[i + l] * xr[i + l];
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += lanes[l];
    for (; i < d; ++i) sum += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(sum / float(d) + eps);
    float* yr = y + r * d;
    for (int64_t j = 0; j < d; ++j) yr[j] = (xr[j] * scale) * w[j];
  }
}

class RMSNorm : public mx::Primitive {
 public:
  RMSNorm(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& xa = inputs[0];
    const float* w = inputs[1].data<float>();
    float* y = out.data<float>();
    const int64_t d = xa.shape(-1);
    const int64_t rows = d ? int64_t(xa.size()) / d : 0;
    const float eps = eps_;
    if (rows == 0) return;
    const RowsOf x_rows(xa);  // a strided x (a view) is gathered inside the task, not by a copy node
    enc.dispatch([=]() {
      std::vector<float> gathered;
      const float* x = x_rows.read(gathered);
      // Rows are independent: split them across threads only when there are enough to pay
      // for waking the pool.
      const bool parallel = rows * d >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t r = 0; r < rows; ++r) rms_rows(x + r * d, w, y + r * d, 1, d, eps);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx rms_norm: this extension runs on the CPU only");
  }

  const char* name() const override { return "OmlxRMSNorm"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RMSNorm*>(&other);
    return o && o->eps_ == eps_;
  }

 private:
  float eps_;
};

mx::array rms_norm(const mx::array& x, const mx::array& weight, float eps, mx::StreamOrDevice s) {
  if (x.ndim() < 1 || x.dtype() != mx::float32)
    throw std::invalid_argument("omlx rms_norm: x must be float32 with a feature axis");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1) || weight.dtype() != mx::float32)
    throw std::invalid_argument("omlx rms_norm: weight must be float32 of shape (features,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // x is read as it comes (strided views gathered inside the task); the weight is an
  // evaluated parameter, passed as it is.
  return mx::array(x.shape(), mx::float32, std::make_shared<RMSNorm>(stream, eps),
                   {x, omlx_cpu::as_rows(weight, stream)});
}

// ----------------------------------------------------------------------------- add_rms_norm

// A decoder layer's residual add and the RMSNorm that reads its sum (the next sublayer's, or
// the next layer's, or the model's final norm): h = x + r, y = rms_norm(h) * w, both outputs of
// one node (omlx/models/fused_residual.py).  The sum is one float add per element and the norm
// runs rms_rows, so both are bit-identical to the Add node and OmlxRMSNorm they replace.
class AddRMSNorm : public mx::Primitive {
 public:
  AddRMSNorm(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& sum = outputs[0];
    auto& normed = outputs[1];
    sum.set_data(mx::allocator::malloc(sum.nbytes()));
    normed.set_data(mx::allocator::malloc(normed.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    enc.set_output_array(sum);
    enc.set_output_array(normed);
    const int64_t d = sum.shape(-1);
    const int64_t rows = d ? int64_t(sum.size()) / d : 0;
    if (rows == 0) return;
    const float eps = eps_;
    const RowsOf x_rows(inputs[0]), r_rows(inputs[1]);  // views gathered inside the task, as rms_norm's
    enc.dispatch([=, w = inputs[2].data<float>(), h = sum.data<float>(), y = normed.data<float>()]() {
      std::vector<float> x_kept, r_kept;
      const float* x = x_rows.read(x_kept);
      const float* r = r_rows.read(r_kept);
      const bool parallel = rows * d >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t row = 0; row < rows; ++row) {
        const float* xr = x + row * d;
        const float* rr = r + row * d;
        float* hr = h + row * d;
        for (int64_t i = 0; i < d; ++i) hr[i] = xr[i] + rr[i];
        rms_rows(hr, w, y + row * d, 1, d, eps);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx add_rms_norm: this extension runs on the CPU only");
  }

  const char* name() const override { return "OmlxAddRMSNorm"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {inputs[0].shape(), inputs[0].shape()};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const AddRMSNorm*>(&other);
    return o && o->eps_ == eps_;
  }

 private:
  float eps_;
};

// (x + r, rms_norm(x + r) * weight) for float32 x and r of one shape (views read through their
// strides) and weight (features,).
std::vector<mx::array> add_rms_norm(const mx::array& x, const mx::array& r, const mx::array& weight, float eps,
                                    mx::StreamOrDevice s) {
  if (x.ndim() < 1 || x.dtype() != mx::float32 || r.dtype() != mx::float32 || r.shape() != x.shape())
    throw std::invalid_argument("omlx add_rms_norm: x and r must be float32 arrays of one shape");
  if (weight.ndim() != 1 || weight.shape(0) != x.shape(-1) || weight.dtype() != mx::float32)
    throw std::invalid_argument("omlx add_rms_norm: weight must be float32 of shape (features,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  return mx::array::make_arrays({x.shape(), x.shape()}, {mx::float32, mx::float32},
                                std::make_shared<AddRMSNorm>(stream, eps), {x, r, omlx_cpu::as_rows(weight, stream)});
}

// ----------------------------------------------------------------------------- rope_rotate

struct Rotation {
  const float* x;
  const float* table;  // (rows, T, dims): cos then sin halves, or interleaved (traditional)
  float* y;            // (B, N, T, D) row-contiguous
  int64_t b, n, t, d, dims;
  int64_t sb, sn, st, sd;  // x's strides
  int64_t tr, tt, tc;      // the table's strides (row, position, column)
  bool traditional;
};

constexpr int64_t MAX_HALF = 512;  // rotated dims up to 1024 (real models: <= 256)

// Separate roundings, as MLX's fallback nodes: the four products are stored, then a compiler
// barrier, then the differences / sums, so nothing can fuse a product into an add (an
// attribute turning fp-contract off did not stop the vectorizer from emitting vfmaddsub).
void rotate_row(const Rotation& p, int64_t bi, int64_t ni, int64_t ti) {
  const float* xr = p.x + bi * p.sb + ni * p.sn + ti * p.st;
  const float* tab = p.table + bi * p.tr + ti * p.tt;
  float* yr = p.y + ((bi * p.n + ni) * p.t + ti) * p.d;
  const int64_t half = p.dims / 2, sd = p.sd, tc = p.tc;
  // x1 / x2 and cos / sin index steps: pairs (traditional) or halves.
  const int64_t step = p.traditional ? 2 : 1, second = p.traditional ? 1 : half;
  float a[MAX_HALF], b[MAX_HALF], e[MAX_HALF], f[MAX_HALF];
  for (int64_t i = 0; i < half; ++i) {
    const float c = tab[(step * i) * tc], s = tab[(step * i + second) * tc];
    const float x1 = xr[(step * i) * sd], x2 = xr[(step * i + second) * sd];
    a[i] = x1 * c, b[i] = x2 * s, e[i] = x1 * s, f[i] = x2 * c;
  }
  asm volatile("" ::: "memory");
  for (int64_t i = 0; i < half; ++i) {
    yr[step * i] = a[i] - b[i];
    yr[step * i + second] = e[i] + f[i];
  }
  for (int64_t i = p.dims; i < p.d; ++i) yr[i] = xr[i * sd];
}

class RopeRotate : public mx::Primitive {
 public:
  RopeRotate(mx::Stream stream, int dims, bool traditional)
      : mx::Primitive(stream), dims_(dims), traditional_(traditional) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& x = inputs[0];
    const auto& table = inputs[1];
    Rotation p{};
    p.x = x.data<float>();
    p.table = table.data<float>();
    p.y = out.data<float>();
    p.b = x.shape(0), p.n = x.shape(1), p.t = x.shape(2), p.d = x.shape(3);
    p.sb = x.strides(0), p.sn = x.strides(1), p.st = x.strides(2), p.sd = x.strides(3);
    p.dims = dims_;
    // One table row for every batch row (one offset for the pass): read it with stride 0.
    p.tr = table.shape(0) > 1 ? table.strides(0) : 0, p.tt = table.strides(1), p.tc = table.strides(2);
    p.traditional = traditional_;
    if (x.size() == 0) return;
    enc.dispatch([p]() {
      const int64_t rows = p.b * p.n * p.t;
      const bool parallel = rows * p.d >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t r = 0; r < rows; ++r) rotate_row(p, r / (p.n * p.t), (r / p.t) % p.n, r % p.t);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx rope_rotate: this extension runs on the CPU only");
  }

  const char* name() const override { return "OmlxRopeRotate"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override { return {inputs[0].shape()}; }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RopeRotate*>(&other);
    return o && o->dims_ == dims_ && o->traditional_ == traditional_;
  }

 private:
  int dims_;
  bool traditional_;
};

// x (B, N, T, D) float32, any strides; table (1 or B, T, dims) float32: each position's
// cos / sin (halves, or interleaved pairs when traditional), as shared_rope.py builds it.
mx::array rope_rotate(const mx::array& x, const mx::array& table, int dims, bool traditional, mx::StreamOrDevice s) {
  if (x.ndim() != 4 || x.dtype() != mx::float32)
    throw std::invalid_argument("omlx rope_rotate: x must be float32 (B, N, T, D)");
  if (dims <= 0 || dims % 2 || dims > x.shape(3) || dims / 2 > MAX_HALF)
    throw std::invalid_argument("omlx rope_rotate: dims must be even, at most D and at most 1024");
  if (table.ndim() != 3 || table.dtype() != mx::float32 || table.shape(1) != x.shape(2) ||
      table.shape(2) != dims || (table.shape(0) != 1 && table.shape(0) != x.shape(0)))
    throw std::invalid_argument("omlx rope_rotate: table must be float32 (1 or B, T, dims)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  // x and the table are read through their strides (q / k arrive as transposed views, the
  // table as slices): no copy node for either.
  return mx::array(x.shape(), mx::float32, std::make_shared<RopeRotate>(stream, dims, traditional), {x, table});
}

// ------------------------------------------------------------------------------ rope_split

// The step between a llama-style attention's fused q/k/v projection and the paged pool:
// q and k rotated (the same `rotate_row` as rope_rotate, so bit-identical to it), k and v
// rounded to the pool's dtype as MLX's astype does (float32 -> bfloat16: round to nearest
// even, NaN to 0x7FC0), laid out as the pool's rows.  One node instead of the ~20 (slices,
// reshapes, transposes, two rotations, two casts) mlx-lm's attention and the paged cache's
// write build per layer.
struct Split {
  const float* qkv;
  const float* table;
  float* q;     // (T, Hq, D) float32
  void* k;      // (T * Hkv, D) pool dtype
  void* v;      // (T * Hkv, D) pool dtype
  int64_t t, hq, hkv, d, dims;
  int64_t row;  // qkv's stride between tokens (its columns are contiguous)
  int64_t tr, tt, tc;
  bool traditional;
  int kind;  // 0: float32, 1: bfloat16, 2: float16
  const int32_t* rows;  // store mode: each (token, kv head)'s pool row (nullptr: k, v dense)
  int64_t pool_rows;
  const float* q_norm;  // qwen3's per-head RMSNorm of q and k before RoPE (nullptr: none)
  const float* k_norm;
  float q_eps, k_eps;
};

inline uint16_t to_bf16(float x) {
  if (std::isnan(x)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += ((u >> 16) & 1) + 0x7FFFu;
  return uint16_t(u >> 16);
}

void store_row(const Split& p, const float* src, void* dst, int64_t at) {
  if (p.rows != nullptr) {
    at = p.rows[at];
    if (at < 0 || at >= p.pool_rows) return;  // never from write_indices; never out of the pool
  }
  if (p.kind == 0) {
    std::memcpy(static_cast<float*>(dst) + at * p.d, src, sizeof(float) * p.d);
  } else if (p.kind == 1) {
    uint16_t* out = static_cast<uint16_t*>(dst) + at * p.d;
    for (int64_t i = 0; i < p.d; ++i) out[i] = to_bf16(src[i]);
  } else {
    mx::float16_t* out = static_cast<mx::float16_t*>(dst) + at * p.d;
    for (int64_t i = 0; i < p.d; ++i) out[i] = mx::float16_t(src[i]);
  }
}

// One (token, head) of q, k or v, through `rotate_row` with this token's row of qkv and of
// the table as its whole input (b = n = t = 1), so its output row is the destination row.
void split_head(const Split& p, int64_t token, int64_t head) {
  const float* x = p.qkv + token * p.row;
  if (head >= p.hq + p.hkv) {  // a value head: rounded into the pool's dtype as it is
    const int64_t h = head - p.hq - p.hkv;
    store_row(p, x + (p.hq + p.hkv + h) * p.d, p.v, token * p.hkv + h);
    return;
  }
  Rotation r{};
  r.x = x + head * p.d;
  // The head's RMSNorm first where the layer has one: `rms_rows`, the rms_norm node's own
  // row function, so the normed head is the bits that node gives.
  float normed[1024];
  const bool query = head < p.hq;
  const float* norm = query ? p.q_norm : p.k_norm;
  if (norm != nullptr) {
    rms_rows(r.x, norm, normed, 1, p.d, query ? p.q_eps : p.k_eps);
    r.x = normed;
  }
  r.table = p.table + token * p.tr;
  r.b = r.n = r.t = 1, r.d = p.d, r.dims = p.dims;
  r.sd = 1, r.tc = p.tc;
  r.traditional = p.traditional;
  if (query) {  // a query head: rotated into q
    r.y = p.q + (token * p.hq + head) * p.d;
    rotate_row(r, 0, 0, 0);
    return;
  }
  float rotated[1024];  // a key head: rotated, then rounded into the pool's dtype
  r.y = rotated;
  rotate_row(r, 0, 0, 0);
  store_row(p, rotated, p.k, token * p.hkv + head - p.hq);
}

class RopeSplit : public mx::Primitive {
 public:
  RopeSplit(mx::Stream stream, int hq, int hkv, int d, int dims, bool traditional, bool q_norm, bool k_norm,
            float q_eps, float k_eps)
      : mx::Primitive(stream), hq_(hq), hkv_(hkv), d_(d), dims_(dims), traditional_(traditional),
        q_norm_(q_norm), k_norm_(k_norm), q_eps_(q_eps), k_eps_(k_eps) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    for (auto& o : outputs) {
      o.set_data(mx::allocator::malloc(o.nbytes()));
      enc.set_output_array(o);
    }
    const auto& qkv = inputs[0];
    const auto& table = inputs[1];
    Split p{};
    // A qkv whose columns are strided (not a packed projection's output) is gathered into
    // rows first, inside the task, rather than by a copy node.
    std::shared_ptr<std::vector<float>> rows;
    if (qkv.strides(2) != 1 && qkv.size() > 0) {
      rows = std::make_shared<std::vector<float>>(gather(qkv.data<float>(), {qkv.shape(0), qkv.shape(1), qkv.shape(2)},
                                                         {qkv.strides(0), qkv.strides(1), qkv.strides(2)}));
    }
    p.qkv = rows ? rows->data() : qkv.data<float>();
    p.table = table.data<float>();
    p.q = outputs[0].data<float>();
    p.k = outputs[1].data<void>();
    p.v = outputs[2].data<void>();
    p.t = qkv.shape(0), p.hq = hq_, p.hkv = hkv_, p.d = d_, p.dims = dims_;
    p.row = rows ? qkv.shape(2) : qkv.strides(0);
    p.tr = table.shape(0) > 1 ? table.strides(0) : 0, p.tt = table.strides(1), p.tc = table.strides(2);
    p.traditional = traditional_;
    const auto dt = outputs[1].dtype();
    p.kind = dt == mx::float32 ? 0 : dt == mx::bfloat16 ? 1 : 2;
    size_t next = 2;
    p.q_norm = q_norm_ ? inputs[next++].data<float>() : nullptr;
    p.k_norm = k_norm_ ? inputs[next++].data<float>() : nullptr;
    p.q_eps = q_eps_, p.k_eps = k_eps_;
    if (p.t == 0) return;
    enc.dispatch([p, rows]() {
      const int64_t heads = p.hq + 2 * p.hkv, total = p.t * heads;
      const bool parallel = total * p.d >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < total; ++i) split_head(p, i / heads, i % heads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx rope_split: this extension runs on the CPU only");
  }

  const char* name() const override { return "OmlxRopeSplit"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    const int t = inputs[0].shape(0);
    return {{t, hq_, d_}, {t * hkv_, d_}, {t * hkv_, d_}};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RopeSplit*>(&other);
    return o && o->hq_ == hq_ && o->hkv_ == hkv_ && o->d_ == d_ && o->dims_ == dims_ &&
           o->traditional_ == traditional_ && o->q_norm_ == q_norm_ && o->k_norm_ == k_norm_ &&
           o->q_eps_ == q_eps_ && o->k_eps_ == k_eps_;
  }

 private:
  int hq_, hkv_, d_, dims_;
  bool traditional_, q_norm_, k_norm_;
  float q_eps_, k_eps_;
};

// qkv (T, 1, (hq + 2 hkv) * d) float32, its last axis contiguous (a packed projection's
// output); table (1 or T, 1, dims) float32 as shared_rope.py builds it for one-token rows.
// Returns q (T, hq, d) float32 rotated, and k, v (T * hkv, d) in kv_dtype, k rotated: rows
// ordered (token, head), as the paged pool's write indices are.
std::vector<mx::array> rope_split(const mx::array& qkv, const mx::array& table, int q_heads, int kv_heads,
                                  int head_dim, int dims, bool traditional, mx::Dtype kv_dtype,
                                  const std::optional<mx::array>& q_norm, const std::optional<mx::array>& k_norm,
                                  float q_eps, float k_eps, mx::StreamOrDevice s) {
  if (qkv.ndim() != 3 || qkv.shape(1) != 1 || qkv.dtype() != mx::float32 ||
      qkv.shape(2) != int64_t(q_heads + 2 * kv_heads) * head_dim)
    throw std::invalid_argument("omlx rope_split: qkv must be float32 (T, 1, (q_heads + 2 kv_heads) * head_dim)");
  if (q_heads <= 0 || kv_heads <= 0 || head_dim <= 0 || head_dim > 1024)
    throw std::invalid_argument("omlx rope_split: heads and head_dim must be positive, head_dim <= 1024");
  if (dims <= 0 || dims % 2 || dims > head_dim || dims / 2 > MAX_HALF)
    throw std::invalid_argument("omlx rope_split: dims must be even and at most head_dim");
  if (table.ndim() != 3 || table.dtype() != mx::float32 || table.shape(1) != 1 || table.shape(2) != dims ||
      (table.shape(0) != 1 && table.shape(0) != qkv.shape(0)))
    throw std::invalid_argument("omlx rope_split: table must be float32 (1 or T, 1, dims)");
  if (kv_dtype != mx::float32 && kv_dtype != mx::bfloat16 && kv_dtype != mx::float16)
    throw std::invalid_argument("omlx rope_split: kv_dtype must be float32, bfloat16 or float16");
  for (const auto* norm : {&q_norm, &k_norm})
    if (norm->has_value() && ((*norm)->ndim() != 1 || (*norm)->shape(0) != head_dim || (*norm)->dtype() != mx::float32))
      throw std::invalid_argument("omlx rope_split: q_norm / k_norm must be float32 of shape (head_dim,)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  const int t = qkv.shape(0);
  std::vector<mx::array> inputs{qkv, table};
  if (q_norm) inputs.push_back(omlx_cpu::as_rows(*q_norm, stream));
  if (k_norm) inputs.push_back(omlx_cpu::as_rows(*k_norm, stream));
  return mx::array::make_arrays(
      {{t, q_heads, head_dim}, {t * kv_heads, head_dim}, {t * kv_heads, head_dim}},
      {mx::float32, kv_dtype, kv_dtype},
      std::make_shared<RopeSplit>(stream, q_heads, kv_heads, head_dim, dims, traditional, q_norm.has_value(),
                                  k_norm.has_value(), q_eps, k_eps),
      inputs);
}

// One part of rope_split as a single-output node: q (rotated), or the key pool with this
// step's rotated keys written at their rows, or the value pool with its values written.  A
// pool part's output is the pool: it takes the old pool's buffer where nothing else holds it
// (as MLX's scatter donates its input), else copies the pool first.  Single outputs matter:
// MLX gives every output of a multi-output node its own copy of the inputs, so a pool that is
// the input of such a node is never donatable and would be copied whole every layer and step.
class RopePart : public mx::Primitive {
 public:
  enum Part { Q = 0, K = 1, V = 2 };

  RopePart(mx::Stream stream, Part part, int hq, int hkv, int d, int dims, bool traditional, bool norm, float eps)
      : mx::Primitive(stream), part_(part), hq_(hq), hkv_(hkv), d_(d), dims_(dims), traditional_(traditional),
        norm_(norm), eps_(eps) {}

  // Inputs: qkv, table, then for K / V the pool and the rows, then the head norm's weight.
  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : inputs) enc.set_input_array(a);
    const void* copy_from = nullptr;
    if (part_ == Q) {
      out.set_data(mx::allocator::malloc(out.nbytes()));
    } else {
      const auto& pool = inputs[2];
      if (!pool.flags().row_contiguous) throw std::runtime_error("omlx rope_store: a KV pool must be row-contiguous");
      if (pool.is_donatable()) {
        out.copy_shared_buffer(pool);
      } else {
        out.set_data(mx::allocator::malloc(out.nbytes()));
        copy_from = pool.data<void>();
      }
    }
    enc.set_output_array(out);
    const auto& qkv = inputs[0];
    const auto& table = inputs[1];
    std::shared_ptr<std::vector<float>> rows_copy;
    if (qkv.strides(2) != 1 && qkv.size() > 0)
      rows_copy = std::make_shared<std::vector<float>>(gather(qkv.data<float>(), {qkv.shape(0), qkv.shape(1), qkv.shape(2)},
                                                              {qkv.strides(0), qkv.strides(1), qkv.strides(2)}));
    Split p{};
    p.qkv = rows_copy ? rows_copy->data() : qkv.data<float>();
    p.table = table.data<float>();
    p.t = qkv.shape(0), p.hq = hq_, p.hkv = hkv_, p.d = d_, p.dims = dims_;
    p.row = rows_copy ? qkv.shape(2) : qkv.strides(0);
    p.tr = table.shape(0) > 1 ? table.strides(0) : 0, p.tt = table.strides(1), p.tc = table.strides(2);
    p.traditional = traditional_;
    size_t next = 2;
    if (part_ == Q) {
      p.q = out.data<float>();
    } else {
      const auto dt = out.dtype();
      p.kind = dt == mx::float32 ? 0 : dt == mx::bfloat16 ? 1 : 2;
      p.pool_rows = inputs[2].shape(0);
      (part_ == K ? p.k : p.v) = out.data<void>();
      p.rows = inputs[3].data<int32_t>();
      next = 4;
    }
    if (norm_) (part_ == Q ? p.q_norm : p.k_norm) = inputs[next].data<float>();
    p.q_eps = p.k_eps = eps_;
    const int64_t first = part_ == Q ? 0 : part_ == K ? hq_ : hq_ + hkv_;
    const int64_t heads = part_ == Q ? hq_ : hkv_;
    const size_t pool_bytes = part_ == Q ? 0 : inputs[2].nbytes();
    void* dst = out.data<void>();
    enc.dispatch([p, rows_copy, first, heads, copy_from, dst, pool_bytes]() {
      if (copy_from != nullptr) std::memcpy(dst, copy_from, pool_bytes);  // an undonatable pool
      const int64_t total = p.t * heads;
      const bool parallel = total * p.d >= (int64_t(1) << 16);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t i = 0; i < total; ++i) split_head(p, i / heads, first + i % heads);
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx rope_store: this extension runs on the CPU only");
  }

  const char* name() const override { return part_ == Q ? "OmlxRopeQ" : part_ == K ? "OmlxRopeStoreK" : "OmlxStoreV"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    if (part_ == Q) return {{inputs[0].shape(0), hq_, d_}};
    return {inputs[2].shape()};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const RopePart*>(&other);
    return o && o->part_ == part_ && o->hq_ == hq_ && o->hkv_ == hkv_ && o->d_ == d_ && o->dims_ == dims_ &&
           o->traditional_ == traditional_ && o->norm_ == norm_ && o->eps_ == eps_;
  }

 private:
  Part part_;
  int hq_, hkv_, d_, dims_;
  bool traditional_, norm_;
  float eps_;
};

// rope_split with k and v written straight into the layer's KV pools at `rows` (int32,
// (T * kv_heads,): the pool row of each (token, kv head), as write_indices orders them)
// instead of returned: three single-output nodes where the split, two reshapes and two
// scatters were.  Like `pool[rows] = k` in Python, the pools are updated in place: each pool
// argument's array becomes the new pool (its node's output), which reuses the old buffer when
// nothing else holds it.  Returns q.
mx::array rope_store(const mx::array& qkv, const mx::array& table, const mx::array& rows, mx::array& pool_k,
                     mx::array& pool_v, int q_heads, int kv_heads, int head_dim, int dims, bool traditional,
                     const std::optional<mx::array>& q_norm, const std::optional<mx::array>& k_norm, float q_eps,
                     float k_eps, mx::StreamOrDevice s) {
  if (pool_k.ndim() != 2 || pool_v.ndim() != 2 || pool_k.shape(1) != head_dim || pool_v.shape(1) != head_dim ||
      pool_k.dtype() != pool_v.dtype() || pool_k.shape(0) != pool_v.shape(0))
    throw std::invalid_argument("omlx rope_store: pools must be (rows, head_dim) of one dtype and size");
  if (rows.ndim() != 1 || rows.dtype() != mx::int32 || rows.shape(0) != int64_t(qkv.ndim() ? qkv.shape(0) : 0) * kv_heads)
    throw std::invalid_argument("omlx rope_store: rows must be int32 (T * kv_heads,)");
  // rope_split's checks of everything else (it builds a node that is never evaluated).
  rope_split(qkv, table, q_heads, kv_heads, head_dim, dims, traditional, pool_k.dtype(), q_norm, k_norm, q_eps, k_eps, s);
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  const auto row_array = omlx_cpu::as_rows(rows, stream);
  auto part = [&](RopePart::Part which, std::vector<mx::array> inputs, const std::optional<mx::array>& norm, float eps,
                  mx::Shape shape, mx::Dtype dtype) {
    if (norm) inputs.push_back(omlx_cpu::as_rows(*norm, stream));
    return mx::array(std::move(shape), dtype,
                     std::make_shared<RopePart>(stream, which, q_heads, kv_heads, head_dim, dims, traditional,
                                                norm.has_value(), eps),
                     std::move(inputs));
  };
  const std::optional<mx::array> none;
  auto q = part(RopePart::Q, {qkv, table}, q_norm, q_eps, {qkv.shape(0), q_heads, head_dim}, mx::float32);
  auto k = part(RopePart::K, {qkv, table, pool_k, row_array}, k_norm, k_eps, pool_k.shape(), pool_k.dtype());
  auto v = part(RopePart::V, {qkv, table, pool_v, row_array}, none, 0.0f, pool_v.shape(), pool_v.dtype());
  pool_k.overwrite_descriptor(k);
  pool_v.overwrite_descriptor(v);
  return q;
}

// ----------------------------------------------------------------------------- swiglu_split

// mlx-lm's SwiGLU MLP computes silu(gate) * up from two slices of the fused gate/up
// projection: two slice nodes and MLX's compiled kernel.  `swiglu_split` takes the fused
// output itself and computes the compiled kernel's exact sequence per element:
// sigmoid(g) (MLX's: 1 / (1 + exp(|g|)), then 1 - y for g >= 0, its Cephes exp with explicit
// fused multiply-adds), g * sigmoid(g), then that times u.  MLX compiles that kernel without
// -march (no FMA unit: nothing is contracted); this file is built with FMA and
// -ffp-contract=fast, so every product that an add follows passes a register barrier, which
// keeps it rounded on its own.
template <typename T>
inline T keep(T v) {
  asm volatile("" : "+x"(v));
  return v;
}

inline float mlx_exp(float x_init) {
  float x = keep(x_init * 1.442695f);
  const float ipart = std::floor(x + 0.5f);
  const float fpart = x - ipart;
  x = 1.535336188319500e-4f;
  x = std::fma(x, fpart, 1.339887440266574e-3f);
  x = std::fma(x, fpart, 9.618437357674640e-3f);
  x = std::fma(x, fpart, 5.550332471162809e-2f);
  x = std::fma(x, fpart, 2.402264791363012e-1f);
  x = std::fma(x, fpart, 6.931472028550421e-1f);
  x = std::fma(x, fpart, 1.000000000000000f);
  const int32_t epart = (static_cast<int32_t>(ipart) + 127) << 23;
  float scale;
  std::memcpy(&scale, &epart, 4);
  float result = std::isnan(x_init) ? x_init : keep(scale * x);
  if (x_init > 88.0f) result = std::numeric_limits<float>::infinity();
  if (x_init < -88.0f) result = 0.0f;
  return result;
}

inline float mlx_sigmoid(float x) {
  const float y = 1.0f / (1.0f + mlx_exp(std::fabs(x)));
  return x < 0.0f ? y : 1.0f - y;
}

inline float swiglu_one(float g, float u) {
  const float silu = keep(g * mlx_sigmoid(g));
  return silu * u;
}

#if defined(__AVX512F__)
inline __m512 keep512(__m512 v) {
  asm volatile("" : "+v"(v));
  return v;
}

// swiglu_one on 16 lanes: every lane runs the scalar sequence's IEEE operations in its order
// (products kept rounded by the same barriers, floor by roundscale, the float -> int
// conversion truncating, the NaN / +-88 overrides, a correctly rounded division), so the bits
// are the scalar path's; the scalar one took ~3-7 ns an element, a prefill's 30 layers x 512
// rows x 1536 columns ~0.1-0.2 s a chunk.
inline __m512 swiglu16(__m512 g, __m512 u) {
  const __m512 a = _mm512_abs_ps(g);
  const __m512 x = keep512(_mm512_mul_ps(a, _mm512_set1_ps(1.442695f)));
  const __m512 ipart = _mm512_roundscale_ps(_mm512_add_ps(x, _mm512_set1_ps(0.5f)), _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  const __m512 fpart = _mm512_sub_ps(x, ipart);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(6.931472028550421e-1f));
  p = _mm512_fmadd_ps(p, fpart, _mm512_set1_ps(1.000000000000000f));
  const __m512i epart = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(ipart), _mm512_set1_epi32(127)), 23);
  __m512 e = keep512(_mm512_mul_ps(_mm512_castsi512_ps(epart), p));
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), a);
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, _mm512_set1_ps(88.0f), _CMP_GT_OQ),
                         _mm512_set1_ps(std::numeric_limits<float>::infinity()));
  e = _mm512_mask_mov_ps(e, _mm512_cmp_ps_mask(a, _mm512_set1_ps(-88.0f), _CMP_LT_OQ), _mm512_setzero_ps());
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 y = _mm512_div_ps(one, _mm512_add_ps(one, e));
  const __m512 sigmoid = _mm512_mask_mov_ps(_mm512_sub_ps(one, y), _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ), y);
  const __m512 silu = keep512(_mm512_mul_ps(g, sigmoid));
  return _mm512_mul_ps(silu, u);
}
#endif

// One row: y[i] = silu(g[i]) * u[i].
inline void swiglu_row(const float* g, const float* u, float* y, int64_t width) {
  int64_t i = 0;
#if defined(__AVX512F__)
  for (; i + 16 <= width; i += 16)
    _mm512_storeu_ps(y + i, swiglu16(_mm512_loadu_ps(g + i), _mm512_loadu_ps(u + i)));
#endif
  for (; i < width; ++i) y[i] = swiglu_one(g[i], u[i]);
}

class SwigluSplit : public mx::Primitive {
 public:
  explicit SwigluSplit(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& gu = inputs[0];
    const int64_t width = out.shape(-1), rows = width ? int64_t(out.size()) / width : 0;
    if (rows == 0) return;
    // Rows of the fused output: contiguous, or a uniform stride between rows of contiguous
    // columns (one-token rows of a ragged pass); anything else is gathered inside the task.
    std::shared_ptr<std::vector<float>> copy;
    const int nd = gu.ndim();
    int64_t stride = 2 * width;
    if (!gu.flags().row_contiguous) {
      if (gu.strides(nd - 1) == 1 && (nd == 2 || (nd == 3 && gu.shape(1) == 1))) {
        stride = gu.strides(0);
      } else {
        std::vector<int64_t> shape(gu.shape().begin(), gu.shape().end()), strides(gu.strides().begin(), gu.strides().end());
        copy = std::make_shared<std::vector<float>>(gather(gu.data<float>(), shape, strides));
      }
    }
    const float* src = copy ? copy->data() : gu.data<float>();
    float* y = out.data<float>();
    enc.dispatch([=]() {
      const bool parallel = rows * width >= (int64_t(1) << 15);
#pragma omp parallel for schedule(static) if (parallel)
      for (int64_t r = 0; r < rows; ++r) {
        const float* g = src + r * stride;
        const float* u = g + width;
        float* yr = y + r * width;
        swiglu_row(g, u, yr, width);
      }
      (void)copy;
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx swiglu_split: this extension runs on the CPU only");
  }

  const char* name() const override { return "OmlxSwigluSplit"; }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    auto shape = inputs[0].shape();
    shape.back() /= 2;
    return {shape};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    return dynamic_cast<const SwigluSplit*>(&other) != nullptr;
  }
};

// gate_up (..., 2 I) float32: the fused gate / up projection, gate columns first.  Returns
// silu(gate) * up (..., I), bit-identical to mlx-lm's compiled swiglu on the two halves.
mx::array swiglu_split(const mx::array& gate_up, mx::StreamOrDevice s) {
  if (gate_up.ndim() < 1 || gate_up.ndim() > 3 || gate_up.dtype() != mx::float32 || gate_up.shape(-1) % 2)
    throw std::invalid_argument("omlx swiglu_split: gate_up must be float32 (..., 2 I), at most 3 axes");
  auto shape = gate_up.shape();
  shape.back() /= 2;
  return mx::array(shape, mx::float32, std::make_shared<SwigluSplit>(mx::to_stream(s, mx::Device::cpu)), {gate_up});
}

}  // namespace

NB_MODULE(_fused_ops_cpu, m) {
  m.doc() = "omlx per-token elementwise primitives (MLX CPU): rms_norm, rope_rotate";
  m.def("add_rms_norm", &add_rms_norm, "x"_a, "r"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "(x + r, rms_norm(x + r) * weight): a residual add and the norm that reads it, in one node.");
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x / sqrt(mean(x^2, -1) + eps) * weight, one node, rows batch-invariant.");
  m.def("rope_rotate", &rope_rotate, "x"_a, "table"_a, "dims"_a, "traditional"_a, nb::kw_only(),
        "stream"_a = nb::none(), "RoPE's rotation of x by a precomputed cos / sin table (bit-identical to mx.fast.rope on CPU).");
  m.def("rope_split", &rope_split, "qkv"_a, "table"_a, "q_heads"_a, "kv_heads"_a, "head_dim"_a, "dims"_a,
        "traditional"_a, "kv_dtype"_a, nb::kw_only(), "q_norm"_a = nb::none(), "k_norm"_a = nb::none(),
        "q_eps"_a = 0.0f, "k_eps"_a = 0.0f, "stream"_a = nb::none(),
        "A fused q/k/v projection's q and k rotated (as rope_rotate) and k, v in the pool's dtype and row order.");
  m.def("rope_store", &rope_store, "qkv"_a, "table"_a, "rows"_a, "pool_k"_a, "pool_v"_a, "q_heads"_a, "kv_heads"_a,
        "head_dim"_a, "dims"_a, "traditional"_a, nb::kw_only(), "q_norm"_a = nb::none(), "k_norm"_a = nb::none(),
        "q_eps"_a = 0.0f, "k_eps"_a = 0.0f, "stream"_a = nb::none(),
        "rope_split with k and v written into the pools in place (as pool[rows] = k); returns q.");
  m.def("swiglu_split", &swiglu_split, "gate_up"_a, nb::kw_only(), "stream"_a = nb::none(),
        "silu(gate) * up of a fused gate / up projection, bit-identical to mlx-lm's compiled swiglu.");
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
