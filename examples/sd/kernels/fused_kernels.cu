/// @file fused_kernels.cu
/// @brief The nvcc translation unit of the fused kernels: compiles the kernels and the launchers of
/// fused_kernels.h, which fused_kernels.cuh holds (that file also explains what they do and how
/// a test runs them without a GPU).

#include "fused_kernels.cuh"
