// Memory-safety checks shared by the CPU and CUDA ops.
//
// User-facing validation is the public ops' job (nativevit/ops.py: clear errors, once per call).
// These checks only guarantee that an op called directly (torch.ops.nativevit.cpp_*) never reads or
// writes out of bounds and never returns unwritten memory: the ranks, shapes, dtypes and devices
// the kernels index with, unit last-dim strides, and segment offsets that partition the rows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace nativevit {

// q, k: (total, heads, even head_dim), one dtype and device, stride(-1) == 1 (heads may differ);
// cos, sin: (total, head_dim/2) float32 on that device.
void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                     const at::Tensor& sin);

// q, k, v: one shape (total, heads, head_dim), dtype and device, stride(-1) == 1; cu_seqlens: 1-D
// int32 on that device with at least 2 entries.
void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_seqlens);

// grad_out of a backward: q's shape, on q's device.
void check_grad_args(const char* op, const at::Tensor& grad_out, const at::Tensor& q);

// Host copy of cu_seqlens, checked to partition [0, total): starts at 0, non-decreasing, ends at total.
std::vector<int64_t> host_offsets(const char* op, const at::Tensor& cu_seqlens, int64_t total);

}  // namespace nativevit
