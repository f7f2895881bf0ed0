// Stands in for CUDA's <mma.h> when a kernel source is compiled for the CPU.
#pragma once
#include "cuda_host.h"
