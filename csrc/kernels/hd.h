// Host/device qualifiers: the element math in *_math.h compiles as plain C++ for the
// CPU loops and as __host__ __device__ code under nvcc, so both run the same formulas.
#pragma once

#if defined(__CUDACC__)
#define PYCOMM_HD __host__ __device__ __forceinline__
#else
#define PYCOMM_HD inline
#endif
