// Torch-free parallel loop for CPU kernels. Implemented in parallel.cpp on top of
// at::parallel_for (so it shares PyTorch's thread pool and honours torch.set_num_threads).
#pragma once
#include <cstdint>
#include <functional>

namespace rattention::cpu {

// Calls fn(begin, end) on disjoint sub-ranges covering [0, n); `grain` is the smallest
// range worth a task.
void parallel_for(int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn);

// Number of threads parallel_for may use (for per-thread scratch sizing).
int max_threads();

}  // namespace rattention::cpu
