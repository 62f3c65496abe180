// The full-size passes (see planes.h). Each reads its inputs from memory once (the
// statistics of a contiguous plane read it a second time, from cache); contiguous input is
// split over planes, channels-last input over blocks of rows (one row = the C channels of
// one pixel), with per-block partial sums combined in a fixed order so that results do not
// depend on the number of threads.
#include "planes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

namespace syncsn {
namespace {

// Elements per parallel task (ATen's own grain size).
constexpr int64_t kGrain = 32768;

// Channels-last statistics are one pass about a shift k per (n, c): the mean of the plane's
// first kPilot elements. Then (mean - k)^2 <= (L / kPilot) var, which bounds the cancellation
// in sum (x - k)^2 - (sum (x - k))^2 / L to a factor L / kPilot of double rounding.
// (Contiguous planes take two passes instead, the second from cache.)
constexpr int64_t kPilot = 16;

int64_t items_per_task(int64_t item_size) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(item_size, 1));
}

template <typename scalar_t>
inline at::opmath_type<scalar_t> load(const scalar_t& v) {
  return static_cast<at::opmath_type<scalar_t>>(v);
}

template <typename scalar_t>
inline double load_double(const scalar_t& v) {
  return static_cast<double>(load(v));
}

at::MemoryFormat channels_last_format(int64_t dim) {
  return dim == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

at::Tensor empty_planes(const at::Tensor& x, const Planes& p) {
  auto format = p.channels_last ? channels_last_format(x.dim()) : at::MemoryFormat::Contiguous;
  return at::empty(x.sizes(), x.options().memory_format(format));
}

void check_coefficients(
    const at::Tensor& t, const Planes& p, at::ScalarType type, const char* name) {
  TORCH_CHECK(
      t.scalar_type() == type && t.is_contiguous() && t.numel() == p.n * p.c,
      "syncsn native: ",
      name,
      " must be a contiguous (N, C) ",
      type,
      " tensor, got ",
      t.scalar_type(),
      " of shape ",
      t.sizes());
}

// Sums, for every sample n, body(n, l_begin, l_end, acc) over blocks of rows; each block
// accumulates into its own zeroed `width` doubles. Returns (N, width) sums.
template <typename F>
std::vector<double> sum_row_blocks(const Planes& p, int64_t width, const F& body) {
  const int64_t rows = std::min(p.l, items_per_task(p.c));
  const int64_t blocks = (p.l + rows - 1) / rows;
  std::vector<double> partial(p.n * blocks * width, 0.0);
  at::parallel_for(0, p.n * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks;
      const int64_t first = (t % blocks) * rows;
      body(n, first, std::min(p.l, first + rows), partial.data() + t * width);
    }
  });
  std::vector<double> total(p.n * width, 0.0);
  for (int64_t n = 0; n < p.n; ++n) {
    double* out = total.data() + n * width;
    for (int64_t b = 0; b < blocks; ++b) {
      const double* in = partial.data() + (n * blocks + b) * width;
      for (int64_t j = 0; j < width; ++j) {
        out[j] += in[j];
      }
    }
  }
  return total;
}

// The mean of the first elements of a plane whose elements are `stride` apart.
template <typename scalar_t>
double pilot_shift(const scalar_t* x, int64_t length, int64_t stride) {
  const int64_t count = std::min(length, kPilot);
  double sum = 0.0;
  for (int64_t i = 0; i < count; ++i) {
    sum += load_double(x[i * stride]);
  }
  return count > 0 ? sum / static_cast<double>(count) : 0.0;
}

// Lanes of the reductions: independent partial sums, so that a reduction is not limited by
// the latency of one chain of additions; combined pairwise at the end.
constexpr int kLanes = 16;

// Four doubles in one register (GCC/Clang vector extension; AVX where available). The
// reductions keep four such accumulators per sum: a single chain of additions would wait on
// the latency of each one.
typedef double double4 __attribute__((vector_size(32)));
typedef float float4_t __attribute__((vector_size(16)));

template <typename scalar_t>
inline double4 load4(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    double4 v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
#if defined(__AVX__)
  // One conversion instruction each (the generic code below compiles to several).
  if constexpr (std::is_same_v<scalar_t, float>) {
    return (double4)_mm256_cvtps_pd(_mm_loadu_ps(p));
  }
#if defined(__F16C__)
  if constexpr (std::is_same_v<scalar_t, at::Half>) {
    const __m128i bits = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return (double4)_mm256_cvtps_pd(_mm_cvtph_ps(bits));
  }
#endif
#if defined(__AVX2__)
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const __m128i bits = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return (double4)_mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(bits, 16)));
  }
#endif
#endif
  if constexpr (std::is_same_v<scalar_t, float>) {
    float4_t v;
    std::memcpy(&v, p, sizeof(v));
    return __builtin_convertvector(v, double4);
  }
  return double4{load_double(p[0]), load_double(p[1]), load_double(p[2]), load_double(p[3])};
}

inline double sum_of(double4 v) {
  return (v[0] + v[2]) + (v[1] + v[3]);
}

inline void add_to(double* out, double4 v) {
  out[0] += v[0];
  out[1] += v[1];
  out[2] += v[2];
  out[3] += v[3];
}

// sum_i x[i] over `count` contiguous elements.
template <typename scalar_t>
double contiguous_sum(const scalar_t* x, int64_t count) {
  double4 a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    a0 += load4(x + i);
    a1 += load4(x + i + 4);
    a2 += load4(x + i + 8);
    a3 += load4(x + i + 12);
  }
  double tail = 0.0;
  for (; i < count; ++i) {
    tail += load_double(x[i]);
  }
  return sum_of((a0 + a1) + (a2 + a3)) + tail;
}

// s1 = sum (x - k), s2 = sum (x - k)^2 over `count` contiguous elements.
template <typename scalar_t>
void contiguous_moments(const scalar_t* x, int64_t count, double k, double& s1, double& s2) {
  double4 u0{}, u1{}, u2{}, u3{};
  double4 v0{}, v1{}, v2{}, v3{};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const double4 d0 = load4(x + i) - k;
    const double4 d1 = load4(x + i + 4) - k;
    const double4 d2 = load4(x + i + 8) - k;
    const double4 d3 = load4(x + i + 12) - k;
    u0 += d0;
    u1 += d1;
    u2 += d2;
    u3 += d3;
    v0 += d0 * d0;
    v1 += d1 * d1;
    v2 += d2 * d2;
    v3 += d3 * d3;
  }
  double t1 = 0.0;
  double t2 = 0.0;
  for (; i < count; ++i) {
    const double d = load_double(x[i]) - k;
    t1 += d;
    t2 += d * d;
  }
  s1 = sum_of((u0 + u1) + (u2 + u3)) + t1;
  s2 = sum_of((v0 + v1) + (v2 + v3)) + t2;
}

// s1 = sum g, s2 = sum g * (x - k) over `count` contiguous elements.
template <typename scalar_t>
void contiguous_dot(
    const scalar_t* x, const scalar_t* g, int64_t count, double k, double& s1, double& s2) {
  double4 u0{}, u1{}, u2{}, u3{};
  double4 v0{}, v1{}, v2{}, v3{};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    const double4 g0 = load4(g + i);
    const double4 g1 = load4(g + i + 4);
    const double4 g2 = load4(g + i + 8);
    const double4 g3 = load4(g + i + 12);
    u0 += g0;
    u1 += g1;
    u2 += g2;
    u3 += g3;
    v0 += g0 * (load4(x + i) - k);
    v1 += g1 * (load4(x + i + 4) - k);
    v2 += g2 * (load4(x + i + 8) - k);
    v3 += g3 * (load4(x + i + 12) - k);
  }
  double t1 = 0.0;
  double t2 = 0.0;
  for (; i < count; ++i) {
    const double gi = load_double(g[i]);
    t1 += gi;
    t2 += gi * (load_double(x[i]) - k);
  }
  s1 = sum_of((u0 + u1) + (u2 + u3)) + t1;
  s2 = sum_of((v0 + v1) + (v2 + v3)) + t2;
}

// Channels-last rows l0 <= l < l1 of one sample (base x, C channels): adds, per channel c,
// sum_l (x - k[c]) to s1[c] and sum_l (x - k[c])^2 to s2[c] (with g == nullptr), or
// sum_l g to s1[c] and sum_l g * (x - k[c]) to s2[c]. Channels go in groups of 16, then 4,
// whose sums stay in registers over the rows.
template <typename scalar_t>
void rows_sums(
    const scalar_t* x,
    const scalar_t* g,
    int64_t l0,
    int64_t l1,
    int64_t channels,
    const double* k,
    double* s1,
    double* s2) {
  int64_t c0 = 0;
  for (; c0 + 16 <= channels; c0 += 16) {
    const double4 k0 = load4(k + c0);
    const double4 k1 = load4(k + c0 + 4);
    const double4 k2 = load4(k + c0 + 8);
    const double4 k3 = load4(k + c0 + 12);
    double4 u0{}, u1{}, u2{}, u3{};
    double4 v0{}, v1{}, v2{}, v3{};
    for (int64_t l = l0; l < l1; ++l) {
      const scalar_t* row = x + l * channels + c0;
      const double4 d0 = load4(row) - k0;
      const double4 d1 = load4(row + 4) - k1;
      const double4 d2 = load4(row + 8) - k2;
      const double4 d3 = load4(row + 12) - k3;
      if (g == nullptr) {
        u0 += d0;
        u1 += d1;
        u2 += d2;
        u3 += d3;
        v0 += d0 * d0;
        v1 += d1 * d1;
        v2 += d2 * d2;
        v3 += d3 * d3;
      } else {
        const scalar_t* grow = g + l * channels + c0;
        const double4 g0 = load4(grow);
        const double4 g1 = load4(grow + 4);
        const double4 g2 = load4(grow + 8);
        const double4 g3 = load4(grow + 12);
        u0 += g0;
        u1 += g1;
        u2 += g2;
        u3 += g3;
        v0 += g0 * d0;
        v1 += g1 * d1;
        v2 += g2 * d2;
        v3 += g3 * d3;
      }
    }
    add_to(s1 + c0, u0);
    add_to(s1 + c0 + 4, u1);
    add_to(s1 + c0 + 8, u2);
    add_to(s1 + c0 + 12, u3);
    add_to(s2 + c0, v0);
    add_to(s2 + c0 + 4, v1);
    add_to(s2 + c0 + 8, v2);
    add_to(s2 + c0 + 12, v3);
  }
  for (; c0 + 4 <= channels; c0 += 4) {
    const double4 k0 = load4(k + c0);
    double4 u0{};
    double4 v0{};
    for (int64_t l = l0; l < l1; ++l) {
      const double4 d0 = load4(x + l * channels + c0) - k0;
      if (g == nullptr) {
        u0 += d0;
        v0 += d0 * d0;
      } else {
        const double4 g0 = load4(g + l * channels + c0);
        u0 += g0;
        v0 += g0 * d0;
      }
    }
    add_to(s1 + c0, u0);
    add_to(s2 + c0, v0);
  }
  for (; c0 < channels; ++c0) {
    double u = 0.0;
    double v = 0.0;
    for (int64_t l = l0; l < l1; ++l) {
      const double d = load_double(x[l * channels + c0]) - k[c0];
      const double w = g == nullptr ? d : load_double(g[l * channels + c0]);
      u += w;
      v += w * d;
    }
    s1[c0] += u;
    s2[c0] += v;
  }
}

template <typename scalar_t>
void stats_kernel(
    const scalar_t* x,
    const Planes& p,
    at::opmath_type<scalar_t>* centre,
    double* mean,
    double* m2) {
  using arith_t = at::opmath_type<scalar_t>;
  const int64_t length = p.l;
  const double inv_length = length > 0 ? 1.0 / static_cast<double>(length) : 0.0;
  auto finish = [&](int64_t q, double shift, double s1, double s2) {
    const double m = shift + s1 * inv_length;
    mean[q] = m;
    m2[q] = std::max(s2 - s1 * (s1 * inv_length), 0.0);
    centre[q] = static_cast<arith_t>(m);
  };
  if (!p.channels_last) {
    at::parallel_for(0, p.n * p.c, items_per_task(length), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* xp = x + q * length;
        // Two passes over the plane (the second from cache): sums about a first mean.
        const double shift = contiguous_sum(xp, length) * inv_length;
        double s1;
        double s2;
        contiguous_moments(xp, length, shift, s1, s2);
        finish(q, shift, s1, s2);
      }
    });
    return;
  }
  const int64_t channels = p.c;
  std::vector<double> shifts(p.n * channels);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      shifts[n * channels + c] = pilot_shift(x + n * length * channels + c, length, channels);
    }
  }
  auto block = [&](int64_t n, int64_t l0, int64_t l1, double* acc) {
    const scalar_t* xs = x + n * length * channels;
    const double* k = shifts.data() + n * channels;
    rows_sums<scalar_t>(xs, nullptr, l0, l1, channels, k, acc, acc + channels);
  };
  const auto sums = sum_row_blocks(p, 2 * channels, block);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      const double* s = sums.data() + n * 2 * channels;
      finish(n * channels + c, shifts[n * channels + c], s[c], s[channels + c]);
    }
  }
}

template <typename scalar_t>
void affine_kernel(
    const scalar_t* x,
    scalar_t* y,
    const Planes& p,
    const at::opmath_type<scalar_t>* centre,
    const at::opmath_type<scalar_t>* scale,
    const at::opmath_type<scalar_t>* shift) {
  using arith_t = at::opmath_type<scalar_t>;
  const int64_t length = p.l;
  const int64_t channels = p.c;
  if (!p.channels_last) {
    at::parallel_for(0, p.n * channels, items_per_task(length), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* xp = x + q * length;
        scalar_t* yp = y + q * length;
        const arith_t k = centre[q];
        const arith_t a = scale[q];
        const arith_t b = shift[q];
#pragma omp simd
        for (int64_t i = 0; i < length; ++i) {
          yp[i] = static_cast<scalar_t>((load(xp[i]) - k) * a + b);
        }
      }
    });
    return;
  }
  at::parallel_for(0, p.n * length, items_per_task(channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      // The rows of one sample share its coefficients.
      const int64_t n = row / length;
      const int64_t stop = std::min(end, (n + 1) * length);
      const arith_t* k = centre + n * channels;
      const arith_t* a = scale + n * channels;
      const arith_t* b = shift + n * channels;
      for (; row < stop; ++row) {
        const scalar_t* xp = x + row * channels;
        scalar_t* yp = y + row * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          yp[c] = static_cast<scalar_t>((load(xp[c]) - k[c]) * a[c] + b[c]);
        }
      }
    }
  });
}

template <typename scalar_t>
void sums_kernel(
    const scalar_t* x,
    const scalar_t* dy,
    const Planes& p,
    const at::opmath_type<scalar_t>* centre,
    double* s1_out,
    double* s2_out) {
  const int64_t length = p.l;
  const int64_t channels = p.c;
  if (!p.channels_last) {
    at::parallel_for(0, p.n * channels, items_per_task(length), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* xp = x + q * length;
        const scalar_t* gp = dy + q * length;
        contiguous_dot(xp, gp, length, static_cast<double>(centre[q]), s1_out[q], s2_out[q]);
      }
    });
    return;
  }
  std::vector<double> centre64(p.n * channels);
  for (int64_t q = 0; q < p.n * channels; ++q) {
    centre64[q] = static_cast<double>(centre[q]);
  }
  auto block = [&](int64_t n, int64_t l0, int64_t l1, double* acc) {
    const int64_t offset = n * length * channels;
    const double* k = centre64.data() + n * channels;
    rows_sums(x + offset, dy + offset, l0, l1, channels, k, acc, acc + channels);
  };
  const auto sums = sum_row_blocks(p, 2 * channels, block);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < channels; ++c) {
      s1_out[n * channels + c] = sums[n * 2 * channels + c];
      s2_out[n * channels + c] = sums[n * 2 * channels + channels + c];
    }
  }
}

template <typename scalar_t>
void combine_kernel(
    const scalar_t* x,
    const scalar_t* dy,
    scalar_t* dx,
    const Planes& p,
    const at::opmath_type<scalar_t>* centre,
    const at::opmath_type<scalar_t>* k_dy,
    const at::opmath_type<scalar_t>* k_x,
    const at::opmath_type<scalar_t>* k_0) {
  using arith_t = at::opmath_type<scalar_t>;
  const int64_t length = p.l;
  const int64_t channels = p.c;
  if (!p.channels_last) {
    at::parallel_for(0, p.n * channels, items_per_task(length), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const scalar_t* xp = x + q * length;
        const scalar_t* gp = dy + q * length;
        scalar_t* out = dx + q * length;
        const arith_t k = centre[q];
        const arith_t a = k_dy[q];
        const arith_t b = k_x[q];
        const arith_t c0 = k_0[q];
#pragma omp simd
        for (int64_t i = 0; i < length; ++i) {
          out[i] = static_cast<scalar_t>((load(xp[i]) - k) * b + c0 + load(gp[i]) * a);
        }
      }
    });
    return;
  }
  at::parallel_for(0, p.n * length, items_per_task(channels), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      // The rows of one sample share its coefficients.
      const int64_t n = row / length;
      const int64_t stop = std::min(end, (n + 1) * length);
      const arith_t* k = centre + n * channels;
      const arith_t* a = k_dy + n * channels;
      const arith_t* b = k_x + n * channels;
      const arith_t* c0 = k_0 + n * channels;
      for (; row < stop; ++row) {
        const scalar_t* xp = x + row * channels;
        const scalar_t* gp = dy + row * channels;
        scalar_t* out = dx + row * channels;
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          out[c] = static_cast<scalar_t>((load(xp[c]) - k[c]) * b[c] + c0[c] + load(gp[c]) * a[c]);
        }
      }
    }
  });
}

}  // namespace

Planes planes_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "syncsn native: expected an (N, C, *S) tensor, got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "syncsn native: expected a CPU tensor, got ", x.device());
  Planes p{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) {
    p.l *= x.size(d);
  }
  if (x.is_contiguous()) {
    return p;
  }
  TORCH_CHECK(
      (x.dim() == 4 || x.dim() == 5) && x.is_contiguous(channels_last_format(x.dim())),
      "syncsn native: expected a contiguous or channels-last tensor, got strides ",
      x.strides());
  p.channels_last = true;
  return p;
}

bool has_layout(const at::Tensor& t, const Planes& p) {
  return p.channels_last ? t.is_contiguous(channels_last_format(t.dim())) : t.is_contiguous();
}

at::ScalarType arith_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_stats(const at::Tensor& x, const Planes& p) {
  auto f64 = x.options().dtype(at::kDouble);
  auto centre = at::empty({p.n, p.c}, x.options().dtype(arith_type(x.scalar_type())));
  auto mean = at::empty({p.n, p.c}, f64);
  auto m2 = at::empty({p.n, p.c}, f64);
  const auto type = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "syncsn_plane_stats", [&] {
    stats_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        p,
        centre.mutable_data_ptr<at::opmath_type<scalar_t>>(),
        mean.mutable_data_ptr<double>(),
        m2.mutable_data_ptr<double>());
  });
  return {centre, mean, m2};
}

at::Tensor plane_affine(
    const at::Tensor& x,
    const Planes& p,
    const at::Tensor& centre,
    const at::Tensor& scale,
    const at::Tensor& shift) {
  const auto arith = arith_type(x.scalar_type());
  check_coefficients(centre, p, arith, "centre");
  check_coefficients(scale, p, arith, "scale");
  check_coefficients(shift, p, arith, "shift");
  auto y = empty_planes(x, p);
  const auto type = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "syncsn_plane_affine", [&] {
    using arith_t = at::opmath_type<scalar_t>;
    affine_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        y.mutable_data_ptr<scalar_t>(),
        p,
        centre.const_data_ptr<arith_t>(),
        scale.const_data_ptr<arith_t>(),
        shift.const_data_ptr<arith_t>());
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> plane_sums(
    const at::Tensor& x, const at::Tensor& dy, const Planes& p, const at::Tensor& centre) {
  TORCH_CHECK(
      dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && has_layout(dy, p),
      "syncsn native: the gradient must match the input's shape, dtype and layout");
  check_coefficients(centre, p, arith_type(x.scalar_type()), "centre");
  auto f64 = x.options().dtype(at::kDouble);
  auto s1 = at::empty({p.n, p.c}, f64);
  auto s2 = at::empty({p.n, p.c}, f64);
  const auto type = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "syncsn_plane_sums", [&] {
    sums_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        dy.const_data_ptr<scalar_t>(),
        p,
        centre.const_data_ptr<at::opmath_type<scalar_t>>(),
        s1.mutable_data_ptr<double>(),
        s2.mutable_data_ptr<double>());
  });
  return {s1, s2};
}

at::Tensor plane_combine(
    const at::Tensor& x,
    const at::Tensor& dy,
    const Planes& p,
    const at::Tensor& centre,
    const at::Tensor& k_dy,
    const at::Tensor& k_x,
    const at::Tensor& k_0) {
  TORCH_CHECK(
      dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() && has_layout(dy, p),
      "syncsn native: the gradient must match the input's shape, dtype and layout");
  const auto arith = arith_type(x.scalar_type());
  check_coefficients(centre, p, arith, "centre");
  check_coefficients(k_dy, p, arith, "k_dy");
  check_coefficients(k_x, p, arith, "k_x");
  check_coefficients(k_0, p, arith, "k_0");
  auto dx = empty_planes(x, p);
  const auto type = x.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, type, "syncsn_plane_combine", [&] {
    using arith_t = at::opmath_type<scalar_t>;
    combine_kernel<scalar_t>(
        x.const_data_ptr<scalar_t>(),
        dy.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(),
        p,
        centre.const_data_ptr<arith_t>(),
        k_dy.const_data_ptr<arith_t>(),
        k_x.const_data_ptr<arith_t>(),
        k_0.const_data_ptr<arith_t>());
  });
  return dx;
}

}  // namespace syncsn
