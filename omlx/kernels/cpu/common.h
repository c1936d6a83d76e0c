// What every omlx CPU kernel module shares: the MLX / nanobind headers, the namespace
// aliases, and the few steps each custom primitive takes the same way (allocate its output and
// register its arrays with the CPU encoder, hand evaluated operands through untouched, report
// its OpenMP thread count).  Each module is its own nanobind target (CMakeLists.txt), so
// everything here is inline and header-only.
#pragma once

#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/mlx.h"
#include "mlx/primitives.h"

namespace nb = nanobind;
using namespace nb::literals;
namespace mx = mlx::core;

namespace omlx_cpu {

// The first step of every eval_cpu here: give the single output its buffer and tell the CPU
// encoder which arrays the dispatched task reads and writes (so MLX keeps them alive until it
// has run).  Returns the encoder to dispatch on.
inline mx::cpu::CommandEncoder& begin_cpu_eval(const mx::Stream& stream, const std::vector<mx::array>& inputs,
                                               mx::array& out) {
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(stream);
  for (auto& a : inputs) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}

// An evaluated row-contiguous operand as it is; anything else (lazy or strided) through
// mx::contiguous.  Parameters are evaluated and contiguous, so a layer call adds no graph node
// for them (decode builds hundreds of these calls per token, each node costs microseconds).
inline mx::array as_rows(const mx::array& a, const mx::Stream& stream) {
  if (a.is_available() && a.flags().row_contiguous) return a;
  return mx::contiguous(a, false, stream);
}

// The threads a kernel's parallel loops may use (1 in a build without OpenMP).
inline int openmp_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace omlx_cpu
