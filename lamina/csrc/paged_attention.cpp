// Paged attention for the CPU (backend "cpu-paged", lamina/attention/cpu_paged.py).
//
// Reads K/V through each sequence's block table in place (no gathered copy of the context) and
// runs the FlashAttention recurrence in float32 over key tiles of TILE keys:
//   s_i = scale * q.k_i;  m' = max(m, max_i s_i);  c = exp(m - m');
//   l' = l * c + sum_i exp(s_i - m');  acc' = acc * c + sum_i exp(s_i - m') v_i
// Work items are (sequence, block of up to QUERY_BLOCK new tokens, KV head, key split): the
// query heads that share a KV head and the tokens of the block form the item's rows, so each
// key tile is loaded (and converted from bf16 / int8) once for all of them. When there are
// fewer items than threads can use (a few long decodes), each item's keys are cut into splits
// that run in parallel and are merged by their log-sum-exp weights (flash-decoding):
//   M = max_s m_s;  out = sum_s acc_s exp(m_s - M) / sum_s l_s exp(m_s - M)
// Split boundaries depend on the batch, so unlike exact_attention.cpp this kernel's bits may
// depend on what shares the call; it is built for speed and held to a tolerance.
//
// Masks: causal, a per-sequence tree mask among the new tokens (every cached token visible),
// or StreamingLLM's sinks + window by logical position, with keys cached un-rotated rotated
// at their cache index as each tile is loaded (struct Window). Vectorised with ATen's at::vec::Vectorized<float> (AVX2 / AVX-512 / NEON).
// at::vec picks its implementation from CPU_CAPABILITY_* macros, which ATen defines only for
// its own per-ISA builds: derive them from what -march=native enables (NEON is chosen from
// __aarch64__ alone), else Vectorized<float> is the generic scalar fallback.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2)
#define CPU_CAPABILITY_AVX2
#endif

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t TILE = 64;          // keys per tile
constexpr int64_t QUERY_BLOCK = 64;   // new tokens of one sequence per work item
constexpr int64_t MIN_SPLIT = 256;    // fewest keys worth a split of their own
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float to_float(float x) { return x; }
inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }
inline float to_float(at::Half x) { return static_cast<float>(x); }
inline float to_float(int8_t x) { return static_cast<float>(x); }

template <typename T>
inline void load_row(const T* src, float factor, int64_t dim, float* dst) {
  for (int64_t d = 0; d < dim; ++d) dst[d] = to_float(src[d]) * factor;
}

inline float dot(const float* a, const float* b, int64_t dim) {
  const int64_t n = Vec::size();
  Vec s0(0.0f), s1(0.0f);
  int64_t d = 0;
  for (; d + 2 * n <= dim; d += 2 * n) {
    s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
    s1 = at::vec::fmadd(Vec::loadu(a + d + n), Vec::loadu(b + d + n), s1);
  }
  for (; d + n <= dim; d += n) s0 = at::vec::fmadd(Vec::loadu(a + d), Vec::loadu(b + d), s0);
  float total = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, s0 + s1);
  for (; d < dim; ++d) total += a[d] * b[d];
  return total;
}

// y += a * x over dim floats
inline void axpy(float a, const float* x, float* y, int64_t dim) {
  const int64_t n = Vec::size();
  const Vec va(a);
  int64_t d = 0;
  for (; d + n <= dim; d += n) at::vec::fmadd(va, Vec::loadu(x + d), Vec::loadu(y + d)).store(y + d);
  for (; d < dim; ++d) y[d] += a * x[d];
}

inline void scale_row(float c, float* y, int64_t dim) {
  const int64_t n = Vec::size();
  const Vec vc(c);
  int64_t d = 0;
  for (; d + n <= dim; d += n) (Vec::loadu(y + d) * vc).store(y + d);
  for (; d < dim; ++d) y[d] *= c;
}

// scores[r, i] = q_r . k_i for RB rows and NV vectors of keys (K transposed: kt [D, TILE]),
// all RB x NV sums held in registers over the pass through d.
template <int RB, int NV>
inline void scores_micro(const float* q, int64_t dim, const float* kt, int64_t i0, float* s) {
  constexpr int64_t w = Vec::size();
  Vec acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = Vec(0.0f);
  for (int64_t d = 0; d < dim; ++d) {
    Vec k[NV];
    for (int v = 0; v < NV; ++v) k[v] = Vec::loadu(kt + d * TILE + i0 + v * w);
    for (int r = 0; r < RB; ++r) {
      const Vec qd(q[r * dim + d]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(qd, k[v], acc[r][v]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v].store(s + r * TILE + i0 + v * w);
}

template <int NV>
inline void scores_rows(const float* q, int64_t rows, int64_t dim, const float* kt, int64_t i0,
                        float* s) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) scores_micro<6, NV>(q + r * dim, dim, kt, i0, s + r * TILE);
  switch (rows - r) {
    case 5: scores_micro<5, NV>(q + r * dim, dim, kt, i0, s + r * TILE); break;
    case 4: scores_micro<4, NV>(q + r * dim, dim, kt, i0, s + r * TILE); break;
    case 3: scores_micro<3, NV>(q + r * dim, dim, kt, i0, s + r * TILE); break;
    case 2: scores_micro<2, NV>(q + r * dim, dim, kt, i0, s + r * TILE); break;
    case 1: scores_micro<1, NV>(q + r * dim, dim, kt, i0, s + r * TILE); break;
    default: break;
  }
}

// scores [rows, TILE] of a whole tile (keys past the tile's count score 0 and are ignored)
inline void scores_blocked(const float* q, int64_t rows, const float* kt, int64_t dim, float* s) {
  constexpr int64_t w = Vec::size();
  static_assert(TILE % (4 * w) == 0, "a tile is whole groups of 4 vectors");
  for (int64_t i0 = 0; i0 < TILE; i0 += 4 * w) scores_rows<4>(q, rows, dim, kt, i0, s);
}

// acc[r, d0 .. d0 + NV w) += sum_i p[r, i] v_i for RB rows, in registers over the keys.
template <int RB, int NV>
inline void values_micro(const float* p, const float* const* v, int64_t n, int64_t dim,
                         int64_t d0, float* acc) {
  constexpr int64_t w = Vec::size();
  Vec a[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int x = 0; x < NV; ++x) a[r][x] = Vec::loadu(acc + r * dim + d0 + x * w);
  for (int64_t i = 0; i < n; ++i) {
    Vec vi[NV];
    for (int x = 0; x < NV; ++x) vi[x] = Vec::loadu(v[i] + d0 + x * w);
    for (int r = 0; r < RB; ++r) {
      const Vec pr(p[r * TILE + i]);
      for (int x = 0; x < NV; ++x) a[r][x] = at::vec::fmadd(pr, vi[x], a[r][x]);
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int x = 0; x < NV; ++x) a[r][x].store(acc + r * dim + d0 + x * w);
}

template <int RB>
inline void values_rows(const float* p, const float* const* v, int64_t n, int64_t dim,
                        float* acc) {
  constexpr int64_t w = Vec::size();
  int64_t d0 = 0;
  for (; d0 + 4 * w <= dim; d0 += 4 * w) values_micro<RB, 4>(p, v, n, dim, d0, acc);
  for (; d0 + w <= dim; d0 += w) values_micro<RB, 1>(p, v, n, dim, d0, acc);
  for (; d0 < dim; ++d0)
    for (int r = 0; r < RB; ++r)
      for (int64_t i = 0; i < n; ++i) acc[r * dim + d0] += p[r * TILE + i] * v[i][d0];
}

// acc [rows, dim] += p [rows, TILE (first n used)] @ V (value rows v[0 .. n))
inline void accumulate_blocked(const float* p, int64_t rows, const float* const* v, int64_t n,
                               int64_t dim, float* acc) {
  int64_t r = 0;
  for (; r + 6 <= rows; r += 6) values_rows<6>(p + r * TILE, v, n, dim, acc + r * dim);
  switch (rows - r) {
    case 5: values_rows<5>(p + r * TILE, v, n, dim, acc + r * dim); break;
    case 4: values_rows<4>(p + r * TILE, v, n, dim, acc + r * dim); break;
    case 3: values_rows<3>(p + r * TILE, v, n, dim, acc + r * dim); break;
    case 2: values_rows<2>(p + r * TILE, v, n, dim, acc + r * dim); break;
    case 1: values_rows<1>(p + r * TILE, v, n, dim, acc + r * dim); break;
    default: break;
  }
}

// A key's K or V row as float: in place for a float32 cache, else converted into `buffer`.
template <typename KVT>
inline const float* key_row(const KVT* src, const float* scales, int64_t at, int64_t dim,
                            float* buffer) {
  if constexpr (std::is_same_v<KVT, float>) {
    if (!scales) return src + at * dim;
  }
  load_row(src + at * dim, scales ? scales[at] : 1.0f, dim, buffer);
  return buffer;
}

// StreamingLLM (sinks + window), keys cached un-rotated and rotated here at their cache index:
// cache index c is at position c (c < sink_limit) or c + offsets[s]; a query at cache index t
// (position t + offsets[s]) sees positions p <= its own with p < sinks or p > its - window.
struct Window {
  int64_t sinks, window, sink_limit;
  const int64_t* offsets;     // [S]
  const float* cos;           // [tables, length, rotary_dim]
  const float* sin;
  const int64_t* table_of;    // [S] which cos / sin table a sequence uses
  int64_t length, rotary_dim;
};

// x * cos + rotate_half(x) * sin on the first rotary_dim channels (layers/rotary.py)
inline void rotate(float* x, const float* cos, const float* sin, int64_t rotary_dim) {
  const int64_t half = rotary_dim / 2;
  for (int64_t d = 0; d < half; ++d) {
    const float a = x[d], b = x[d + half];
    x[d] = a * cos[d] - b * sin[d];
    x[d + half] = b * cos[d + half] + a * sin[d + half];
  }
}

struct Item {
  int64_t seq, t0, nq, kvh, lo, hi, part;  // part: index into the split scratch, or -1
};

template <typename QT, typename KVT>
void attend(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
            const float* k_scale, const float* v_scale, const at::Tensor& block_tables,
            const at::Tensor& query_starts, const at::Tensor& query_lens,
            const at::Tensor& context_lens, const bool* tree, const int64_t* tree_offsets,
            const Window* win, double scale, int64_t split_keys, at::Tensor& out) {
  const int64_t q_heads = q.size(1), dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t groups = q_heads / kv_heads, table_width = block_tables.size(1);
  const int64_t num_seqs = query_lens.size(0);
  const QT* qp = q.data_ptr<QT>();
  const KVT* kp = k_cache.data_ptr<KVT>();
  const KVT* vp = v_cache.data_ptr<KVT>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* qstarts = query_starts.data_ptr<int64_t>();
  const int64_t* qlens = query_lens.data_ptr<int64_t>();
  const int64_t* ctxs = context_lens.data_ptr<int64_t>();
  QT* op = out.data_ptr<QT>();
  const float fscale = static_cast<float>(scale);

  // Units of work: (sequence, block of new tokens, KV heads). A decode token's unit takes every
  // KV head at once: a token's K (and V) rows of all heads are one contiguous run in a block,
  // so reading them together streams whole blocks (one head at a time would pull each cache
  // line in once per head). A prefill block's unit takes one KV head (its tiles are reused by
  // many rows, so the loads amortise). A unit sees keys 0 .. ctx - qlen + t_last.
  std::vector<Item> units;
  for (int64_t s = 0; s < num_seqs; ++s)
    for (int64_t t0 = 0; t0 < qlens[s]; t0 += QUERY_BLOCK) {
      const int64_t nq = std::min(QUERY_BLOCK, qlens[s] - t0);
      // a tree mask may show any new token (it is not causal): then every key
      const int64_t keys = tree_offsets[s] >= 0 ? ctxs[s] : ctxs[s] - qlens[s] + t0 + nq;
      if (nq == 1)
        units.push_back({s, t0, nq, -1, 0, keys, -1});
      else
        for (int64_t h = 0; h < kv_heads; ++h) units.push_back({s, t0, nq, h, 0, keys, -1});
    }
  // Splits: split_keys > 0 cuts every unit's keys into pieces of that many keys (rounded up
  // to a tile), 0 decides from the thread count (enough items to keep every thread busy), < 0
  // never splits.
  const int64_t threads = at::get_num_threads();
  std::vector<Item> items;
  std::vector<int64_t> unit_parts(units.size() + 1, 0);  // first split row of each unit
  int64_t parts = 0;
  for (size_t u = 0; u < units.size(); ++u) {
    const Item& it = units[u];
    const int64_t keys = it.hi;
    int64_t pieces = 1;
    if (split_keys > 0) {
      pieces = (keys + split_keys - 1) / split_keys;
    } else if (split_keys == 0 && static_cast<int64_t>(units.size()) < 2 * threads) {
      const int64_t want = (2 * threads + units.size() - 1) / units.size();
      pieces = std::max<int64_t>(1, std::min<int64_t>(want, keys / MIN_SPLIT));
    }
    unit_parts[u] = parts;
    if (pieces <= 1) {
      items.push_back(it);
      continue;
    }
    const int64_t tiles = (keys + TILE - 1) / TILE;
    const int64_t per = (tiles + pieces - 1) / pieces;
    for (int64_t p = 0; p * per < tiles; ++p) {
      Item piece = it;
      piece.lo = p * per * TILE;
      piece.hi = std::min(keys, (p + 1) * per * TILE);
      piece.part = parts++;
      items.push_back(piece);
    }
  }
  unit_parts[units.size()] = parts;
  // an item's rows: (KV head of the item, token of the block, query head of that KV head)
  const int64_t rows_max = std::max(QUERY_BLOCK * groups, q_heads);
  // split results: m, l [parts, rows_max] and acc [parts, rows_max, dim]
  std::vector<float> part_m(parts * rows_max), part_l(parts * rows_max);
  std::vector<float> part_acc(parts * rows_max * dim);
  auto heads_of = [&](const Item& it) {
    return it.kvh >= 0 ? std::pair<int64_t, int64_t>(it.kvh, it.kvh + 1)
                       : std::pair<int64_t, int64_t>(0, kv_heads);
  };
  // q / out row of item row (h - h_lo, j, g)
  auto q_offset = [&](const Item& it, int64_t h, int64_t j, int64_t g) {
    return ((qstarts[it.seq] + it.t0 + j) * q_heads + h * groups + g) * dim;
  };

  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qrows(rows_max * dim), acc(rows_max * dim), m(rows_max), l(rows_max);
    std::vector<float> keys(TILE * dim), kt(dim * TILE), values(TILE * dim), s(rows_max * TILE);
    const float* krow[TILE];
    const float* vrow[TILE];
    for (int64_t idx = begin; idx < end; ++idx) {
      const Item& it = items[idx];
      const auto [h_lo, h_hi] = heads_of(it);
      const int64_t qlen = qlens[it.seq], ctx = ctxs[it.seq];
      const int64_t first_new = ctx - qlen;  // cache index of the sequence's first new token
      const int64_t* table = tables + it.seq * table_width;
      const bool* tmask = tree_offsets[it.seq] >= 0 ? tree + tree_offsets[it.seq] : nullptr;
      const int64_t head_rows = it.nq * groups, rows = (h_hi - h_lo) * head_rows;
      for (int64_t h = h_lo; h < h_hi; ++h)
        for (int64_t j = 0; j < it.nq; ++j)
          for (int64_t g = 0; g < groups; ++g)
            load_row(qp + q_offset(it, h, j, g), fscale, dim,
                     &qrows[((h - h_lo) * head_rows + j * groups + g) * dim]);
      std::fill(acc.begin(), acc.begin() + rows * dim, 0.0f);
      std::fill(m.begin(), m.begin() + rows, NEG_INF);
      std::fill(l.begin(), l.begin() + rows, 0.0f);
      const int64_t span = (h_hi - h_lo) * dim * static_cast<int64_t>(sizeof(KVT));
      for (int64_t k0 = it.lo; k0 < it.hi; k0 += TILE) {
        const int64_t n = std::min(TILE, it.hi - k0);
        // ask for the next tile's rows now: blocks are scattered, so the hardware prefetcher
        // cannot guess where the next one starts
        for (int64_t key = k0 + TILE; key < std::min(k0 + 2 * TILE, it.hi); ++key) {
          const int64_t slot = table[key / block_size] * block_size + key % block_size;
          const int64_t at = slot * kv_heads + h_lo;
          for (int64_t b = 0; b < span; b += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(kp + at * dim) + b);
            __builtin_prefetch(reinterpret_cast<const char*>(vp + at * dim) + b);
          }
        }
        for (int64_t h = h_lo; h < h_hi; ++h) {
          const int64_t base = (h - h_lo) * head_rows;  // the head's first row
          float* sh = &s[base * TILE];
          for (int64_t i = 0; i < n; ++i) {
            const int64_t key = k0 + i;
            const int64_t slot = table[key / block_size] * block_size + key % block_size;
            const int64_t at = slot * kv_heads + h;
            if (win) {  // un-rotated in the cache: rotate at the key's cache index
              load_row(kp + at * dim, k_scale ? k_scale[at] : 1.0f, dim, &keys[i * dim]);
              const int64_t row = (win->table_of[it.seq] * win->length + key) * win->rotary_dim;
              rotate(&keys[i * dim], win->cos + row, win->sin + row, win->rotary_dim);
              krow[i] = &keys[i * dim];
            } else {
              krow[i] = key_row(kp, k_scale, at, dim, &keys[i * dim]);
            }
            vrow[i] = key_row(vp, v_scale, at, dim, &values[i * dim]);
          }
          if (it.nq == 1) {  // decode: a dot product per (head, key)
            for (int64_t i = 0; i < n; ++i)
              for (int64_t r = 0; r < head_rows; ++r)
                sh[r * TILE + i] = dot(&qrows[(base + r) * dim], krow[i], dim);
          } else {
            for (int64_t i = 0; i < n; ++i)
              for (int64_t d = 0; d < dim; ++d) kt[d * TILE + i] = krow[i][d];
            for (int64_t i = n; i < TILE; ++i)
              for (int64_t d = 0; d < dim; ++d) kt[d * TILE + i] = 0.0f;
            scores_blocked(&qrows[base * dim], head_rows, kt.data(), dim, sh);
          }
          // masks, only where the tile reaches the new tokens
          if (win) {
            const int64_t off = win->offsets[it.seq];
            for (int64_t j = 0; j < it.nq; ++j) {
              const int64_t q_pos = first_new + it.t0 + j + off;
              for (int64_t i = 0; i < n; ++i) {
                const int64_t key = k0 + i;
                const int64_t k_pos = key < win->sink_limit ? key : key + off;
                const bool visible =
                    k_pos <= q_pos && (k_pos < win->sinks || k_pos > q_pos - win->window);
                if (!visible)
                  for (int64_t g = 0; g < groups; ++g) sh[(j * groups + g) * TILE + i] = NEG_INF;
              }
            }
          } else if (k0 + n > first_new + (tmask ? 0 : it.t0)) {
            for (int64_t j = 0; j < it.nq; ++j) {
              const int64_t t = it.t0 + j;  // index among the new tokens
              for (int64_t i = 0; i < n; ++i) {
                const int64_t key = k0 + i;
                bool visible;
                if (key < first_new)
                  visible = true;
                else if (tmask)
                  visible = tmask[t * qlen + (key - first_new)];
                else
                  visible = key <= first_new + t;
                if (!visible)
                  for (int64_t g = 0; g < groups; ++g) sh[(j * groups + g) * TILE + i] = NEG_INF;
              }
            }
          }
          for (int64_t r = base; r < base + head_rows; ++r) {
            float* sr = &s[r * TILE];
            float tile_max = NEG_INF;
            int64_t i = 0;
            {
              const int64_t w = Vec::size();
              Vec vmax(NEG_INF);
              for (; i + w <= n; i += w) vmax = at::vec::maximum(vmax, Vec::loadu(sr + i));
              tile_max = at::vec::vec_reduce_all<float>(
                  [](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, vmax);
              for (; i < n; ++i) tile_max = std::max(tile_max, sr[i]);
            }
            const float m_new = std::max(m[r], tile_max);
            if (m_new == NEG_INF) {  // nothing visible yet
              std::fill(sr, sr + TILE, 0.0f);
              continue;
            }
            const float c = std::exp(m[r] - m_new);
            const int64_t w = Vec::size();
            const Vec vm(m_new);
            Vec vsum(0.0f);
            i = 0;
            for (; i + w <= n; i += w) {
              const Vec e = (Vec::loadu(sr + i) - vm).exp_u20();
              e.store(sr + i);
              vsum = vsum + e;
            }
            float tile_sum =
                at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, vsum);
            for (; i < n; ++i) {
              sr[i] = std::exp(sr[i] - m_new);
              tile_sum += sr[i];
            }
            for (i = n; i < TILE; ++i) sr[i] = 0.0f;
            l[r] = l[r] * c + tile_sum;
            if (c != 1.0f) scale_row(c, &acc[r * dim], dim);
            m[r] = m_new;
          }
          accumulate_blocked(sh, head_rows, vrow, n, dim, &acc[base * dim]);
        }
      }
      if (it.part >= 0) {
        std::copy(m.begin(), m.begin() + rows, &part_m[it.part * rows_max]);
        std::copy(l.begin(), l.begin() + rows, &part_l[it.part * rows_max]);
        std::copy(acc.begin(), acc.begin() + rows * dim, &part_acc[it.part * rows_max * dim]);
        continue;
      }
      for (int64_t h = h_lo; h < h_hi; ++h)
        for (int64_t j = 0; j < it.nq; ++j)
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t r = (h - h_lo) * head_rows + j * groups + g;
            QT* dst = op + q_offset(it, h, j, g);
            const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<QT>(acc[r * dim + d] * inv);
          }
    }
  });

  if (parts == 0) return;
  // merge the splits of each split unit by their log-sum-exp weights
  at::parallel_for(0, static_cast<int64_t>(units.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> total(dim);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t p0 = unit_parts[u], p1 = unit_parts[u + 1];
      if (p1 == p0) continue;
      const Item& it = units[u];
      const auto [h_lo, h_hi] = heads_of(it);
      const int64_t head_rows = it.nq * groups;
      for (int64_t h = h_lo; h < h_hi; ++h)
        for (int64_t j = 0; j < it.nq; ++j)
          for (int64_t g = 0; g < groups; ++g) {
            const int64_t r = (h - h_lo) * head_rows + j * groups + g;
            float top = NEG_INF;
            for (int64_t p = p0; p < p1; ++p) top = std::max(top, part_m[p * rows_max + r]);
            std::fill(total.begin(), total.end(), 0.0f);
            float denom = 0.0f;
            if (top != NEG_INF)
              for (int64_t p = p0; p < p1; ++p) {
                const float mp = part_m[p * rows_max + r];
                if (mp == NEG_INF) continue;
                const float wgt = std::exp(mp - top);
                denom += part_l[p * rows_max + r] * wgt;
                axpy(wgt, &part_acc[(p * rows_max + r) * dim], total.data(), dim);
              }
            QT* dst = op + q_offset(it, h, j, g);
            const float inv = denom > 0.0f ? 1.0f / denom : 0.0f;
            for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<QT>(total[d] * inv);
          }
    }
  });
}

template <typename QT>
void dispatch_kv(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                 const c10::optional<at::Tensor>& k_scale, const c10::optional<at::Tensor>& v_scale,
                 const at::Tensor& block_tables, const at::Tensor& query_starts,
                 const at::Tensor& query_lens, const at::Tensor& context_lens, const bool* tree,
                 const int64_t* tree_offsets, const Window* win, double scale, int64_t split_keys,
                 at::Tensor& out) {
  if (k_cache.scalar_type() == at::kChar) {
    TORCH_CHECK(k_scale.has_value() && v_scale.has_value(), "an int8 cache needs its scales");
    attend<QT, int8_t>(q, k_cache, v_cache, k_scale->data_ptr<float>(), v_scale->data_ptr<float>(),
                       block_tables, query_starts, query_lens, context_lens, tree, tree_offsets,
                       win, scale, split_keys, out);
  } else {
    TORCH_CHECK(k_cache.scalar_type() == q.scalar_type(),
                "the cache dtype must be the query dtype or int8");
    attend<QT, QT>(q, k_cache, v_cache, nullptr, nullptr, block_tables, query_starts, query_lens,
                   context_lens, tree, tree_offsets, win, scale, split_keys, out);
  }
}

}  // namespace

// q [T, Hq, D]; k_cache / v_cache [blocks, block_size, Hkv, D] (q's dtype, or int8 with float32
// scales [blocks, block_size, Hkv]); block_tables [S, W] int64; query_starts / query_lens /
// context_lens [S] int64 (sequence s's new tokens are rows query_starts[s] .. + query_lens[s]
// of q, the last query_lens[s] of its context_lens[s] cached tokens); tree_masks: a flat bool
// tensor holding sequence s's [qlen, qlen] mask at tree_offsets[s] (-1: causal); split_keys:
// keys per split (> 0), 0 to decide from the thread count, < 0 never to split.
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const c10::optional<at::Tensor>& k_scale,
                           const c10::optional<at::Tensor>& v_scale,
                           const at::Tensor& block_tables, const at::Tensor& query_starts,
                           const at::Tensor& query_lens, const at::Tensor& context_lens,
                           const c10::optional<at::Tensor>& tree_masks,
                           const c10::optional<at::Tensor>& tree_offsets, double scale,
                           int64_t split_keys, const c10::optional<at::Tensor>& window,
                           const c10::optional<at::Tensor>& rot_cos,
                           const c10::optional<at::Tensor>& rot_sin,
                           const c10::optional<at::Tensor>& rot_table_of) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous(),
              "inputs must be contiguous");
  TORCH_CHECK(q.size(1) % k_cache.size(2) == 0, "query heads must be a multiple of KV heads");
  for (const auto* t : {&block_tables, &query_starts, &query_lens, &context_lens})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "index tensors: int64");
  for (const auto& s : {k_scale, v_scale})
    TORCH_CHECK(!s.has_value() || (s->scalar_type() == at::kFloat && s->is_contiguous()),
                "scales must be contiguous float32");
  const bool* tree = nullptr;
  const int64_t* offsets = nullptr;
  std::vector<int64_t> causal(query_lens.size(0), -1);
  if (tree_masks.has_value()) {
    TORCH_CHECK(tree_offsets.has_value() && tree_masks->scalar_type() == at::kBool &&
                    tree_offsets->scalar_type() == at::kLong && tree_masks->is_contiguous() &&
                    tree_offsets->is_contiguous(),
                "tree masks: contiguous bool with int64 offsets");
    tree = tree_masks->data_ptr<bool>();
    offsets = tree_offsets->data_ptr<int64_t>();
  } else {
    offsets = causal.data();
  }
  // window: int64 [3 + S] = sinks, window, sink_limit, then each sequence's offset; with
  // rot_cos / rot_sin float32 [tables, length, rotary_dim] and rot_table_of int64 [S]
  Window win_storage{};
  const Window* winp = nullptr;
  if (window.has_value()) {
    TORCH_CHECK(rot_cos.has_value() && rot_sin.has_value() && rot_table_of.has_value(),
                "a window needs its rotary tables");
    TORCH_CHECK(window->scalar_type() == at::kLong && window->is_contiguous() &&
                    window->numel() == 3 + query_lens.size(0),
                "window: int64 [3 + S]");
    TORCH_CHECK(rot_cos->scalar_type() == at::kFloat && rot_sin->scalar_type() == at::kFloat &&
                    rot_cos->is_contiguous() && rot_sin->is_contiguous() && rot_cos->dim() == 3 &&
                    rot_cos->sizes() == rot_sin->sizes() &&
                    rot_table_of->scalar_type() == at::kLong && rot_table_of->is_contiguous(),
                "rotary tables: contiguous float32 [tables, length, rotary_dim], int64 [S]");
    const int64_t* w = window->data_ptr<int64_t>();
    win_storage = Window{w[0], w[1], w[2], w + 3,
                         rot_cos->data_ptr<float>(), rot_sin->data_ptr<float>(),
                         rot_table_of->data_ptr<int64_t>(), rot_cos->size(1), rot_cos->size(2)};
    const int64_t* ctx = context_lens.data_ptr<int64_t>();
    for (int64_t i = 0; i < query_lens.size(0); ++i)
      TORCH_CHECK(ctx[i] <= win_storage.length, "rotary table shorter than a context");
    winp = &win_storage;
  }
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat:
      dispatch_kv<float>(q, k_cache, v_cache, k_scale, v_scale, block_tables, query_starts,
                         query_lens, context_lens, tree, offsets, winp, scale, split_keys, out);
      break;
    case at::kBFloat16:
      dispatch_kv<at::BFloat16>(q, k_cache, v_cache, k_scale, v_scale, block_tables, query_starts,
                                query_lens, context_lens, tree, offsets, winp, scale, split_keys, out);
      break;
    case at::kHalf:
      dispatch_kv<at::Half>(q, k_cache, v_cache, k_scale, v_scale, block_tables, query_starts,
                            query_lens, context_lens, tree, offsets, winp, scale, split_keys, out);
      break;
    default:
      TORCH_CHECK(false, "paged_attention: unsupported dtype ", q.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "attention over a paged KV cache read in place (split-K for long contexts)");
}
