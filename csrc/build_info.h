// Build facts baked in by CMake (see CMakeLists.txt); defaults for builds outside CMake.
#pragma once

#ifndef RATTENTION_VERSION
#define RATTENTION_VERSION "0.0.0+unknown"
#endif
#ifndef RATTENTION_WITH_CUDA
#define RATTENTION_WITH_CUDA 0
#endif
#ifndef RATTENTION_CUDA_ARCHS
#define RATTENTION_CUDA_ARCHS ""
#endif
#ifndef RATTENTION_CUDA_VERSION
#define RATTENTION_CUDA_VERSION ""
#endif
#ifndef RATTENTION_CUTLASS_VERSION
#define RATTENTION_CUTLASS_VERSION ""
#endif
#ifndef RATTENTION_TORCH_VERSION
#define RATTENTION_TORCH_VERSION ""
#endif
#ifndef RATTENTION_COMPILER
#define RATTENTION_COMPILER ""
#endif
