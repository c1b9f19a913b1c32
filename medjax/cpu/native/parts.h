// Running a kernel's parts on XLA:CPU's intra-op thread pool.
#ifndef MEDJAX_NATIVE_PARTS_H_
#define MEDJAX_NATIVE_PARTS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace medjax {

// The number of parts to split n items into: one per thread, at most n, at least one.
inline int64_t NumParts(xla::ffi::ThreadPool& pool, int64_t n) {
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  return std::max<int64_t>(1, std::min<int64_t>(n, threads));
}

// Runs run_part(p) for p in [0, parts): parts are claimed from a shared counter by the calling thread
// and by helper tasks on the pool; the caller waits only for parts that a running helper has claimed,
// so it never waits on a queued task. run_part must stay valid until RunParts returns.
template <typename F>
void RunParts(xla::ffi::ThreadPool& pool, int64_t parts, const F& run_part) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  const F* fn = &run_part;
  auto work = [state, fn, parts]() {
    for (int64_t p; (p = state->next.fetch_add(1)) < parts;) {
      (*fn)(p);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int64_t t = 1; t < parts; ++t) pool.Schedule([work]() { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < parts) std::this_thread::yield();
}

// Writes the elementwise sum of the parts' buffers (at least one, all of out's size) to out.
inline void SumParts(const std::vector<std::vector<float>>& sums, float* out) {
  std::copy(sums[0].begin(), sums[0].end(), out);
  for (size_t p = 1; p < sums.size(); ++p)
    for (size_t k = 0; k < sums[p].size(); ++k) out[k] += sums[p][k];
}

}  // namespace medjax

#endif  // MEDJAX_NATIVE_PARTS_H_
