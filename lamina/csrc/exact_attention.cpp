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
constexpr int64_t QUERY_BLOCK = 16;  // tokens of one sequence sharing each key tile's loads

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

  // Work items: up to QUERY_BLOCK consecutive tokens of one sequence, with the query heads
  // that share one KV head. Each key tile is loaded (and converted) once for all of them; every
  // (token, head) row still runs its own arithmetic over its own keys, exactly as it would alone.
  std::vector<int64_t> starts;
  for (int64_t t = 0; t < tokens; ++t)
    if (t == 0 || seqs[t] != seqs[t - 1] || t - starts.back() == QUERY_BLOCK) starts.push_back(t);
  starts.push_back(tokens);
  const int64_t blocks = static_cast<int64_t>(starts.size()) - 1;

  at::parallel_for(0, blocks * kv_heads, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows_max = QUERY_BLOCK * groups;
    std::vector<float> qrows(rows_max * dim), acc(rows_max * dim), m(rows_max), l(rows_max);
    std::vector<float> keys(TILE * dim), values(TILE * dim);
    float s[TILE];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t block = item / kv_heads, kvh = item % kv_heads;
      const int64_t t0 = starts[block], count_t = starts[block + 1] - t0;
      const int64_t* table = tables + seqs[t0] * table_width;
      int64_t n_max = 0;
      for (int64_t j = 0; j < count_t; ++j) {
        n_max = std::max(n_max, nkeys[t0 + j]);
        for (int64_t g = 0; g < groups; ++g)
          load_row(qp + ((t0 + j) * q_heads + kvh * groups + g) * dim, fscale, dim,
                   &qrows[(j * groups + g) * dim]);
      }
      const int64_t rows = count_t * groups;
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.0f);
      std::fill(m.begin(), m.begin() + rows, -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.begin() + rows, 0.0f);
      for (int64_t first = 0; first < n_max; first += TILE) {
        const int loaded = static_cast<int>(std::min<int64_t>(TILE, n_max - first));
        for (int i = 0; i < loaded; ++i) {
          const int64_t key = first + i;
          const int64_t slot = table[key / block_size] * block_size + key % block_size;
          const int64_t at = slot * kv_heads + kvh;
          load_row(kp + at * dim, k_scale ? k_scale[at] : 1.0f, dim, &keys[i * dim]);
          load_row(vp + at * dim, v_scale ? v_scale[at] : 1.0f, dim, &values[i * dim]);
        }
        for (int64_t j = 0; j < count_t; ++j) {
          const int64_t n = nkeys[t0 + j];
          if (first >= n) continue;
          const int count = static_cast<int>(std::min<int64_t>(TILE, n - first));
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t r = j * groups + g;
            float tile_max = -std::numeric_limits<float>::infinity();
            for (int i = 0; i < count; ++i) {
              s[i] = dot(&qrows[r * dim], &keys[i * dim], dim);
              tile_max = std::max(tile_max, s[i]);
            }
            const float m_new = std::max(m[r], tile_max);
            const float c = exp_nonpositive(m[r] - m_new);
            float tile_sum = 0.0f;
            for (int i = 0; i < count; ++i) {
              s[i] = exp_nonpositive(s[i] - m_new);
              tile_sum += s[i];
            }
            l[r] = l[r] * c + tile_sum;
            float* ar = &acc[r * dim];
            for (int64_t d = 0; d < dim; ++d) ar[d] *= c;
            for (int i = 0; i < count; ++i) {
              const float pi = s[i];
              const float* vi = &values[i * dim];
              for (int64_t d = 0; d < dim; ++d) ar[d] += pi * vi[d];
            }
            m[r] = m_new;
          }
        }
      }
      for (int64_t j = 0; j < count_t; ++j)
        for (int64_t g = 0; g < groups; ++g) {
          const int64_t r = j * groups + g;
          QT* dst = op + ((t0 + j) * q_heads + kvh * groups + g) * dim;
          const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
          for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<QT>(acc[r * dim + d] * inv);
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
