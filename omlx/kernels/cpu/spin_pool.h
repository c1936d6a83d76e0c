// A small worker pool of omlx's own for the weight kernels' small calls (decode's projections:
// 20-150 us apart, 10-150 us each), in place of `#pragma omp parallel`.
//
// Why: omlx runs OpenMP with OMP_WAIT_POLICY=PASSIVE (omlx/kernels/linear.py), so every parallel
// region wakes its sleeping worker by futex (~20 us) and waits for it to join, which made a
// second thread a loss for every decode call but the LM head.  A process-wide spin
// (GOMP_SPINCOUNT) made a one-row step 0.74-0.78x the time but a 32-row step 1.6-10x slower:
// every OpenMP thread in the process spun, starving the Python thread that builds the next graph.
// Here only our kernels' workers spin, and only for a bounded time after their last task
// (OMLX_KERNEL_SPIN_US): within a step the next call comes before that ends, so the worker is
// hot; between steps and when idle it sleeps on a futex.
//
// How a call runs: the caller publishes its job (a task count and a function) and takes tasks
// itself at once; a worker takes tasks from the same atomic counter when it sees the job.  The
// caller never waits for a worker to wake: a late or sleeping worker finds every task taken and
// does nothing, so a call costs at most its own work plus the wake-up syscall.  The caller waits
// only for tasks a worker has already started.  Tasks are independent (the kernels split by
// 64-column panels, and a column's sum never depends on who computes it), so results are the
// same bits for any split.
//
// One job at a time: a caller that finds the pool held by another call (MLX's stream threads of
// two models, a test's threads) runs its tasks itself instead of queueing behind it.  After
// fork() the child has no workers: its calls run on the caller.
#pragma once

#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <utility>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

namespace omlx_cpu {

// The measured default (bench/README.md, "A bounded-spin worker for decode's weight calls").
constexpr int64_t DEFAULT_SPIN_US = 100;

// How long a worker keeps looking for the next job after its last one before it sleeps;
// 0 turns the pool off (the kernels use OpenMP as before).  OMLX_KERNEL_SPIN_US sets it at
// start; set_kernel_spin_us changes it at run time (benches alternate settings in one process).
inline std::atomic<int64_t>& spin_us_setting() {
  static std::atomic<int64_t> value{[] {
    const char* env = std::getenv("OMLX_KERNEL_SPIN_US");
    if (env != nullptr && *env) return std::max<int64_t>(0, std::atoll(env));
    return DEFAULT_SPIN_US;
  }()};
  return value;
}

inline int64_t kernel_spin_us() {
  return spin_us_setting().load(std::memory_order_relaxed);
}

inline void set_kernel_spin_us(int64_t us) {
  spin_us_setting().store(std::max<int64_t>(0, us), std::memory_order_relaxed);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

class SpinPool {
 public:
  using Task = void (*)(void* context, int64_t index);
  // Tasks per job: the claim word holds the next index and the count in 16 bits each; a
  // worker's overshoot past the count (a few increments) must not carry into the generation.
  static constexpr int64_t MAX_TASKS = 0x7fff;

  // At most this many workers (OMLX_POOL_WORKERS overrides): decode's calls are 10-150 us, a
  // few cores' unpack already reaches a socket's memory bandwidth, and every worker spins after
  // each call; measured on 2 cores only (one worker).
  static constexpr int MAX_WORKERS = 3;

  // The process's pool (one per extension module: each is its own shared object), started on
  // first use with one worker per OpenMP thread beyond the caller's, up to MAX_WORKERS.  Never
  // destroyed: detached workers asleep on a futex end with the process.
  static SpinPool& instance() {
    static SpinPool* pool = [] {
#ifdef _OPENMP
      const int threads = omp_get_max_threads();  // OMP_NUM_THREADS bounds our workers too
#else
      const int threads = int(std::thread::hardware_concurrency());
#endif
      const char* env = std::getenv("OMLX_POOL_WORKERS");
      const int most = env != nullptr && *env ? std::max(0, std::atoi(env)) : MAX_WORKERS;
      auto* made = new SpinPool(std::clamp(threads - 1, 0, most));
      pthread_atfork(nullptr, nullptr, [] { forked_child() = true; });
      return made;
    }();
    return *pool;
  }

  int workers() const {
    return workers_;
  }

  // What ran where since start (for tests and benches): jobs shared with the workers and their
  // tasks, calls that found the pool held by another and ran alone, tasks the workers ran.
  struct Stats {
    int workers;
    int64_t jobs, tasks, fallbacks, worker_tasks;
  };
  Stats stats() const {
    return {workers_, jobs_.load(std::memory_order_relaxed), tasks_.load(std::memory_order_relaxed),
            fallbacks_.load(std::memory_order_relaxed), worker_tasks_.load(std::memory_order_relaxed)};
  }

  // Tests hold the pool as another call would, to see a call fall back to its own thread.
  bool try_hold() {
    return !owned_.exchange(true, std::memory_order_acquire);
  }
  void release() {
    owned_.store(false, std::memory_order_release);
  }

  // task(context, i) for every i in [0, count), on the caller and whichever workers come;
  // returns when all have run.  count <= MAX_TASKS.
  void run(int64_t count, Task task, void* context) {
    if (count <= 1 || workers_ == 0 || forked_child() || !try_hold()) {
      if (count > 1 && workers_ > 0) fallbacks_.fetch_add(1, std::memory_order_relaxed);
      for (int64_t i = 0; i < count; ++i) task(context, i);
      return;
    }
    jobs_.fetch_add(1, std::memory_order_relaxed);
    tasks_.fetch_add(count, std::memory_order_relaxed);
    task_ = task;
    context_ = context;
    done_.store(0, std::memory_order_relaxed);
    generation_ += 1;
    claim_.store((generation_ << 32) | uint64_t(count), std::memory_order_seq_cst);
    epoch_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) wake_all();
    int64_t mine = 0;
    for (int64_t i; (i = claim()) >= 0; ++mine) task(context, i);
    // Only tasks a worker has started are left: wait for them (yielding, in case that worker
    // was preempted by another process on a busy machine).
    if (done_.fetch_add(mine, std::memory_order_acq_rel) + mine != count)
      for (int i = 0; done_.load(std::memory_order_acquire) != count; ++i) {
        cpu_relax();
        if (i % 64 == 63) sched_yield();
      }
    release();
  }

  // f(begin, end) over [0, items) in up to MAX_TASKS contiguous ranges, the caller's thread and
  // the pool's workers sharing them.
  template <class F>
  void for_ranges(int64_t items, int64_t per_task, F&& f) {
    per_task = std::max<int64_t>({per_task, 1, (items + MAX_TASKS - 1) / MAX_TASKS});
    struct Context {
      std::remove_reference_t<F>* f;
      int64_t items, per_task;
    } context{&f, items, per_task};
    run((items + per_task - 1) / per_task,
        [](void* c, int64_t i) {
          auto* ctx = static_cast<Context*>(c);
          const int64_t begin = i * ctx->per_task;
          (*ctx->f)(begin, std::min(ctx->items, begin + ctx->per_task));
        },
        &context);
  }

 private:
  explicit SpinPool(int workers) : workers_(workers) {
    for (int i = 0; i < workers_; ++i) std::thread([this] { work(); }).detach();
  }

  static bool& forked_child() {
    static bool value = false;
    return value;
  }

  // The next task index of the current job, or -1 when none is left.  The claim word is
  // generation (32 bits) | next index (16) | count (16); a stale worker's increment lands on a
  // later job's word only as a claim of that job's task, which it then runs.
  int64_t claim() {
    if (!available()) return -1;
    const uint64_t before = claim_.fetch_add(uint64_t(1) << 16, std::memory_order_acq_rel);
    const int64_t index = int64_t((before >> 16) & 0xffff), count = int64_t(before & 0xffff);
    return index < count ? index : -1;
  }

  bool available() const {
    const uint64_t word = claim_.load(std::memory_order_acquire);
    return ((word >> 16) & 0xffff) < (word & 0xffff);
  }

  void work() {
    pthread_setname_np(pthread_self(), "omlx-kernel");
    using clock = std::chrono::steady_clock;
    auto last = clock::now();
    uint64_t seen = claim_.load(std::memory_order_relaxed) >> 32;
    for (;;) {
      // task_ and context_ are read after a successful claim: the caller does not publish the
      // next job until this task's done_ increment, so they are this job's.
      int64_t ran = 0;
      for (int64_t i; (i = claim()) >= 0; ++ran) {
        task_(context_, i);
        done_.fetch_add(1, std::memory_order_release);
      }
      if (ran) worker_tasks_.fetch_add(ran, std::memory_order_relaxed);
      // Any new job counts as activity, also one the caller finished alone before this
      // worker looked: calls are still coming.
      const uint64_t generation = claim_.load(std::memory_order_relaxed) >> 32;
      const auto now = clock::now();
      if (generation != seen) {
        seen = generation;
        last = now;
      }
      if (now - last < std::chrono::microseconds(kernel_spin_us())) {
        // A polite spin: on a machine whose cores other processes want too, the yield gives
        // them the core (and the caller's own thread if it shares this one); on an idle core
        // it returns at once.  Measured at load 6-7 (GGUF one-row step, decode_step_env.py):
        // with the yield 0.73x OpenMP's step (paired), spinning without it 1.09x.
        for (int i = 0; i < 64 && !available(); ++i) cpu_relax();
        if (!available()) sched_yield();
        continue;
      }
      // Sleep until a caller moves the epoch; the caller reads sleepers_ after moving it, so
      // either it sees this sleeper and wakes it, or the wait finds the epoch moved.
      const uint32_t epoch = epoch_.load(std::memory_order_seq_cst);
      sleepers_.fetch_add(1, std::memory_order_seq_cst);
      if (!available()) wait_epoch(epoch);
      sleepers_.fetch_sub(1, std::memory_order_seq_cst);
      last = clock::now();  // woken for a step's first call: stay hot for the calls after it
    }
  }

  void wait_epoch(uint32_t seen) {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch_), FUTEX_WAIT_PRIVATE, seen, nullptr, nullptr, 0);
#else
    epoch_.wait(seen, std::memory_order_seq_cst);
#endif
  }

  void wake_all() {
#if defined(__linux__)
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&epoch_), FUTEX_WAKE_PRIVATE, workers_, nullptr, nullptr, 0);
#else
    epoch_.notify_all();
#endif
  }

  const int workers_;
  uint64_t generation_ = 0;  // written by the owner only
  Task task_ = nullptr;
  void* context_ = nullptr;
  alignas(64) std::atomic<uint64_t> claim_{0};
  alignas(64) std::atomic<int64_t> done_{0};
  alignas(64) std::atomic<uint32_t> epoch_{0};
  std::atomic<int> sleepers_{0};
  alignas(64) std::atomic<bool> owned_{false};
  std::atomic<int64_t> jobs_{0}, tasks_{0}, fallbacks_{0};
  alignas(64) std::atomic<int64_t> worker_tasks_{0};
};

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "the futex word is the atomic's storage");

// Whether a call goes to the pool: at most pool_max_rows() rows (decode's calls: tens of
// microseconds each, where OpenMP's wake-up costs as much as the work) and at least
// pool_min_work() multiply-adds.  With a hot worker a hand-off costs well under a microsecond,
// and a cold one costs the caller only the wake-up syscall, so the bar is far below OpenMP's.
// Bigger calls (a 32-row step's) keep OpenMP's sleeping threads: there the wake-up is small
// beside the call, and a worker spinning after them took the core from the attention kernel's
// OpenMP threads and the Python thread (a 32-row step up to 2x slower in some turns).
// OMLX_POOL_MIN_WORK (m * n * k) and OMLX_POOL_MAX_ROWS override them (read once).
inline int64_t env_setting(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  return env != nullptr && *env ? std::max<int64_t>(1, std::atoll(env)) : fallback;
}

inline int64_t pool_min_work() {
  static const int64_t value = env_setting("OMLX_POOL_MIN_WORK", int64_t(1) << 17);
  return value;
}

inline int64_t pool_max_rows() {
  static const int64_t value = env_setting("OMLX_POOL_MAX_ROWS", 8);
  return value;
}

inline bool pool_enabled() {
  return kernel_spin_us() > 0;
}

// Whether a call of m rows runs on the pool (false: by OpenMP's rule), and whether the pool
// splits one of `panels` panels and m * n * k multiply-adds (false: all on the caller).
inline bool pool_runs(int64_t m) {
  return pool_enabled() && m <= pool_max_rows();
}

inline bool pool_splits(int64_t panels, int64_t work) {
  return panels > 1 && work >= pool_min_work();
}

}  // namespace omlx_cpu
