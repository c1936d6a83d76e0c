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
#include <cstdint>
#include <stdexcept>
#include <string>

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
    // A strided x (a view) is gathered into rows inside the task, not by a copy node.
    std::vector<int64_t> shape, strides;
    if (!xa.flags().row_contiguous) {
      shape.assign(xa.shape().begin(), xa.shape().end());
      strides.assign(xa.strides().begin(), xa.strides().end());
    }
    enc.dispatch([=, src = xa.data<float>()]() {
      std::vector<float> gathered;
      const float* x = src;
      if (!shape.empty()) {
        gathered = gather(src, shape, strides);
        x = gathered.data();
      }
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

}  // namespace

NB_MODULE(_fused_ops_cpu, m) {
  m.doc() = "omlx per-token elementwise primitives (MLX CPU): rms_norm, rope_rotate";
  m.def("rms_norm", &rms_norm, "x"_a, "weight"_a, "eps"_a, nb::kw_only(), "stream"_a = nb::none(),
        "x / sqrt(mean(x^2, -1) + eps) * weight, one node, rows batch-invariant.");
  m.def("rope_rotate", &rope_rotate, "x"_a, "table"_a, "dims"_a, "traditional"_a, nb::kw_only(),
        "stream"_a = nb::none(), "RoPE's rotation of x by a precomputed cos / sin table (bit-identical to mx.fast.rope on CPU).");
  m.def("num_threads", &omlx_cpu::openmp_threads);
}
