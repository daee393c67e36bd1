// Host/device portability macros shared by the CPU and CUDA backends.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define RATT_HD __host__ __device__ __forceinline__
#else
#define RATT_HD inline
#endif
