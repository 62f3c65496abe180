// The full-size passes (see planes.h). Each reads its inputs from memory once. Contiguous
// input is split over planes, channels-last input over blocks of rows (one row = the C
// channels of one pixel), with per-block partial sums combined in a fixed order so that
// results do not depend on the number of threads.
#include "planes.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <vector>

namespace syncsn {
namespace {

// Elements per parallel task (ATen's own grain size).
constexpr int64_t kGrain = 32768;

// The statistics sum about a shift k per (n, c): the mean of the plane's first kPilot
// elements. Then (mean - k)^2 <= (L / kPilot) var, which bounds the cancellation in
// sum (x - k)^2 - (sum (x - k))^2 / L to a factor L / kPilot of double rounding.
constexpr int64_t kPilot = 16;

int64_t items_per_task(int64_t item_size) {
  return std::max<int64_t>(1, kGrain / std::max<int64_t>(item_size, 1));
}

template <typename scalar_t>
using arith_t = at::opmath_type<scalar_t>;

template <typename scalar_t>
inline double load_double(const scalar_t& v) {
  return static_cast<double>(static_cast<arith_t<scalar_t>>(v));
}

// Calls f(scalar_t{}) with scalar_t the C++ type of a floating dtype.
template <typename F>
void dispatch(at::ScalarType type, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, type, "syncsn_cpp", [&] { f(scalar_t{}); });
}

// Whether t is in the rows layout: channels-last, or any dense layout when L = 1.
bool rows_layout(const at::Tensor& t) {
  const int64_t dim = t.dim();
  const bool channels_last = (dim == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
      (dim == 5 && t.is_contiguous(at::MemoryFormat::ChannelsLast3d));
  const int64_t length = dim > 2 ? t.numel() / std::max<int64_t>(t.size(0) * t.size(1), 1) : 1;
  return channels_last || (length == 1 && t.is_contiguous());
}

// Element (n, c, l) is at plane_start(q) + l * plane_stride(), q = n * C + c.
int64_t plane_start(const Planes& p, int64_t q) {
  return p.rows ? (q / p.c) * p.l * p.c + q % p.c : q * p.l;
}

int64_t plane_stride(const Planes& p) {
  return p.rows ? p.c : 1;
}

// The (N, C) values of coefficients, in the arithmetic type.
template <typename T>
std::vector<T> expand(Coefficients k, const Planes& p) {
  std::vector<T> out(p.n * p.c);
  for (int64_t n = 0; n < p.n; ++n) {
    for (int64_t c = 0; c < p.c; ++c) {
      out[n * p.c + c] = static_cast<T>(k.data[n * k.sample_stride + c]);
    }
  }
  return out;
}

void check_same_planes(const at::Tensor& x, const at::Tensor& dy, const Planes& p) {
  TORCH_CHECK(
      dy.sizes() == x.sizes() && dy.scalar_type() == x.scalar_type() &&
          like_planes(dy, x, p).is_same(dy),
      "syncsn_cpp: the gradient must match the input's shape, dtype and layout");
}

// --- vector arithmetic ----------------------------------------------------------------------

// Four doubles in one register (GCC/Clang vector extension; AVX where available). The
// reductions keep several such accumulators per sum: a single chain of additions would wait
// on the latency of each one.
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
  for (int i = 0; i < 4; ++i) {
    out[i] += v[i];
  }
}

// --- reductions -----------------------------------------------------------------------------
//
// Every reduction is a pair of sums about a shift k: with d = x - k, s1 = sum w and
// s2 = sum w * d, where w = d (kGrad false: the statistics) or w = g (kGrad true: the
// backward sums, g the upstream gradient).

// One step over kVecs * 4 adjacent elements into kVecs accumulators of each sum.
template <bool kGrad, int kVecs, typename scalar_t>
inline void pair_step(
    const scalar_t* x, const scalar_t* g, const double4* k, double4* u, double4* v) {
  for (int j = 0; j < kVecs; ++j) {
    const double4 d = load4(x + 4 * j) - k[j];
    double4 w = d;
    if constexpr (kGrad) {
      w = load4(g + 4 * j);
    }
    u[j] += w;
    v[j] += w * d;
  }
}

template <bool kGrad, typename scalar_t>
inline void pair_step1(const scalar_t* x, const scalar_t* g, double k, double& u, double& v) {
  const double d = load_double(*x) - k;
  const double w = kGrad ? load_double(*g) : d;
  u += w;
  v += w * d;
}

// The pair over `count` contiguous elements (one contiguous plane).
template <bool kGrad, typename scalar_t>
void contiguous_pair(
    const scalar_t* x, const scalar_t* g, int64_t count, double k, double& s1, double& s2) {
  const double4 shift = {k, k, k, k};
  const double4 shifts[4] = {shift, shift, shift, shift};
  double4 u[4] = {};
  double4 v[4] = {};
  int64_t i = 0;
  for (; i + 16 <= count; i += 16) {
    pair_step<kGrad, 4>(x + i, g + i, shifts, u, v);
  }
  double t1 = 0.0;
  double t2 = 0.0;
  for (; i < count; ++i) {
    pair_step1<kGrad>(x + i, g + i, k, t1, t2);
  }
  s1 = sum_of((u[0] + u[1]) + (u[2] + u[3])) + t1;
  s2 = sum_of((v[0] + v[1]) + (v[2] + v[3])) + t2;
}

// Adds the pairs of rows l0 <= l < l1 of one sample (base x, g) to s1[c], s2[c].
template <bool kGrad, typename scalar_t>
void rows_pair(
    const scalar_t* x,
    const scalar_t* g,
    int64_t l0,
    int64_t l1,
    int64_t channels,
    const double* k,
    double* s1,
    double* s2) {
  int64_t c0 = 0;
  // Channels in groups of kVecs * 4 whose sums stay in registers over the rows.
  auto groups = [&](auto vecs) {
    constexpr int kVecs = decltype(vecs)::value;
    for (; c0 + 4 * kVecs <= channels; c0 += 4 * kVecs) {
      double4 shifts[kVecs];
      double4 u[kVecs] = {};
      double4 v[kVecs] = {};
      for (int j = 0; j < kVecs; ++j) {
        shifts[j] = load4(k + c0 + 4 * j);
      }
      for (int64_t l = l0; l < l1; ++l) {
        pair_step<kGrad, kVecs>(x + l * channels + c0, g + l * channels + c0, shifts, u, v);
      }
      for (int j = 0; j < kVecs; ++j) {
        add_to(s1 + c0 + 4 * j, u[j]);
        add_to(s2 + c0 + 4 * j, v[j]);
      }
    }
  };
  groups(std::integral_constant<int, 4>{});
  groups(std::integral_constant<int, 1>{});
  for (; c0 < channels; ++c0) {
    double u = 0.0;
    double v = 0.0;
    for (int64_t l = l0; l < l1; ++l) {
      pair_step1<kGrad>(x + l * channels + c0, g + l * channels + c0, k[c0], u, v);
    }
    s1[c0] += u;
    s2[c0] += v;
  }
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

// The pairs of every plane about k[q] = shift(q) (also written to k), into s1, s2 (N * C).
// A contiguous plane takes its shift just before it is summed (its first elements are then
// in cache); channels-last samples take all their shifts first.
template <bool kGrad, typename scalar_t, typename Shift>
void pair_sums(
    const scalar_t* x,
    const scalar_t* g,
    const Planes& p,
    const Shift& shift,
    double* k,
    double* s1,
    double* s2) {
  if (!p.rows) {
    at::parallel_for(0, p.n * p.c, items_per_task(p.l), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        k[q] = shift(q);
        contiguous_pair<kGrad>(x + q * p.l, g + q * p.l, p.l, k[q], s1[q], s2[q]);
      }
    });
    return;
  }
  for (int64_t q = 0; q < p.n * p.c; ++q) {
    k[q] = shift(q);
  }
  const int64_t channels = p.c;
  auto block = [&](int64_t n, int64_t l0, int64_t l1, double* acc) {
    const int64_t offset = n * p.l * channels;
    const double* kn = k + n * channels;
    rows_pair<kGrad>(x + offset, g + offset, l0, l1, channels, kn, acc, acc + channels);
  };
  const auto sums = sum_row_blocks(p, 2 * channels, block);
  for (int64_t n = 0; n < p.n; ++n) {
    const double* s = sums.data() + n * 2 * channels;
    std::copy(s, s + channels, s1 + n * channels);
    std::copy(s + channels, s + 2 * channels, s2 + n * channels);
  }
}

// --- elementwise passes ---------------------------------------------------------------------

// A coefficient of an elementwise run: one value for the whole run, or one per element.
template <typename T>
inline T at(T value, int64_t) {
  return value;
}

template <typename T>
inline T at(const T* values, int64_t i) {
  return values[i];
}

// o = (x - k0) * k1 + k2 (+ g * k3 with kGrad) over `length` elements.
template <bool kGrad, typename scalar_t, typename K>
inline void pointwise_run(
    const scalar_t* x, const scalar_t* g, scalar_t* o, int64_t length, K k0, K k1, K k2, K k3) {
  using T = arith_t<scalar_t>;
#pragma omp simd
  for (int64_t i = 0; i < length; ++i) {
    T value = (static_cast<T>(x[i]) - at(k0, i)) * at(k1, i) + at(k2, i);
    if constexpr (kGrad) {
      value += static_cast<T>(g[i]) * at(k3, i);
    }
    o[i] = static_cast<scalar_t>(value);
  }
}

// out = (x - k[0]) * k[1] + k[2] (+ dy * k[3] with kGrad), k the (N, C) coefficients. A
// contiguous plane is a run of L elements sharing one set of coefficients, a channels-last
// row a run of C elements with one set per element.
template <bool kGrad, typename scalar_t>
void pointwise_kernel(
    const scalar_t* x,
    const scalar_t* dy,
    scalar_t* out,
    const Planes& p,
    const std::vector<arith_t<scalar_t>>* k) {
  const auto* k3 = (kGrad ? k[3] : k[2]).data();
  if (!p.rows) {
    at::parallel_for(0, p.n * p.c, items_per_task(p.l), [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q) {
        const int64_t offset = q * p.l;
        pointwise_run<kGrad>(
            x + offset, dy + offset, out + offset, p.l, k[0][q], k[1][q], k[2][q], k3[q]);
      }
    });
    return;
  }
  at::parallel_for(0, p.n * p.l, items_per_task(p.c), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end;) {
      // The rows of one sample share its coefficients.
      const int64_t q = (row / p.l) * p.c;
      const int64_t stop = std::min(end, (row / p.l + 1) * p.l);
      const auto *k0 = k[0].data() + q, *k1 = k[1].data() + q, *k2 = k[2].data() + q;
      for (; row < stop; ++row) {
        const int64_t offset = row * p.c;
        pointwise_run<kGrad>(x + offset, dy + offset, out + offset, p.c, k0, k1, k2, k3 + q);
      }
    }
  });
}

// The elementwise pass with coefficients k[0..K), in x's dtype and layout.
template <bool kGrad, size_t K>
at::Tensor pointwise(
    const at::Tensor& x,
    const at::Tensor& dy,
    const Planes& p,
    const std::array<Coefficients, K>& coefficients) {
  auto out = at::empty_like(x);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    std::vector<arith_t<scalar_t>> k[4];
    for (size_t i = 0; i < K; ++i) {
      k[i] = expand<arith_t<scalar_t>>(coefficients[i], p);
    }
    pointwise_kernel<kGrad, scalar_t>(
        x.const_data_ptr<scalar_t>(),
        dy.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(),
        p,
        k);
  });
  return out;
}

}  // namespace

Planes planes_of(const at::Tensor& x) {
  TORCH_CHECK(x.dim() >= 2, "syncsn_cpp: expected an (N, C, *S) tensor, got shape ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "syncsn_cpp: expected a CPU tensor, got ", x.device());
  Planes p{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) {
    p.l *= x.size(d);
  }
  p.rows = rows_layout(x);
  TORCH_CHECK(
      p.rows || x.is_contiguous(),
      "syncsn_cpp: expected a contiguous or channels-last tensor, got strides ",
      x.strides());
  return p;
}

at::Tensor like_planes(const at::Tensor& t, const at::Tensor& x, const Planes& p) {
  const bool layout = p.rows ? rows_layout(t) : t.is_contiguous();
  if (layout && t.scalar_type() == x.scalar_type()) {
    return t;
  }
  auto format = at::MemoryFormat::Contiguous;
  if (p.rows && p.l > 1) {
    format = x.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
  }
  return t.to(x.scalar_type()).contiguous(format);
}

at::ScalarType arith_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_stats(const at::Tensor& x, const Planes& p) {
  auto f64 = x.options().dtype(at::kDouble);
  auto centre = at::empty({p.n, p.c}, x.options().dtype(arith_type(x.scalar_type())));
  auto mean = at::empty({p.n, p.c}, f64);
  auto m2 = at::empty({p.n, p.c}, f64);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const int64_t stride = plane_stride(p);
    auto pilot = [&](int64_t q) {
      const scalar_t* first = data + plane_start(p, q);
      const int64_t count = std::min(p.l, kPilot);
      double sum = 0.0;
      for (int64_t i = 0; i < count; ++i) {
        sum += load_double(first[i * stride]);
      }
      return count > 0 ? sum / static_cast<double>(count) : 0.0;
    };
    std::vector<double> shift(p.n * p.c);
    double* s1 = mean.mutable_data_ptr<double>();  // sums about the shift, then the mean
    double* s2 = m2.mutable_data_ptr<double>();
    pair_sums<false>(data, data, p, pilot, shift.data(), s1, s2);
    auto* rounded = centre.mutable_data_ptr<arith_t<scalar_t>>();
    const double inv_length = p.l > 0 ? 1.0 / static_cast<double>(p.l) : 0.0;
    for (int64_t q = 0; q < p.n * p.c; ++q) {
      const double sum = s1[q];
      s1[q] = shift[q] + sum * inv_length;
      s2[q] = std::max(s2[q] - sum * (sum * inv_length), 0.0);
      rounded[q] = static_cast<arith_t<scalar_t>>(s1[q]);
    }
  });
  return {centre, mean, m2};
}

std::tuple<at::Tensor, at::Tensor> plane_sums(
    const at::Tensor& x, const at::Tensor& dy, const Planes& p, Coefficients centre) {
  check_same_planes(x, dy, p);
  auto f64 = x.options().dtype(at::kDouble);
  auto s1 = at::empty({p.n, p.c}, f64);
  auto s2 = at::empty({p.n, p.c}, f64);
  dispatch(x.scalar_type(), [&](auto tag) {
    using scalar_t = decltype(tag);
    // The passes subtract the centre as rounded to the arithmetic type.
    const auto rounded = expand<arith_t<scalar_t>>(centre, p);
    auto shift = [&](int64_t q) { return static_cast<double>(rounded[q]); };
    std::vector<double> k(p.n * p.c);
    pair_sums<true>(
        x.const_data_ptr<scalar_t>(),
        dy.const_data_ptr<scalar_t>(),
        p,
        shift,
        k.data(),
        s1.mutable_data_ptr<double>(),
        s2.mutable_data_ptr<double>());
  });
  return {s1, s2};
}

at::Tensor plane_affine(
    const at::Tensor& x, const Planes& p, Coefficients centre, Coefficients scale,
    Coefficients shift) {
  return pointwise<false, 3>(x, x, p, {centre, scale, shift});
}

at::Tensor plane_combine(
    const at::Tensor& x, const at::Tensor& dy, const Planes& p, Coefficients centre,
    Coefficients k_x, Coefficients k_0, Coefficients k_dy) {
  check_same_planes(x, dy, p);
  return pointwise<true, 4>(x, dy, p, {centre, k_x, k_0, k_dy});
}

}  // namespace syncsn
