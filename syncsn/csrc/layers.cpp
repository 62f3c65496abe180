// The layers' steps between collectives, on CPU: a full-size pass (planes.h) plus the small
// (N, C) / (C,) arithmetic around it, in double, written as loops so that one call replaces
// the hundreds of small tensor operations the pure-torch implementation dispatches.
//
// The math is the one of syncsn/functional.py and syncsn/function.py (the pure-torch
// implementation, which stays the reference and the fallback); each function here names the
// Python step it fuses. The collectives stay in Python, between these calls.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "planes.h"

namespace syncsn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

// Small tensors are read into and written from std::vector<double>: the statistics are
// (N, C) at most, and going through raw pointers avoids a tensor operation per step.

// The values of a small tensor, as doubles.
std::vector<double> values(const Tensor& t) {
  const int64_t n = t.numel();
  if (t.is_contiguous() && t.scalar_type() == at::kDouble) {
    const double* p = t.const_data_ptr<double>();
    return std::vector<double>(p, p + n);
  }
  if (t.is_contiguous() && t.scalar_type() == at::kFloat) {
    const float* p = t.const_data_ptr<float>();
    return std::vector<double>(p, p + n);
  }
  const Tensor d = t.to(at::kDouble).contiguous();
  const double* p = d.const_data_ptr<double>();
  return std::vector<double>(p, p + n);
}

std::vector<double> values_of_size(const Tensor& t, int64_t numel, const char* name) {
  TORCH_CHECK(
      t.numel() == numel,
      "syncsn native: ",
      name,
      " must have ",
      numel,
      " elements, got shape ",
      t.sizes());
  return values(t);
}

double value(const Tensor& t) {
  TORCH_CHECK(t.numel() == 1, "syncsn native: expected a single value, got shape ", t.sizes());
  return values(t)[0];
}

bool given(const OptionalTensor& t) {
  return t.has_value() && t->defined();
}

// Mixing weights in double, renormalised (function._simplex64).
std::vector<double> simplex(const Tensor& w) {
  auto out = values(w);
  double total = 0.0;
  for (double x : out) {
    total += x;
  }
  for (double& x : out) {
    x /= total;
  }
  return out;
}

// A per-channel parameter in double; `fill` without one (gamma 1, beta 0).
std::vector<double> per_channel(
    const OptionalTensor& t, int64_t channels, double fill, const char* name) {
  if (!given(t)) {
    return std::vector<double>(channels, fill);
  }
  return values_of_size(*t, channels, name);
}

// A new contiguous tensor of `type` (float or double) holding `data`.
Tensor tensor_of(
    const std::vector<double>& data,
    at::IntArrayRef sizes,
    const Tensor& like,
    at::ScalarType type) {
  auto t = at::empty(sizes, like.options().dtype(type).memory_format(at::MemoryFormat::Contiguous));
  if (type == at::kDouble) {
    std::copy(data.begin(), data.end(), t.mutable_data_ptr<double>());
  } else if (type == at::kFloat) {
    float* out = t.mutable_data_ptr<float>();
    for (size_t i = 0; i < data.size(); ++i) {
      out[i] = static_cast<float>(data[i]);
    }
  } else {
    return tensor_of(data, sizes, like, at::kDouble).to(type);
  }
  return t;
}

Tensor doubles(const std::vector<double>& data, at::IntArrayRef sizes, const Tensor& like) {
  return tensor_of(data, sizes, like, at::kDouble);
}

Tensor vector_of(const std::vector<double>& data, const Tensor& like, at::ScalarType type) {
  return tensor_of(data, {static_cast<int64_t>(data.size())}, like, type);
}

// (N, C) coefficients for the full-size passes, in the arithmetic type of x.
Tensor coefficients(const std::vector<double>& data, const Tensor& x, int64_t n, int64_t c) {
  return tensor_of(data, {n, c}, x, arith_type(x.scalar_type()));
}

// ---------------------------------------------------------------------------------------
// Switchable Normalization over (N, C, *S).

// functional.instance_stats + layer_stats + sample_partials: one pass over x.
// Returns centre (N, C) arithmetic type; mean_in, var_in (N, C), mu_ln, var_ln (N,) and,
// when asked, this rank's partials (1 + 3C,) [n, abar, M2, B], all float64.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sn_stats(
    const Tensor& x, bool with_partials) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  auto [centre, mean_in, var_in] = plane_stats(x, p);
  const double* a = mean_in.const_data_ptr<double>();
  double* var = var_in.mutable_data_ptr<double>();  // m2, made the unbiased variance in place
  const double denom = static_cast<double>(p.l - 1);
  for (int64_t i = 0; i < n * c; ++i) {
    var[i] /= denom;
  }
  std::vector<double> mu_ln(n);
  std::vector<double> var_ln(n);
  for (int64_t s = 0; s < n; ++s) {
    const double* as = a + s * c;
    const double* vs = var + s * c;
    double sum_a = 0.0;
    double sum_v = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      sum_a += as[j];
      sum_v += vs[j];
    }
    const double mu = sum_a / c;
    double spread = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      spread += (as[j] - mu) * (as[j] - mu);
    }
    mu_ln[s] = mu;
    var_ln[s] = sum_v / c + spread / c;
  }
  Tensor partials;
  if (with_partials) {
    std::vector<double> out(1 + 3 * c, 0.0);
    if (n > 0) {
      out[0] = static_cast<double>(n);
      for (int64_t j = 0; j < c; ++j) {
        double sum_a = 0.0;
        double sum_b = 0.0;
        for (int64_t s = 0; s < n; ++s) {
          sum_a += a[s * c + j];
          sum_b += var[s * c + j];
        }
        const double abar = sum_a / n;
        double m2 = 0.0;
        for (int64_t s = 0; s < n; ++s) {
          m2 += (a[s * c + j] - abar) * (a[s * c + j] - abar);
        }
        out[1 + j] = abar;
        out[1 + c + j] = m2;
        out[1 + 2 * c + j] = sum_b;
      }
    }
    partials = doubles(out, {1 + 3 * c}, x);
  }
  return {centre, mean_in, var_in, doubles(mu_ln, {n}, x), doubles(var_ln, {n}, x), partials};
}

// functional.merge_sample_partials: count (0-d), mu_bn, var_bn (C,), float64.
std::tuple<Tensor, Tensor, Tensor> merge_samples(const Tensor& gathered) {
  TORCH_CHECK(
      gathered.dim() == 2 && (gathered.size(1) - 1) % 3 == 0,
      "syncsn native: expected (world, 1 + 3C) partials, got ",
      gathered.sizes());
  const int64_t world = gathered.size(0);
  const int64_t width = gathered.size(1);
  const int64_t c = (width - 1) / 3;
  const auto q = values(gathered);
  double count = 0.0;
  for (int64_t r = 0; r < world; ++r) {
    count += q[r * width];
  }
  const double safe = std::max(count, 1.0);
  std::vector<double> mu(c);
  std::vector<double> var(c);
  for (int64_t j = 0; j < c; ++j) {
    double weighted = 0.0;
    for (int64_t r = 0; r < world; ++r) {
      weighted += q[r * width] * q[r * width + 1 + j];
    }
    const double m = weighted / safe;
    double spread = 0.0;
    double within = 0.0;
    for (int64_t r = 0; r < world; ++r) {
      const double* row = q.data() + r * width;
      const double d = row[1 + j] - m;
      spread += row[1 + c + j] + row[0] * d * d;
      within += row[1 + 2 * c + j];
    }
    mu[j] = m;
    var[j] = (within + spread) / safe;
  }
  return {doubles({count}, {}, gathered), doubles(mu, {c}, gathered), doubles(var, {c}, gathered)};
}

// function._mix_and_scale + functional.normalize_: the mixed statistics and the output.
// bn_mean / bn_var (C,) are the BN scope (batch or running statistics) when w has 3 entries.
// Returns y (x's dtype and layout) and mu, var, r = (var + eps)^-1/2, (N, C) float64.
std::tuple<Tensor, Tensor, Tensor, Tensor> sn_output(
    const Tensor& x,
    const Tensor& centre,
    const Tensor& mean_in,
    const Tensor& var_in,
    const Tensor& mu_ln,
    const Tensor& var_ln,
    const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var,
    const Tensor& w,
    const Tensor& v,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto a = values_of_size(mean_in, n * c, "mean_in");
  const auto b = values_of_size(var_in, n * c, "var_in");
  const auto ln_mean = values_of_size(mu_ln, n, "mu_ln");
  const auto ln_var = values_of_size(var_ln, n, "var_ln");
  const auto ce = values_of_size(centre, n * c, "centre");
  const auto wk = simplex(w);
  const auto vk = simplex(v);
  TORCH_CHECK(
      wk.size() == vk.size() && (wk.size() == 2 || wk.size() == 3), "syncsn native: 2 or 3 scopes");
  const bool use_bn = wk.size() == 3;
  TORCH_CHECK(
      !use_bn || (given(bn_mean) && given(bn_var)),
      "syncsn native: the BN scope needs its statistics");
  const auto bm = use_bn ? values_of_size(*bn_mean, c, "bn_mean") : std::vector<double>(c, 0.0);
  const auto bv = use_bn ? values_of_size(*bn_var, c, "bn_var") : std::vector<double>(c, 0.0);
  const auto gamma = per_channel(weight, c, 1.0, "weight");
  const auto beta = per_channel(bias, c, 0.0, "bias");

  std::vector<double> mu(n * c);
  std::vector<double> var(n * c);
  std::vector<double> r(n * c);
  std::vector<double> scale(n * c);
  std::vector<double> shift(n * c);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      double m = wk[0] * a[i] + wk[1] * ln_mean[s];
      double va = vk[0] * b[i] + vk[1] * ln_var[s];
      if (use_bn) {
        m += wk[2] * bm[j];
        va += vk[2] * bv[j];
      }
      mu[i] = m;
      var[i] = va;
      r[i] = 1.0 / std::sqrt(va + eps);
      scale[i] = r[i] * gamma[j];
      shift[i] = (ce[i] - m) * scale[i] + beta[j];
    }
  }
  auto y = plane_affine(x, p, centre, coefficients(scale, x, n, c), coefficients(shift, x, n, c));
  return {y, doubles(mu, {n, c}, x), doubles(var, {n, c}, x), doubles(r, {n, c}, x)};
}

// SwitchNormFunction.backward up to the collective: the reduction pass, the IN and LN
// terms, this rank's BN totals (2C,) [w_bn sum_n g_mu, v_bn sum_n g_var] when `synced`, and
// the local parameter gradients. Returns (totals or None, g_a, g_b (N, C) float64, dw, dv,
// dweight, dbias (None without weight)).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sn_backward_reduce(
    const Tensor& x,
    const Tensor& dy,
    const Tensor& centre,
    const Tensor& mean_in,
    const Tensor& var_in,
    const Tensor& mu,
    const Tensor& var,
    const Tensor& r,
    const Tensor& mu_ln,
    const Tensor& var_ln,
    const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var,
    const Tensor& w,
    const Tensor& v,
    const OptionalTensor& weight,
    bool synced) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto a = values_of_size(mean_in, n * c, "mean_in");
  const auto b = values_of_size(var_in, n * c, "var_in");
  const auto m = values_of_size(mu, n * c, "mu");
  const auto va = values_of_size(var, n * c, "var");
  const auto rr = values_of_size(r, n * c, "r");
  const auto ln_mean = values_of_size(mu_ln, n, "mu_ln");
  const auto ln_var = values_of_size(var_ln, n, "var_ln");
  const auto ce = values_of_size(centre, n * c, "centre");
  const auto wk = simplex(w);
  const auto vk = simplex(v);
  const bool use_bn = wk.size() == 3;
  TORCH_CHECK(
      !use_bn || (given(bn_mean) && given(bn_var)),
      "syncsn native: the BN scope needs its statistics");
  TORCH_CHECK(!synced || use_bn, "syncsn native: a synchronized backward needs the BN scope");
  const auto bm = use_bn ? values_of_size(*bn_mean, c, "bn_mean") : std::vector<double>(c, 0.0);
  const auto bv = use_bn ? values_of_size(*bn_var, c, "bn_var") : std::vector<double>(c, 0.0);
  const auto gamma = per_channel(weight, c, 1.0, "weight");

  auto [s1_t, s2c_t] = plane_sums(x, dy, p, centre);
  const double* s1 = s1_t.const_data_ptr<double>();
  const double* s2c = s2c_t.const_data_ptr<double>();
  std::vector<double> g_mu(n * c);
  std::vector<double> g_var(n * c);
  std::vector<double> s2m(n * c);  // sum dy * (x - mu), without cancellation
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      s2m[i] = s2c[i] + (ce[i] - m[i]) * s1[i];
      g_mu[i] = -rr[i] * gamma[j] * s1[i];
      g_var[i] = -0.5 * (rr[i] * rr[i] * rr[i]) * gamma[j] * s2m[i];
    }
  }
  // IN and LN scopes.
  std::vector<double> g_a(n * c);
  std::vector<double> g_b(n * c);
  for (int64_t s = 0; s < n; ++s) {
    double sum_mu = 0.0;
    double sum_var = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      sum_mu += g_mu[s * c + j];
      sum_var += g_var[s * c + j];
    }
    const double m_n = wk[1] * sum_mu;
    const double v_n = vk[1] * sum_var;
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      g_a[i] = wk[0] * g_mu[i] + m_n / c + v_n * 2 * (a[i] - ln_mean[s]) / c;
      g_b[i] = vk[0] * g_var[i] + v_n / c;
    }
  }
  // BN scope: this rank's part of the per-channel totals.
  Tensor totals;
  if (synced) {
    std::vector<double> sums(2 * c, 0.0);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t j = 0; j < c; ++j) {
        sums[j] += g_mu[s * c + j];
        sums[c + j] += g_var[s * c + j];
      }
    }
    for (int64_t j = 0; j < c; ++j) {
      sums[j] *= wk[2];
      sums[c + j] *= vk[2];
    }
    totals = doubles(sums, {2 * c}, x);
  }
  // Switch logits: sum g * (scope - mixed), exact when the scopes are large and close.
  double dw0 = 0.0, dw1 = 0.0, dw2 = 0.0;
  double dv0 = 0.0, dv1 = 0.0, dv2 = 0.0;
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      dw0 += g_mu[i] * (a[i] - m[i]);
      dw1 += g_mu[i] * (ln_mean[s] - m[i]);
      dw2 += g_mu[i] * (bm[j] - m[i]);  // bm, bv are zeros without the BN scope
      dv0 += g_var[i] * (b[i] - va[i]);
      dv1 += g_var[i] * (ln_var[s] - va[i]);
      dv2 += g_var[i] * (bv[j] - va[i]);
    }
  }
  std::vector<double> dw{dw0, dw1};
  std::vector<double> dv{dv0, dv1};
  if (use_bn) {
    dw.push_back(dw2);
    dv.push_back(dv2);
  }
  Tensor dweight;
  Tensor dbias;
  if (given(weight)) {
    std::vector<double> gw(c, 0.0);
    std::vector<double> gb(c, 0.0);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t j = 0; j < c; ++j) {
        gw[j] += rr[s * c + j] * s2m[s * c + j];
        gb[j] += s1[s * c + j];
      }
    }
    dweight = vector_of(gw, x, weight->scalar_type());
    dbias = vector_of(gb, x, weight->scalar_type());
  }
  return {
      totals,
      doubles(g_a, {n, c}, x),
      doubles(g_b, {n, c}, x),
      vector_of(dw, x, w.scalar_type()),
      vector_of(dv, x, v.scalar_type()),
      dweight,
      dbias};
}

// SwitchNormFunction.backward after the collective: the BN terms from the summed totals,
// the per-(n, c) coefficients, and dx in one pass.
Tensor sn_backward_input(
    const Tensor& x,
    const Tensor& dy,
    const Tensor& centre,
    const Tensor& mean_in,
    const Tensor& g_a,
    const Tensor& g_b,
    const Tensor& r,
    const OptionalTensor& weight,
    const OptionalTensor& totals,
    const OptionalTensor& count,
    const OptionalTensor& bn_mean) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto a = values_of_size(mean_in, n * c, "mean_in");
  const auto rr = values_of_size(r, n * c, "r");
  const auto ce = values_of_size(centre, n * c, "centre");
  auto ga = values_of_size(g_a, n * c, "g_a");
  auto gb = values_of_size(g_b, n * c, "g_b");
  const auto gamma = per_channel(weight, c, 1.0, "weight");
  if (given(totals)) {
    TORCH_CHECK(given(count) && given(bn_mean), "syncsn native: the BN terms need count and mean");
    const auto t = values_of_size(*totals, 2 * c, "totals");
    const auto mb = values_of_size(*bn_mean, c, "bn_mean");
    const double cnt = std::max(value(*count), 1.0);
    for (int64_t s = 0; s < n; ++s) {
      for (int64_t j = 0; j < c; ++j) {
        const int64_t i = s * c + j;
        ga[i] = ga[i] + t[j] / cnt + t[c + j] * 2 * (a[i] - mb[j]) / cnt;
        gb[i] = gb[i] + t[c + j] / cnt;
      }
    }
  }
  std::vector<double> k_dy(n * c);
  std::vector<double> k_x(n * c);
  std::vector<double> k_0(n * c);
  const double length = static_cast<double>(p.l);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      // d var_in / dx = 2 (x - a) / (L - 1) with x - a = (x - centre) + (centre - a).
      k_x[i] = 2 * gb[i] / (length - 1);
      k_0[i] = ga[i] / length + k_x[i] * (ce[i] - a[i]);
      k_dy[i] = gamma[j] * rr[i];
    }
  }
  return plane_combine(
      x,
      dy,
      p,
      centre,
      coefficients(k_dy, x, n, c),
      coefficients(k_x, x, n, c),
      coefficients(k_0, x, n, c));
}

// ---------------------------------------------------------------------------------------
// Batch Normalization over (N, C, *S), pixel-weighted.

// functional.instance_stats + element_partials: centre (N, C) arithmetic type and this
// rank's partials (1 + 2C,) [count, mean, M2], float64.
std::tuple<Tensor, Tensor> bn_stats(const Tensor& x) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  auto [centre, mean_in, m2_in] = plane_stats(x, p);
  const double* a = mean_in.const_data_ptr<double>();
  const double* m2 = m2_in.const_data_ptr<double>();
  std::vector<double> out(1 + 2 * c, 0.0);
  if (n > 0 && p.l > 0) {
    out[0] = static_cast<double>(n * p.l);
    for (int64_t j = 0; j < c; ++j) {
      double sum_a = 0.0;
      double sum_m2 = 0.0;
      for (int64_t s = 0; s < n; ++s) {
        sum_a += a[s * c + j];
        sum_m2 += m2[s * c + j];
      }
      const double mean = sum_a / n;
      double spread = 0.0;
      for (int64_t s = 0; s < n; ++s) {
        spread += (a[s * c + j] - mean) * (a[s * c + j] - mean);
      }
      out[1 + j] = mean;
      out[1 + c + j] = sum_m2 + static_cast<double>(p.l) * spread;
    }
  }
  return {centre, doubles(out, {1 + 2 * c}, x)};
}

// functional.merge_element_partials, plus the unbiased variance for the running statistics:
// count (0-d), mean, m2, m2 / max(count - 1, 1) (C,), float64.
std::tuple<Tensor, Tensor, Tensor, Tensor> merge_elements(const Tensor& gathered) {
  TORCH_CHECK(
      gathered.dim() == 2 && (gathered.size(1) - 1) % 2 == 0,
      "syncsn native: expected (world, 1 + 2C) partials, got ",
      gathered.sizes());
  const int64_t world = gathered.size(0);
  const int64_t width = gathered.size(1);
  const int64_t c = (width - 1) / 2;
  const auto q = values(gathered);
  double count = 0.0;
  for (int64_t r = 0; r < world; ++r) {
    count += q[r * width];
  }
  std::vector<double> mean(c);
  std::vector<double> m2(c);
  std::vector<double> unbiased(c);
  for (int64_t j = 0; j < c; ++j) {
    double weighted = 0.0;
    for (int64_t r = 0; r < world; ++r) {
      weighted += q[r * width] * q[r * width + 1 + j];
    }
    const double m = weighted / std::max(count, 1.0);
    double total = 0.0;
    for (int64_t r = 0; r < world; ++r) {
      const double* row = q.data() + r * width;
      const double d = row[1 + j] - m;
      total += row[1 + c + j] + row[0] * d * d;
    }
    mean[j] = m;
    m2[j] = total;
    unbiased[j] = total / std::max(count - 1.0, 1.0);
  }
  return {
      doubles({count}, {}, gathered),
      doubles(mean, {c}, gathered),
      doubles(m2, {c}, gathered),
      doubles(unbiased, {c}, gathered)};
}

// BatchNormFunction.forward after the collective: y, invstd (C,) float64 and the centre of
// the backward pass, the global mean in the arithmetic type (C,).
std::tuple<Tensor, Tensor, Tensor> bn_output(
    const Tensor& x,
    const Tensor& centre_in,
    const Tensor& count,
    const Tensor& mean,
    const Tensor& m2,
    const OptionalTensor& weight,
    const OptionalTensor& bias,
    double eps) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto mb = values_of_size(mean, c, "mean");
  const auto sq = values_of_size(m2, c, "m2");
  const auto ce = values_of_size(centre_in, n * c, "centre");
  const double cnt = std::max(value(count), 1.0);
  const auto gamma = per_channel(weight, c, 1.0, "weight");
  const auto beta = per_channel(bias, c, 0.0, "bias");
  std::vector<double> invstd(c);
  std::vector<double> scale(n * c);
  std::vector<double> shift(n * c);
  for (int64_t j = 0; j < c; ++j) {
    invstd[j] = 1.0 / std::sqrt(sq[j] / cnt + eps);
  }
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      scale[i] = invstd[j] * gamma[j];
      shift[i] = (ce[i] - mb[j]) * scale[i] + beta[j];
    }
  }
  auto y = plane_affine(
      x, p, centre_in, coefficients(scale, x, n, c), coefficients(shift, x, n, c));
  return {y, doubles(invstd, {c}, x), vector_of(mb, x, arith_type(x.scalar_type()))};
}

// BatchNormFunction.backward up to the collective: this rank's (2C,) [sum dy, sum dy (x - mean)]
// and the local dweight, dbias (None without weight).
std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce(
    const Tensor& x,
    const Tensor& dy,
    const Tensor& centre,
    const Tensor& mean,
    const Tensor& invstd,
    const OptionalTensor& weight) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto mb = values_of_size(mean, c, "mean");
  const auto is = values_of_size(invstd, c, "invstd");
  const auto ce = values_of_size(centre, c, "centre");
  std::vector<double> ce_nc(n * c);
  for (int64_t s = 0; s < n; ++s) {
    std::copy(ce.begin(), ce.end(), ce_nc.begin() + s * c);
  }
  auto [s1_t, s2c_t] = plane_sums(x, dy, p, coefficients(ce_nc, x, n, c));
  const double* s1 = s1_t.const_data_ptr<double>();
  const double* s2c = s2c_t.const_data_ptr<double>();
  std::vector<double> local(2 * c, 0.0);  // [sum dy, sum dy (x - mean)]
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      local[j] += s1[s * c + j];
      local[c + j] += s2c[s * c + j];
    }
  }
  for (int64_t j = 0; j < c; ++j) {
    local[c + j] += (ce[j] - mb[j]) * local[j];
  }
  Tensor dweight;
  Tensor dbias;
  if (given(weight)) {
    std::vector<double> gw(c);
    for (int64_t j = 0; j < c; ++j) {
      gw[j] = local[c + j] * is[j];
    }
    dweight = vector_of(gw, x, weight->scalar_type());
    const std::vector<double> sum_dy(local.begin(), local.begin() + c);
    dbias = vector_of(sum_dy, x, weight->scalar_type());
  }
  return {doubles(local, {2 * c}, x), dweight, dbias};
}

// BatchNormFunction.backward after the collective: dx in one pass from the summed totals.
Tensor bn_backward_input(
    const Tensor& x,
    const Tensor& dy,
    const Tensor& centre,
    const Tensor& mean,
    const Tensor& invstd,
    const OptionalTensor& weight,
    const Tensor& totals,
    const Tensor& count) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const auto mb = values_of_size(mean, c, "mean");
  const auto is = values_of_size(invstd, c, "invstd");
  const auto ce = values_of_size(centre, c, "centre");
  const auto t = values_of_size(totals, 2 * c, "totals");
  const double cnt = std::max(value(count), 1.0);
  const auto gamma = per_channel(weight, c, 1.0, "weight");
  std::vector<double> k_dy(n * c);
  std::vector<double> k_x(n * c);
  std::vector<double> k_0(n * c);
  std::vector<double> ce_nc(n * c);
  for (int64_t j = 0; j < c; ++j) {
    const double kx = -gamma[j] * (is[j] * is[j] * is[j]) * t[c + j] / cnt;
    const double k0 = -gamma[j] * is[j] * t[j] / cnt + kx * (ce[j] - mb[j]);
    for (int64_t s = 0; s < n; ++s) {
      k_dy[s * c + j] = gamma[j] * is[j];
      k_x[s * c + j] = kx;
      k_0[s * c + j] = k0;
      ce_nc[s * c + j] = ce[j];
    }
  }
  return plane_combine(
      x,
      dy,
      p,
      coefficients(ce_nc, x, n, c),
      coefficients(k_dy, x, n, c),
      coefficients(k_x, x, n, c),
      coefficients(k_0, x, n, c));
}

// ---------------------------------------------------------------------------------------
// Running statistics.

template <typename T>
void fold_running(T* running, const std::vector<double>& batch, T factor) {
  const T top = std::numeric_limits<T>::max();
  for (size_t i = 0; i < batch.size(); ++i) {
    // As nan_to_num(batch.to(T)): a finite double may overflow T.
    const T b = std::min(std::max(static_cast<T>(batch[i]), -top), top);
    running[i] = running[i] + factor * (b - running[i]);
  }
}

// functional.update_running_stats_ with function._update_running's decision: fold the batch
// statistics (C,) in unless the batch is empty or a statistic is not finite (then nothing
// changes, the batch counter included). Returns whether the statistics were finite.
bool update_running_(
    Tensor running_mean,
    Tensor running_var,
    const OptionalTensor& num_batches_tracked,
    std::optional<double> momentum,
    const Tensor& count,
    const Tensor& mean,
    const Tensor& var) {
  const int64_t c = running_mean.numel();
  TORCH_CHECK(
      running_mean.is_contiguous() && running_var.is_contiguous() && running_var.numel() == c &&
          running_mean.scalar_type() == running_var.scalar_type() &&
          (running_mean.scalar_type() == at::kFloat || running_mean.scalar_type() == at::kDouble),
      "syncsn native: running statistics must be contiguous float32 or float64 tensors");
  TORCH_CHECK(
      momentum.has_value() || given(num_batches_tracked),
      "syncsn native: momentum=None needs num_batches_tracked");
  const auto bm = values_of_size(mean, c, "mean");
  const auto bv = values_of_size(var, c, "var");
  bool finite = true;
  for (int64_t j = 0; j < c; ++j) {
    finite = finite && std::isfinite(bm[j]) && std::isfinite(bv[j]);
  }
  if (!finite || !(value(count) > 0)) {
    return finite;
  }
  int64_t tracked = 0;
  if (given(num_batches_tracked)) {
    Tensor counter = *num_batches_tracked;
    TORCH_CHECK(
        counter.scalar_type() == at::kLong && counter.numel() == 1,
        "syncsn native: num_batches_tracked must be a single int64");
    tracked = ++*counter.mutable_data_ptr<int64_t>();
    torch::autograd::impl::bump_version(counter);
  }
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "syncsn_update_running", [&] {
    const scalar_t factor = momentum.has_value()
        ? static_cast<scalar_t>(*momentum)
        : scalar_t(1) / static_cast<scalar_t>(std::max<int64_t>(tracked, 1));
    fold_running(running_mean.mutable_data_ptr<scalar_t>(), bm, factor);
    fold_running(running_var.mutable_data_ptr<scalar_t>(), bv, factor);
  });
  // In-place writes: autograd must see them (a graph holding these buffers would be stale).
  torch::autograd::impl::bump_version(running_mean);
  torch::autograd::impl::bump_version(running_var);
  return finite;
}

}  // namespace
}  // namespace syncsn

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "syncsn: fused CPU steps of the normalization layers (see syncsn/function.py)";
  m.def("sn_stats", &syncsn::sn_stats);
  m.def("merge_samples", &syncsn::merge_samples);
  m.def("sn_output", &syncsn::sn_output);
  m.def("sn_backward_reduce", &syncsn::sn_backward_reduce);
  m.def("sn_backward_input", &syncsn::sn_backward_input);
  m.def("bn_stats", &syncsn::bn_stats);
  m.def("merge_elements", &syncsn::merge_elements);
  m.def("bn_output", &syncsn::bn_output);
  m.def("bn_backward_reduce", &syncsn::bn_backward_reduce);
  m.def("bn_backward_input", &syncsn::bn_backward_input);
  m.def("update_running_", &syncsn::update_running_);
}
