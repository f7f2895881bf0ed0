// Stands in for CUDA's <cuda_fp16.h> when a kernel source is compiled for the CPU.
#pragma once
#include "cuda_host.h"
