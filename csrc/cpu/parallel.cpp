#include "parallel.h"

#include <ATen/Parallel.h>

namespace rattention::cpu {

void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}

int max_threads() { return at::get_num_threads(); }

}  // namespace rattention::cpu
