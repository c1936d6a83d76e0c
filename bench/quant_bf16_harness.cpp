// The quantized-bf16 kernel (omlx/kernels/cpu/quant_bf16_kernel.h) timed on its own: no MLX
// dispatch, no Python, so perf and objdump see only the kernel.  Random 4- / 8-bit codes with
// float16 scales and float32 offsets (the form SmolLM2's Q4_1 layers take), a ring of `copies`
// weight copies (200 copies of a decode shape are several times the L3: every call streams
// from memory, as a decode step does; 1 keeps it in cache).  Prints min and median per call.
//
//   MLX_INCLUDE=$(python -c "import mlx, pathlib; print(pathlib.Path(mlx.__path__[0]) / 'include')")
//   g++ -O3 -march=native -ffp-contract=fast -std=c++20 -fopenmp -Iomlx/kernels/cpu -I$MLX_INCLUDE \
//       bench/quant_bf16_harness.cpp -o /tmp/quant_bf16_harness
//   OMP_NUM_THREADS=1 /tmp/quant_bf16_harness N K BITS [ROWS [CALLS [COPIES]]]
//   OMLX_KERNEL_SPIN_US=0|100 ...   # OpenMP's sleeping threads or the spinning pool (spin_pool.h)
#include <immintrin.h>
#define OMLX_DPBF16 1
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>

namespace omlx_cpu {
inline int openmp_threads() {  // common.h's, without MLX's headers
  return omp_get_max_threads();
}
}  // namespace omlx_cpu

#include "quant_bf16_kernel.h"

using namespace omlx_quant_bf16;

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s N K BITS [ROWS [CALLS [COPIES]]]\n", argv[0]);
    return 2;
  }
  const int n = std::atoi(argv[1]), k = std::atoi(argv[2]), bits = std::atoi(argv[3]);
  const int m = argc > 4 ? std::atoi(argv[4]) : 1, calls = argc > 5 ? std::atoi(argv[5]) : 2000;
  const int copies = argc > 6 ? std::atoi(argv[6]) : 200;
  const int panels = (n + PANEL - 1) / PANEL, k_pairs = k / 2, groups = k / 32;
  const size_t code_bytes = size_t(panels) * k_pairs * (bits == 4 ? PANEL : 2 * PANEL);
  std::mt19937 rng(1);
  std::vector<std::vector<uint8_t>> codes(copies, std::vector<uint8_t>(code_bytes));
  std::vector<std::vector<uint16_t>> scales(copies, std::vector<uint16_t>(size_t(panels) * groups * PANEL));
  std::vector<std::vector<float>> offsets(copies, std::vector<float>(size_t(panels) * groups * PANEL, -0.5f));
  for (int c = 0; c < copies; ++c) {
    for (auto& b : codes[c]) b = uint8_t(rng());
    for (auto& s : scales[c]) s = uint16_t(0x2000 + (rng() & 0x3ff));  // small positive float16
  }
  std::vector<float> x(size_t(m) * k), y(size_t(m) * n);
  for (auto& v : x) v = float(rng() % 1000) / 1000.f - 0.5f;
  std::vector<double> times;
  for (int call = 0; call < calls; ++call) {
    const int c = call % copies;
    Problem p{};
    p.x = x.data();
    p.codes = codes[c].data();
    p.scales = scales[c].data();
    p.biases = offsets[c].data();
    p.y = y.data();
    p.m = m, p.n = n, p.k = k, p.k_pairs = k_pairs, p.panels = panels, p.groups = groups;
    p.bits = bits, p.group_pairs = 16, p.scale_type = kF16Offsets;
    const auto start = std::chrono::steady_clock::now();
    run(p);
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  const double median = times[times.size() / 2];
  std::printf("%5d x %-5d %d-bit, %d row(s), %d copies, %d OpenMP threads, spin %lld us: min %.1f us, median %.1f us "
              "(%.1f Gweights/s)\n",
              n, k, bits, m, copies, omp_get_max_threads(), (long long)omlx_cpu::kernel_spin_us(), times[0], median,
              double(n) * k / median / 1e3);
  return y[0] == 12345.f;  // keeps the stores
}
