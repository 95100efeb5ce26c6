// Batch-invariant attention over the paged KV cache (lamina/attention/exact.py).
//
// Each (query token, query head) row is reduced on its own, over its visible keys 0 .. n-1 in
// key order, in tiles that start at key 0 and hold TILE keys: the order of every floating-point
// operation that produces a row depends only on that row's query, its keys and its key count.
// So a token gets bit-identical attention whatever else is in the batch, whether its sequence
// is decoding one token or prefilling a chunk of many, and wherever chunk boundaries fall.
// Rows are spread over threads whole, so the thread count does not change a result either.
//
// Per tile, the FlashAttention recurrence in float32:
//   s_i = scale * q.k_i;  m' = max(m, max_i s_i);  c = exp(m - m');
//   l' = l * c + sum_i exp(s_i - m');  acc' = acc * c + sum_i exp(s_i - m') v_i
// and the output is acc / l. exp is a fixed polynomial (below) rather than libm's, so that
// the compiler may vectorize it without changing its value.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int TILE = 16;  // keys per tile
constexpr int LANES = 16;  // independent partial sums of a dot product

// exp(x) for x <= 0 (every argument here is), to ~2 ulp: 2^n * p(r) with x = n ln2 + r.
inline float exp_nonpositive(float x) {
  const bool underflow = !(x >= -87.0f);  // below float's normal range, -inf or NaN
  x = underflow ? -87.0f : x;
  const float log2e = 1.44269504088896341f;
  const float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;
  float n = std::nearbyint(x * log2e);
  float r = x - n * ln2_hi - n * ln2_lo;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return underflow ? 0.0f : p * scale;
}

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(at::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, float factor, int dim, float* dst) {
  for (int d = 0; d < dim; ++d) dst[d] = to_float(src[d]) * factor;
}

// q . k with LANES fixed partial sums combined in a fixed tree.
inline float dot(const float* q, const float* k, int dim) {
  float part[LANES] = {0.0f};
  int d = 0;
  for (; d + LANES <= dim; d += LANES)
    for (int l = 0; l < LANES; ++l) part[l] += q[d + l] * k[d + l];
  for (int l = 0; d + l < dim; ++l) part[l] += q[d + l] * k[d + l];
  for (int width = LANES / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) part[l] += part[l + width];
  return part[0];
}

template <typename QT, typename KVT>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const float* k_scale, const float* v_scale, const at::Tensor& block_tables,
            const at::Tensor& token_seq, const at::Tensor& token_keys, double scale,
            at::Tensor& out) {
  const int64_t tokens = q.size(0), q_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t groups = q_heads / kv_heads, table_width = block_tables.size(1);
  const QT* qp = q.data_ptr<QT>();
  const KVT* kp = k_cache.data_ptr<KVT>();
  const KVT* vp = v_cache.data_ptr<KVT>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* seqs = token_seq.data_ptr<int64_t>();
  const int64_t* nkeys = token_keys.data_ptr<int64_t>();
  QT* op = out.data_ptr<QT>();
  const float fscale = static_cast<float>(scale);

  // One work item: a token's query heads that share a KV head (each still its own row: the
  // tile of keys is loaded once for them, their arithmetic is separate).
  at::parallel_for(0, tokens * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qrows(groups * dim), acc(groups * dim), keys(TILE * dim),
        values(TILE * dim), m(groups), l(groups), s(groups * TILE);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / kv_heads, kvh = item % kv_heads;
      const int64_t* table = tables + seqs[t] * table_width;
      const int64_t n = nkeys[t];
      for (int64_t g = 0; g < groups; ++g)
        load_row(qp + (t * q_heads + kvh * groups + g) * dim, fscale, dim, &qrows[g * dim]);
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t first = 0; first < n; first += TILE) {
        const int count = static_cast<int>(std::min<int64_t>(TILE, n - first));
        for (int i = 0; i < count; ++i) {
          const int64_t key = first + i;
          const int64_t slot = table[key / block_size] * block_size + key % block_size;
          const int64_t at = slot * kv_heads + kvh;
          load_row(kp + at * dim, k_scale ? k_scale[at] : 1.0f, dim, &keys[i * dim]);
          load_row(vp + at * dim, v_scale ? v_scale[at] : 1.0f, dim, &values[i * dim]);
        }
        for (int64_t g = 0; g < groups; ++g) {
          float* sg = &s[g * TILE];
          float tile_max = -std::numeric_limits<float>::infinity();
          for (int i = 0; i < count; ++i) {
            sg[i] = dot(&qrows[g * dim], &keys[i * dim], dim);
            tile_max = std::max(tile_max, sg[i]);
          }
          const float m_new = std::max(m[g], tile_max);
          const float c = exp_nonpositive(m[g] - m_new);
          float tile_sum = 0.0f;
          for (int i = 0; i < count; ++i) {
            sg[i] = exp_nonpositive(sg[i] - m_new);
            tile_sum += sg[i];
          }
          l[g] = l[g] * c + tile_sum;
          float* ag = &acc[g * dim];
          for (int64_t d = 0; d < dim; ++d) ag[d] *= c;
          for (int i = 0; i < count; ++i) {
            const float pi = sg[i];
            const float* vi = &values[i * dim];
            for (int64_t d = 0; d < dim; ++d) ag[d] += pi * vi[d];
          }
          m[g] = m_new;
        }
      }
      for (int64_t g = 0; g < groups; ++g) {
        QT* dst = op + (t * q_heads + kvh * groups + g) * dim;
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<QT>(acc[g * dim + d] * inv);
      }
    }
  });
}

template <typename QT>
void dispatch_kv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                 const at::Tensor& block_tables, const at::Tensor& token_seq,
                 const at::Tensor& token_keys, double scale, at::Tensor& out) {
  if (k_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs its scales");
    attend<QT, int8_t>(q, k_cache, v_cache, k_scale->data_ptr<float>(),
                       v_scale->data_ptr<float>(), block_tables, token_seq, token_keys, scale,
                       out);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(),
                "the cache dtype must be the query dtype or int8");
    attend<QT, QT>(q, k_cache, v_cache, nullptr, nullptr, block_tables, token_seq, token_keys,
                   scale, out);
  }
}

}  // namespace

// q [T, Hq, D]; k_cache / v_cache [blocks, block_size, Hkv, D] (q's dtype, or int8 with
// float32 scales [blocks, block_size, Hkv]); block_tables [S, W] int64; token_seq [T] int64
// (each token's row in block_tables); token_keys [T] int64 (how many keys, from key 0, the
// token sees). Returns [T, Hq, D] in q's dtype.
at::Tensor exact_paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache,
                                 const c10::optional<at::Tensor>& k_scale,
                                 const c10::optional<at::Tensor>& v_scale,
                                 const at::Tensor& block_tables, const at::Tensor& token_seq,
                                 const at::Tensor& token_keys, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && token_seq.scalar_type() == at::kLong &&
                  token_keys.scalar_type() == at::kLong,
              "index tensors must be int64");
  for (const auto& s : {k_scale, v_scale})
    TORCH_CHECK(!s.has_value() || (s->scalar_type() == at::kFloat && s->is_contiguous()),
                "scales must be contiguous float32");
  at::Tensor out = at::empty_like(q);
  const auto tables = block_tables.contiguous();
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_kv<float>(q, k_cache, v_cache, k_scale, v_scale, tables, token_seq, token_keys,
                         scale, out);
      break;
    case at::kBFloat16:
      dispatch_kv<at::BFloat16>(q, k_cache, v_cache, k_scale, v_scale, tables, token_seq,
                                token_keys, scale, out);
      break;
    case at::kHalf:
      dispatch_kv<at::Half>(q, k_cache, v_cache, k_scale, v_scale, tables, token_seq,
                            token_keys, scale, out);
      break;
    default:
      TORCH_CHECK(false, "exact_paged_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("exact_paged_attention", &exact_paged_attention,
        "batch-invariant attention over a paged KV cache");
}
