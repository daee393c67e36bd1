// cpu/parallel.h for the JAX FFI module: an OpenMP team per call (torch's thread pool is not
// available here; _C uses cpu/parallel.cpp). The kernels' results do not depend on how the
// range is split, so both implementations give the same bits.
#include "cpu/parallel.h"

#include <algorithm>
#include <exception>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace rattention::cpu {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  const int64_t chunks = std::min<int64_t>(max_threads(), (n + std::max<int64_t>(grain, 1) - 1) /
                                                              std::max<int64_t>(grain, 1));
#ifdef _OPENMP
  if (chunks > 1 && !omp_in_parallel()) {
    const int64_t per = (n + chunks - 1) / chunks;
    // An exception must not leave an OpenMP region: keep the first, rethrow it after.
    std::exception_ptr error;
#pragma omp parallel for num_threads(static_cast<int>(chunks)) schedule(static, 1)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t b = c * per, e = std::min(n, b + per);
      try {
        if (b < e) fn(b, e);
      } catch (...) {
#pragma omp critical(rattention_parallel_error)
        if (!error) error = std::current_exception();
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  (void)chunks;
  fn(0, n);
}

int max_threads() {
#ifdef _OPENMP
  return omp_in_parallel() ? 1 : omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace rattention::cpu
