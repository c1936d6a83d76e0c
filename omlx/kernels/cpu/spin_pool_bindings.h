// The kernel pool's module functions (spin_pool.h), bound the same way in each module that
// uses the pool (each extension module has its own pool).  Kept apart from spin_pool.h so that
// header builds without nanobind (a stand-alone harness around the kernels).
#pragma once

#include "common.h"
#include "spin_pool.h"

namespace omlx_cpu {

inline void bind_pool_tools(nb::module_& m) {
  m.def("spin_us", &kernel_spin_us, "How long the kernels' pool worker spins after a task (0: OpenMP).");
  m.def("set_spin_us", &set_kernel_spin_us, "us"_a, "Change it at run time (benches, tests).");
  m.def("pool_stats", [] {
    const auto s = SpinPool::instance().stats();
    nb::dict out;
    out["workers"] = s.workers;
    out["jobs"] = s.jobs;
    out["tasks"] = s.tasks;
    out["fallbacks"] = s.fallbacks;
    out["worker_tasks"] = s.worker_tasks;
    return out;
  }, "The kernel pool's workers, jobs shared and their tasks, calls that ran alone on a held pool, tasks the workers ran.");
  m.def("hold_pool", [](bool hold) {
    if (hold) return SpinPool::instance().try_hold();
    SpinPool::instance().release();
    return true;
  }, "hold"_a, "Tests: hold the pool as a concurrent call would (True if it was free), or release it.");
}

}  // namespace omlx_cpu
