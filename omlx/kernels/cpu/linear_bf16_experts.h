// MoE expert layers on the packed bf16 kernel: y[r] = x[r / fan] @ W[e_r].T (+ b[e_r]), one call
// per projection of an MoE layer (what mx.gather_mm does for mlx-lm's SwitchLinear), all the
// experts' weights packed once at load as (E, N_pad / 64, K_pad / 2, 128) bf16.
//
// Included by linear_bf16.cpp inside its anonymous namespace, after the panel kernel
// (Problem, convert_rows, gather_rows, panel_rows), which this reuses unchanged.
//
// Rows are grouped by expert here, in the task, where the router's choices are known: grouping
// them in Python would need the indices on the host in the middle of the graph (a sync per MoE
// layer).  Each expert's rows then stream that expert's panels once, as a plain linear layer's
// rows do, and each output element is accumulated by the same instruction sequence as in a
// one-row call: a row's result does not depend on which rows share its step (batch
// invariance), nor on the order the router listed them.
//
// `fan`: a token's row feeds its top-k experts without being copied k times: output row r
// reads x row r / fan (fan = R / X; 1 when x already has a row per output row).

struct ExpertProblem {
  Problem x_rows;            // the X distinct input rows (x, m = X, k, strides when not contiguous)
  const uint32_t* experts;   // the expert of each output row (R of them, any shape, read
  std::vector<int64_t> expert_shape, expert_strides;  // through these: often a strided slice)
  const uint16_t* w;         // packed bf16 (E, panels, k_pairs, 128)
  const float* bias;         // (E, N) row-contiguous, or null
  float* y;                  // (R, N) float32
  int64_t rows, n, panels, num_experts;
};

void run_experts(const ExpertProblem& e) {
  Problem xp = e.x_rows;
  std::vector<float> gathered;
  if (!xp.x_shape.empty()) {
    gathered = gather_rows(xp);
    xp.x = gathered.data();
  }
  std::vector<uint32_t> experts(size_t(e.rows));
  {
    const int nd = int(e.expert_shape.size());
    std::vector<int64_t> index(size_t(nd), 0);
    for (int64_t r = 0; r < e.rows; ++r) {
      int64_t at = 0;
      for (int d = 0; d < nd; ++d) at += index[d] * e.expert_strides[d];
      experts[r] = e.experts[at];
      for (int d = nd - 1; d >= 0 && ++index[d] == e.expert_shape[d]; --d) index[d] = 0;
    }
  }
  const int64_t kp = xp.k_pairs, n = e.n;
  const int64_t fan = xp.m ? e.rows / xp.m : 1;
  // Each input row rounded to bf16 pairs once, however many experts it feeds.
  std::vector<uint32_t> x_pairs(size_t(xp.m * kp));
  convert_rows(xp, x_pairs.data());

  // Counting sort of output rows by expert (stable: rows keep their order within an expert).
  std::vector<int64_t> start(size_t(e.num_experts + 1), 0);
  for (int64_t r = 0; r < e.rows; ++r)
    if (experts[r] < uint64_t(e.num_experts)) ++start[experts[r] + 1];
  for (int64_t i = 0; i < e.num_experts; ++i) start[i + 1] += start[i];
  const int64_t routed = start[e.num_experts];
  std::vector<int64_t> order(static_cast<size_t>(routed));
  std::vector<int64_t> next(start.begin(), start.end() - 1);
  for (int64_t r = 0; r < e.rows; ++r)
    if (experts[r] < uint64_t(e.num_experts)) order[next[experts[r]]++] = r;

  std::vector<uint32_t> pairs(size_t(routed * kp));
  for (int64_t i = 0; i < routed; ++i)
    std::memcpy(pairs.data() + i * kp, x_pairs.data() + (order[i] / fan) * kp, size_t(kp) * 4);
  std::vector<float> sorted_y(size_t(routed * n));

  // One work item per (expert with rows, panel): items read disjoint weights and write
  // disjoint outputs, so threads split them freely without changing any row's arithmetic.
  std::vector<std::pair<int64_t, int64_t>> items;
  for (int64_t ex = 0; ex < e.num_experts; ++ex)
    if (start[ex + 1] > start[ex])
      for (int64_t panel = 0; panel < e.panels; ++panel) items.emplace_back(ex, panel);
  const int64_t panel_elems = kp * (2 * PANEL);
  const bool parallel = items.size() > 1 && routed * n * xp.k >= (int64_t(1) << 19);
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t i = 0; i < int64_t(items.size()); ++i) {
    const auto [ex, panel] = items[size_t(i)];
    Problem p{};
    p.m = start[ex + 1] - start[ex];
    p.n = n;
    p.k = xp.k;
    p.k_pairs = kp;
    p.panels = e.panels;
    p.w = e.w + ex * e.panels * panel_elems;
    p.bias = e.bias ? e.bias + ex * n : nullptr;
    p.y = sorted_y.data() + start[ex] * n;
    panel_rows(p, pairs.data() + start[ex] * kp, panel);
  }

  for (int64_t i = 0; i < routed; ++i)
    std::memcpy(e.y + order[i] * n, sorted_y.data() + i * n, size_t(n) * 4);
  // A row routed to no existing expert (an index out of range) gets zeros, not garbage.
  if (routed < e.rows)
    for (int64_t r = 0; r < e.rows; ++r)
      if (experts[r] >= uint64_t(e.num_experts)) std::memset(e.y + r * n, 0, size_t(n) * 4);
}

class PackedExpertLinear : public mx::Primitive {
 public:
  PackedExpertLinear(mx::Stream stream, int out_features, bool has_bias, bool row_axis)
      : mx::Primitive(stream), out_features_(out_features), has_bias_(has_bias), row_axis_(row_axis) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    auto& out = outputs[0];
    auto& enc = omlx_cpu::begin_cpu_eval(stream(), inputs, out);
    const auto& x = inputs[0];
    const auto& experts = inputs[1];
    const auto& w = inputs[2];
    ExpertProblem e{};
    Problem& xp = e.x_rows;
    xp.x = x.data<float>();
    xp.k = x.shape(-1);
    xp.m = xp.k ? int64_t(x.size()) / xp.k : 0;
    xp.k_pairs = w.shape(2);
    if (!x.flags().row_contiguous) {
      xp.x_shape.assign(x.shape().begin(), x.shape().end());
      xp.x_strides.assign(x.strides().begin(), x.strides().end());
    }
    // Read through their strides: the router's top-k indices are a slice, and a reshape or
    // contiguous() node per call would cost more than the copy run_experts makes of them.
    e.experts = experts.data<uint32_t>();
    e.expert_shape.assign(experts.shape().begin(), experts.shape().end());
    e.expert_strides.assign(experts.strides().begin(), experts.strides().end());
    e.w = reinterpret_cast<const uint16_t*>(w.data<void>());
    e.bias = has_bias_ ? inputs[3].data<float>() : nullptr;
    e.y = out.data<float>();
    e.rows = experts.size();
    e.n = out_features_;
    e.panels = w.shape(1);
    e.num_experts = w.shape(0);
    if (e.rows == 0) return;
    enc.dispatch([e = std::move(e)]() { run_experts(e); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("omlx packed expert linear: this extension runs on the CPU only");
  }

  const char* name() const override {
    return "OmlxPackedExpertLinearBf16";
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    return {output_shape(inputs[1].shape(), out_features_, row_axis_)};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    auto* o = dynamic_cast<const PackedExpertLinear*>(&other);
    return o && o->out_features_ == out_features_ && o->has_bias_ == has_bias_ && o->row_axis_ == row_axis_;
  }

  static mx::Shape output_shape(const mx::Shape& experts, int out_features, bool row_axis) {
    mx::Shape shape = experts;
    if (row_axis) shape.push_back(1);
    shape.push_back(out_features);
    return shape;
  }

 private:
  int out_features_;
  bool has_bias_;
  bool row_axis_;
};

// x (..., K) any float dtype, X rows; experts (...) integer, R of them, R a multiple of X;
// packed (E, N_pad / 64, K_pad / 2, 128) bfloat16; bias (E, N) or None.  Returns float32 of
// shape experts.shape + (N,), or experts.shape + (1, N) with `row_axis` (gather_mm's shape
// for one row per matrix product, what mlx-lm's expert layers get back).
mx::array expert_linear(const mx::array& x, const mx::array& experts, const mx::array& packed,
                        const std::optional<mx::array>& bias, int out_features, int in_features, bool row_axis,
                        mx::StreamOrDevice s) {
  if (x.ndim() < 1) throw std::invalid_argument("packed expert linear: x must have a feature axis");
  if (packed.ndim() != 4 || packed.shape(3) != 2 * PANEL || packed.dtype() != mx::bfloat16)
    throw std::invalid_argument("packed expert linear: weights must be packed bf16 (experts, panels, k_pairs, 128)");
  const int k = x.shape(-1);
  if ((k + 1) / 2 != packed.shape(2) || (in_features >= 0 && k != in_features))
    throw std::invalid_argument("packed expert linear: x has " + std::to_string(k) + " features, the weights " +
                                std::to_string(2 * packed.shape(2)) + " (padded)");
  if (out_features <= 0 || (out_features + PANEL - 1) / PANEL != packed.shape(1))
    throw std::invalid_argument("packed expert linear: out_features does not match the packed panels");
  if (!mx::issubdtype(experts.dtype(), mx::integer))
    throw std::invalid_argument("packed expert linear: experts must be integers");
  const int64_t x_rows = k ? int64_t(x.size()) / k : 0;
  if (x_rows == 0 ? experts.size() != 0 : int64_t(experts.size()) % x_rows != 0)
    throw std::invalid_argument("packed expert linear: the rows of experts must be a multiple of x's rows");
  if (bias && (bias->ndim() != 2 || bias->shape(0) != packed.shape(0) || bias->shape(1) != out_features))
    throw std::invalid_argument("packed expert linear: bias must have shape (experts, out_features)");
  const auto stream = mx::to_stream(s, mx::Device::cpu);
  std::vector<mx::array> inputs = {x.dtype() == mx::float32 ? x : mx::astype(x, mx::float32, stream),
                                   experts.dtype() == mx::uint32 ? experts : mx::astype(experts, mx::uint32, stream),
                                   omlx_cpu::as_rows(packed, stream)};
  if (bias)
    inputs.push_back(omlx_cpu::as_rows(bias->dtype() == mx::float32 ? *bias : mx::astype(*bias, mx::float32, stream),
                                       stream));
  return mx::array(PackedExpertLinear::output_shape(experts.shape(), out_features, row_axis), mx::float32,
                   std::make_shared<PackedExpertLinear>(stream, out_features, bias.has_value(), row_axis),
                   std::move(inputs));
}
