// Dynamic shared memory of a kernel as a template argument, so the demangled kernel name
// tells tools/cuda_check.py how much the launcher requests (ptxas only sees static smem).
#pragma once

namespace rattention::cuda {

template <int N>
struct DynSmem {
  static constexpr int value = N;
};

}  // namespace rattention::cuda
