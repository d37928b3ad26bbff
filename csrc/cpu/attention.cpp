// Varlen block-diagonal attention on the CPU: the FlashAttention-2 forward, and the backward.
//
// Forward. Q, K and V of every (segment, head) are packed once per call into the layouts the
// microkernels stream (microkernels.h). Work items are (segment, head, query block of kBlockM rows),
// longest segments first, pulled from an atomic counter by every thread: one long image and many
// small ones keep all cores busy. Per item, row group of kRows rows and key block: a row group's
// first block (kFirstBlock keys) is exact: S = Q K^T (microkernel), the row max, P = exp(S - max) in
// the input dtype as FlashAttention does, sums in fp32. Later blocks (kBlockN keys) reuse that max as
// the reference, as FlashAttention-4 rescales lazily: P comes straight from the QK microkernel's
// registers (qk_p: no S buffer, no max pass, no rescale of O) while the block's max is tracked, and a
// block whose max passed the reference by more than kLazyBound (P > 2^16), or whose sums are not
// finite, is redone exactly with a new max. Then O = alpha O + P V (microkernel), finally O / l.
// Takes float32 and bfloat16. NaN and inf give what SDPA's math gives per segment: a NaN or +inf
// score makes its row NaN (exp(NaN) stays NaN in microkernels.h), -inf scores weigh 0 (a row whose
// scores are all -inf so far sums zeros, not exp(-inf - -inf) = NaN), and a row with no score above
// -inf is 0.
//
// Backward: recomputed per segment with torch's fused CPU flash attention (forward for out and
// logsumexp, then its backward); reads cu_seqlens on the host once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "microkernels.h"
#include "ops.h"

namespace nativevit::cpu {
namespace {

constexpr int64_t kBlockM = 64;
constexpr int64_t kFirstBlock = 64;  // exact: its max is the reference of the later blocks
constexpr int64_t kBlockN = 1024;    // lazy: long, so the per-block work is small

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

struct WorkItem {
  int64_t seg, head, q0;
};

template <typename T>
void varlen_attention_cpu_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                                 const std::vector<int64_t>& offsets, float scale, Isa isa) {
  constexpr int64_t P = Elem<T>::kPair;
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const int64_t dk = round_up(head_dim, P), dv = round_up(head_dim, 16);
  const int64_t num_segments = static_cast<int64_t>(offsets.size()) - 1;

  // packed Q/K/V: segment-major, then head, then the padded tokens of the segment
  std::vector<int64_t> pack_off(num_segments + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> tiles;  // (segment, first token) of every 16-token tile
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t np = round_up(offsets[s + 1] - offsets[s], 16);
    pack_off[s + 1] = pack_off[s] + np;
    for (int64_t t = 0; t < np; t += 16) tiles.emplace_back(s, t);
  }
  at::Tensor q_pack = at::empty({pack_off.back() * heads * dk}, q.options());
  at::Tensor k_pack = at::empty({pack_off.back() * heads * dk}, q.options());
  at::Tensor v_pack = at::empty({pack_off.back() * heads * dv}, q.options());
  T* qp_all = q_pack.data_ptr<T>();
  T* kp_all = k_pack.data_ptr<T>();
  T* vp_all = v_pack.data_ptr<T>();
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  const int64_t sq0 = q.stride(0), sq1 = q.stride(1), sk0 = k.stride(0), sk1 = k.stride(1);
  const int64_t sv0 = v.stride(0), sv1 = v.stride(1);

  // Token-major over all heads, so q, k, v (rows of the fused qkv buffer, thousands of bytes
  // apart) are read once, sequentially; reading them per head inside the work items instead was
  // ~10% of the bf16 mixed-batch time in cache and TLB misses (perf).
  at::parallel_for(0, static_cast<int64_t>(tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t ti = begin; ti < end; ++ti) {
      const auto [s, t0] = tiles[ti];
      const int64_t start = offsets[s], n = offsets[s + 1] - start, np = round_up(n, 16);
      const auto width = [&](int64_t j) { return j < n ? head_dim : 0; };  // padded tokens are all zeros
      const auto row = [&](int64_t j) { return start + std::min(j, n - 1); };
      for (int64_t j = t0; j < t0 + 16; ++j) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t base = pack_off[s] * heads + h * np;
          pack_q(qd + row(j) * sq0 + h * sq1, width(j), dk, qp_all + (base + j) * dk);
          pack_k(kd + row(j) * sk0 + h * sk1, width(j), dk, kp_all + base * dk + k_index<T>(j, 0, dk));
        }
      }
      for (int64_t j = t0; j < t0 + 16; j += P) {
        for (int64_t h = 0; h < heads; ++h) {
          const int64_t base = pack_off[s] * heads + h * np;
          pack_v(vd + row(j) * sv0 + h * sv1, width(j), vd + row(j + P - 1) * sv0 + h * sv1, width(j + P - 1), dv,
                 vp_all + base * dv + v_index<T>(j, 0, dv));
        }
      }
    }
  });

  std::vector<WorkItem> items;
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t n = offsets[s + 1] - offsets[s];
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t q0 = 0; q0 < n; q0 += kBlockM) items.push_back({s, h, q0});
  }
  // longest segments first: greedy scheduling then balances the threads
  std::stable_sort(items.begin(), items.end(), [&](const WorkItem& a, const WorkItem& b) {
    return offsets[a.seg + 1] - offsets[a.seg] > offsets[b.seg + 1] - offsets[b.seg];
  });

  // Key blocks after a row's first take the lazy reference (qk_p in microkernels.h), in the unit of
  // P's exponentials (kExpUnit), up to P = 2^16 (O then overflows only for values near 1e33; a NaN or
  // inf P fails lazy_finish). Generic loops and scale <= 0 (where a max of scores is no max of scaled
  // scores) stay exact.
  constexpr float kUnit = kExpUnit<T>;
  constexpr float kLazyBound = std::is_same_v<T, float> ? 16.f * 0.693147181f : 16.f;  // log of 2^16
  const bool lazy_ok = isa == Isa::kAvx512 && scale > 0.f;
  const float scale_e = scale * kUnit;

  T* od = out.data_ptr<T>();
  std::atomic<int64_t> next{0};
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t n_threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(n_items, 1));
  at::parallel_for(0, n_threads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s_buf(kRows * kBlockN);
    std::vector<T> p_buf(kRows * kBlockN);
    std::vector<float> o_buf(kBlockM * dv);
    std::vector<float> m_buf(kBlockM), l_buf(kBlockM), a_buf(kBlockM);
    float vmax[kRows * 16], vsum[kRows * 16];
    for (int64_t worker = begin; worker < end; ++worker) {
      for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
        const WorkItem& it = items[i];
        const int64_t start = offsets[it.seg], n = offsets[it.seg + 1] - start, np = round_up(n, 16);
        const int64_t rows = std::min(kBlockM, n - it.q0), rows_pad = round_up(rows, kRows);
        const int64_t base = pack_off[it.seg] * heads + it.head * np;
        const T* qp = qp_all + (base + it.q0) * dk;  // rows_pad <= np - q0 rows, zero beyond n
        const T* kp = kp_all + base * dk;
        const T* vp = vp_all + base * dv;
        std::fill(o_buf.begin(), o_buf.begin() + rows_pad * dv, 0.f);
        std::fill(m_buf.begin(), m_buf.end(), -std::numeric_limits<float>::infinity());
        std::fill(l_buf.begin(), l_buf.end(), 0.f);
        for (int64_t k0 = 0, keys = 0; k0 < n; k0 += keys) {
          keys = std::min(k0 == 0 ? kFirstBlock : kBlockN, n - k0);
          const int64_t keys_pad = round_up(keys, 16);
          const T* kb = kp + k0 * dk;  // key tiles are contiguous blocks of 16 * dk
          const T* vb = vp + k0 * dv;
          // one row group at a time: its S and P stay in L1 between the microkernels
          for (int64_t r = 0; r < rows_pad; r += kRows) {
            const T* qr = qp + r * dk;
            float *m = m_buf.data() + r, *l = l_buf.data() + r, *a = a_buf.data() + r;
            bool lazy = lazy_ok && k0 > 0 && std::all_of(m, m + kRows, [](float x) { return std::isfinite(x); });
#if NATIVEVIT_X86
            if (lazy) {
              float m_ref[kRows];
              for (int64_t g = 0; g < kRows; ++g) m_ref[g] = m[g] * kUnit;
              std::fill(vmax, vmax + kRows * 16, -std::numeric_limits<float>::infinity());
              std::fill(vsum, vsum + kRows * 16, 0.f);
              qk_p(qr, dk, kb, dk, keys_pad / 16, keys, scale_e, m_ref, p_buf.data(), kBlockN, vmax, vsum);
              // past the bound, or a sum that is not finite (NaN, +inf, a -inf score): redo it exactly
              lazy = lazy_finish(vmax, vsum, m_ref, scale_e, kLazyBound, l, a);
            }
#endif
            if (!lazy) {  // the row group's first block, or the bound was passed: exact max, then P
              qk(isa, qr, dk, kRows, kb, dk, keys_pad / 16, s_buf.data(), kBlockN);
              for (int64_t g = 0; g < kRows; ++g) {
                float m_new;
                const float sum = softmax_row(isa, s_buf.data() + g * kBlockN, keys_pad, keys, scale, m[g],
                                              p_buf.data() + g * kBlockN, &m_new);
                // rescale of what was summed against softmax_ref(m_old): 0 on the first block (m_old = -inf)
                a[g] = std::exp(m[g] - softmax_ref(m_new));
                l[g] = l[g] * a[g] + sum;
                m[g] = m_new;
              }
            }
            pv(isa, p_buf.data(), kBlockN, vb, dv, keys_pad, o_buf.data() + r * dv, dv, a);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          T* orow = od + ((start + it.q0 + r) * heads + it.head) * head_dim;
          // l >= 1 (the row maximum contributes exp(0)) unless every score of the row is -inf: then
          // l = 0 and O = 0, and the row is 0 as in SDPA's math (a NaN score left l = NaN)
          const float inv_l = l_buf[r] == 0.f ? 0.f : 1.f / l_buf[r];
          for (int64_t d = 0; d < head_dim; ++d) orow[d] = static_cast<T>(o_buf[r * dv + d] * inv_l);
        }
      }
    }
  });
}

}  // namespace

// max_seqlen is not needed here: the host offsets give every length.
at::Tensor varlen_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& cu_seqlens, int64_t /*max_seqlen*/, double scale) {
  check_attention_args("cpp_varlen_attention", q, k, v, cu_seqlens);
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "cpp_varlen_attention (cpu): takes float32 or bfloat16, got ", q.scalar_type());
  const std::vector<int64_t> offsets = host_offsets("cpp_varlen_attention", cu_seqlens, q.size(0));
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.numel() == 0) return out;
  const Isa isa = pick_isa(q.scalar_type());
  if (q.scalar_type() == at::kFloat) {
    varlen_attention_cpu_kernel<float>(q, k, v, out, offsets, static_cast<float>(scale), isa);
  } else {
    varlen_attention_cpu_kernel<c10::BFloat16>(q, k, v, out, offsets, static_cast<float>(scale), isa);
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd(const at::Tensor& grad_out, const at::Tensor& q,
                                                                    const at::Tensor& k, const at::Tensor& v,
                                                                    const at::Tensor& cu_seqlens,
                                                                    int64_t /*max_seqlen*/, double scale) {
  check_attention_args("cpp_varlen_attention_bwd", q, k, v, cu_seqlens);
  check_grad_args("cpp_varlen_attention_bwd", grad_out, q);
  const std::vector<int64_t> offsets = host_offsets("cpp_varlen_attention_bwd", cu_seqlens, q.size(0));
  at::Tensor dq = at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(k.sizes(), k.options());
  at::Tensor dv = at::zeros(v.sizes(), v.options());
  for (size_t s = 0; s + 1 < offsets.size(); ++s) {
    const int64_t start = offsets[s], n = offsets[s + 1] - start;
    if (n == 0) continue;
    // torch's fused CPU flash-attention backward after recomputing its forward (out, logsumexp):
    // 3-4x faster here than the ATen-matmul recompute (the CUDA backward's) on the mixed batch
    // (2304, 1220, 980, 400, 400, 20)
    const auto seg = [&](const at::Tensor& x) { return x.narrow(0, start, n).transpose(0, 1).unsqueeze(0); };
    const at::Tensor qs = seg(q), ks = seg(k), vs = seg(v);  // (1, heads, n, head_dim) views
    const auto [out, lse] = at::_scaled_dot_product_flash_attention_for_cpu(qs, ks, vs, 0.0, false, {}, scale);
    const auto [dqs, dks, dvs] =
        at::_scaled_dot_product_flash_attention_for_cpu_backward(seg(grad_out), qs, ks, vs, out, lse, 0.0, false,
                                                                 {}, scale);
    dq.narrow(0, start, n).copy_(dqs.squeeze(0).transpose(0, 1));
    dk.narrow(0, start, n).copy_(dks.squeeze(0).transpose(0, 1));
    dv.narrow(0, start, n).copy_(dvs.squeeze(0).transpose(0, 1));
  }
  return {dq, dk, dv};
}

std::string isa() { return isa_name(); }

}  // namespace nativevit::cpu
