#include "checks.h"

#include <initializer_list>
#include <utility>

namespace nativevit {
namespace {

using Named = std::pair<const char*, const at::Tensor*>;

void check_rows(const char* op, const char* name, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 3, op, ": ", name, " must have shape (total, heads, head_dim), got ", x.sizes());
  TORCH_CHECK(x.size(-1) <= 1 || x.stride(-1) == 1, op, ": ", name,
              " must have stride 1 in its last dimension, got strides ", x.strides());
}

}  // namespace

void check_rope_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                     const at::Tensor& sin) {
  check_rows(op, "q", q);
  check_rows(op, "k", k);
  TORCH_CHECK(q.size(2) % 2 == 0, op, ": head_dim must be even, got ", q.size(2));
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(),
              " differ in tokens or head_dim");
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must have one dtype, got ", q.scalar_type(),
              " and ", k.scalar_type());
  TORCH_CHECK(q.device() == k.device(), op, ": q and k must be on one device");
  for (const Named& t : {Named{"cos", &cos}, Named{"sin", &sin}}) {
    const at::Tensor& x = *t.second;
    TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", t.first, " must be float32, got ", x.scalar_type());
    TORCH_CHECK(x.dim() == 2 && x.size(0) == q.size(0) && x.size(1) == q.size(2) / 2, op, ": ", t.first,
                " must have shape (total, head_dim/2) = (", q.size(0), ", ", q.size(2) / 2, "), got ", x.sizes());
    TORCH_CHECK(x.device() == q.device(), op, ": ", t.first, " is on ", x.device(), " but q is on ", q.device());
  }
}

void check_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const at::Tensor& cu_seqlens) {
  for (const Named& t : {Named{"q", &q}, Named{"k", &k}, Named{"v", &v}}) {
    const at::Tensor& x = *t.second;
    check_rows(op, t.first, x);
    TORCH_CHECK(x.sizes() == q.sizes(), op, ": q, k, v must have one shape, got ", q.sizes(), " and ", x.sizes());
    TORCH_CHECK(x.scalar_type() == q.scalar_type(), op, ": q, k, v must have one dtype, got ", q.scalar_type(),
                " and ", x.scalar_type());
    TORCH_CHECK(x.device() == q.device(), op, ": q, k, v must be on one device");
  }
  TORCH_CHECK(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ", cu_seqlens.scalar_type());
  TORCH_CHECK(cu_seqlens.dim() == 1 && cu_seqlens.numel() >= 2, op,
              ": cu_seqlens must be 1-D with at least 2 entries, got shape ", cu_seqlens.sizes());
  TORCH_CHECK(cu_seqlens.device() == q.device(), op, ": cu_seqlens is on ", cu_seqlens.device(), " but q is on ",
              q.device());
}

void check_grad_args(const char* op, const at::Tensor& grad_out, const at::Tensor& q) {
  TORCH_CHECK(grad_out.sizes() == q.sizes(), op, ": grad_out must have shape ", q.sizes(), ", got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == q.device(), op, ": grad_out must be on ", q.device());
}

std::vector<int64_t> host_offsets(const char* op, const at::Tensor& cu_seqlens, int64_t total) {
  const at::Tensor cu = cu_seqlens.to(at::kCPU).contiguous();
  const int32_t* p = cu.const_data_ptr<int32_t>();
  std::vector<int64_t> offsets(p, p + cu.numel());
  TORCH_CHECK(offsets.front() == 0, op, ": cu_seqlens must start at 0, got ", offsets.front());
  for (size_t i = 1; i < offsets.size(); ++i) {
    TORCH_CHECK(offsets[i] >= offsets[i - 1], op, ": cu_seqlens must be non-decreasing, cu_seqlens[", i,
                "] = ", offsets[i], " < ", offsets[i - 1]);
  }
  TORCH_CHECK(offsets.back() == total, op, ": cu_seqlens ends at ", offsets.back(), " but there are ", total,
              " tokens");
  return offsets;
}

}  // namespace nativevit
