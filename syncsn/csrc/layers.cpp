// The steps of the kernel interface (syncsn/kernels/interface.py) on CPU, registered as the
// operators of the `syncsn_cpp` library: each is a full-size pass (planes.h) plus the small
// (N, C) / (C,) arithmetic around it, in double, written as loops so that one call replaces
// the dozens of small tensor operations of the reference backend
// (syncsn/kernels/reference.py), whose math and argument names they follow. The merge of the
// gathered statistics follows the reference's order of operations so that both give the same
// bits: every rank must agree on it, whichever backend it runs.
#include <ATen/ATen.h>
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "planes.h"

namespace syncsn {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;
using Doubles = std::vector<double>;

bool given(const OptionalTensor& t) {
  return t.has_value() && t->defined();
}

// The values of a small tensor as doubles: its own data when it is contiguous float64, else
// a converted copy. A parameter that is not given reads as `fill` everywhere.
class Values {
 public:
  Values(const Tensor& t, int64_t numel, const char* name) {
    read(t, numel, name);
  }

  Values(const OptionalTensor& t, int64_t numel, double fill, const char* name) : fill_(fill) {
    if (given(t)) {
      read(*t, numel, name);
    }
  }

  Values(const Values&) = delete;
  Values& operator=(const Values&) = delete;

  double operator[](int64_t i) const {
    return data_[i * step_];
  }

  // As the coefficients of a pass: per (n, c) when (N, C), per channel when (C,).
  Coefficients per(int64_t sample_stride) const {
    return {data_, step_ * sample_stride};
  }

 private:
  void read(const Tensor& t, int64_t numel, const char* name) {
    TORCH_CHECK(
        t.numel() == numel,
        "syncsn_cpp: ",
        name,
        " must have ",
        numel,
        " elements, got shape ",
        t.sizes());
    if (t.scalar_type() == at::kDouble && t.is_contiguous()) {
      data_ = t.const_data_ptr<double>();
    } else if (t.scalar_type() == at::kFloat && t.is_contiguous()) {
      const float* p = t.const_data_ptr<float>();
      copy_.assign(p, p + numel);
      data_ = copy_.data();
    } else {
      const Tensor d = t.to(at::kDouble).contiguous();
      const double* p = d.const_data_ptr<double>();
      copy_.assign(p, p + numel);
      data_ = copy_.data();
    }
    step_ = 1;
  }

  Doubles copy_;
  double fill_ = 0.0;
  const double* data_ = &fill_;
  int64_t step_ = 0;
};

// The mixing weights over (IN, LN, BN) in double (functional.mixing_weights64): the softmax
// of `w` when it holds logits (-inf for a scope the layer lacks), else `w` renormalised.
std::array<double, 3> mixing_weights(const Tensor& w, bool logits, const char* name) {
  const Values values(w, 3, name);
  std::array<double, 3> p = {values[0], values[1], values[2]};
  if (logits) {
    const double top = std::max({p[0], p[1], p[2]});
    for (double& e : p) {
      e = std::exp(e - top);
    }
  }
  const double total = p[0] + p[1] + p[2];
  return {p[0] / total, p[1] / total, p[2] / total};
}

// d loss / d logits from d loss / d softmax(logits) (functional.logit_grads).
void to_logit_grads(double grad[3], const std::array<double, 3>& p) {
  const double dot = grad[0] * p[0] + grad[1] * p[1] + grad[2] * p[2];
  for (int k = 0; k < 3; ++k) {
    grad[k] = p[k] * (grad[k] - dot);
  }
}

// A new contiguous tensor of `type` (double or float, else converted) holding `data`.
Tensor tensor_of(
    const Doubles& data, at::IntArrayRef sizes, const Tensor& like, at::ScalarType type) {
  if (type == at::kFloat) {
    auto t = at::empty(sizes, like.options().dtype(at::kFloat));
    std::copy(data.begin(), data.end(), t.mutable_data_ptr<float>());
    return t;
  }
  auto t = at::empty(sizes, like.options().dtype(at::kDouble));
  std::copy(data.begin(), data.end(), t.mutable_data_ptr<double>());
  return type == at::kDouble ? t : t.to(type);
}

// A new zeroed float64 tensor and its data, for results written element by element.
std::pair<Tensor, double*> new_doubles(at::IntArrayRef sizes, const Tensor& like) {
  auto t = at::empty(sizes, like.options().dtype(at::kDouble));
  double* data = t.mutable_data_ptr<double>();
  std::fill(data, data + t.numel(), 0.0);
  return {t, data};
}

// The parameter gradients (C,) in weight's dtype; empty without a weight.
std::pair<Tensor, Tensor> parameter_grads(
    const Doubles& dweight, const Doubles& dbias, const OptionalTensor& weight, const Tensor& x) {
  if (!given(weight)) {
    return {at::empty({0}, x.options()), at::empty({0}, x.options())};
  }
  const auto c = static_cast<int64_t>(dweight.size());
  return {
      tensor_of(dweight, {c}, x, weight->scalar_type()),
      tensor_of(dbias, {c}, x, weight->scalar_type())};
}

// One rank's partials (1 + 2C,) [count, mean_n a, weight * sum_n (a - mean)^2 + sum_n extra]
// from per-(n, c) values a and extra: SN's samples (count n, weight 1, extra the instance
// variances) and BN's elements (count n * L, weight L, extra the instance m2). Zeros for an
// empty batch.
Tensor partials_of(
    const double* a, const double* extra, const Planes& p, double count, double weight,
    const Tensor& like) {
  const int64_t c = p.c;
  auto [partials, out] = new_doubles({1 + 2 * c}, like);
  if (p.n == 0 || count == 0) {
    return partials;
  }
  out[0] = count;
  for (int64_t j = 0; j < c; ++j) {
    double sum_a = 0.0;
    double sum_extra = 0.0;
    for (int64_t s = 0; s < p.n; ++s) {
      sum_a += a[s * c + j];
      sum_extra += extra[s * c + j];
    }
    const double mean = sum_a / static_cast<double>(p.n);
    double spread = 0.0;
    for (int64_t s = 0; s < p.n; ++s) {
      spread += (a[s * c + j] - mean) * (a[s * c + j] - mean);
    }
    out[1 + j] = mean;
    out[1 + c + j] = weight * spread + sum_extra;
  }
  return partials;
}

// ---------------------------------------------------------------------------------------
// Switchable Normalization over (N, C, *S), or (N, C) with ddof 1 (SwitchNorm1d).

// The statistics pass: IN (var 0 when L = 1) and LN scopes, and this rank's partials.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sn_stats(const Tensor& x, int64_t ddof) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  auto [centre, mean, var] = plane_stats(x, p);
  const double* a = mean.const_data_ptr<double>();
  double* b = var.mutable_data_ptr<double>();  // m2, made the unbiased variance in place
  for (int64_t i = 0; i < n * c; ++i) {
    b[i] = p.l > 1 ? b[i] / static_cast<double>(p.l - 1) : 0.0;
  }
  auto [ln_mean, mu_ln] = new_doubles({n}, x);
  auto [ln_var, var_ln] = new_doubles({n}, x);
  // One feature with ddof 1 (SwitchNorm1d(1)): a variance over one value, 0 like IN's.
  const double ln_divisor = static_cast<double>(std::max<int64_t>(c - ddof, 1));
  for (int64_t s = 0; s < n; ++s) {
    const double* as = a + s * c;
    const double* bs = b + s * c;
    double sum_a = 0.0;
    double sum_b = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      sum_a += as[j];
      sum_b += bs[j];
    }
    const double mu = sum_a / static_cast<double>(c);
    double spread = 0.0;
    for (int64_t j = 0; j < c; ++j) {
      spread += (as[j] - mu) * (as[j] - mu);
    }
    mu_ln[s] = mu;
    var_ln[s] = (sum_b + spread) / ln_divisor;
  }
  auto partials = partials_of(a, b, p, static_cast<double>(n), 1.0, x);
  return {centre, mean, var, ln_mean, ln_var, partials};
}

// The statistics of one call, read once for the steps after the statistics pass.
struct SNScopes {
  SNScopes(
      const Planes& p, const Tensor& centre, const Tensor& mean, const Tensor& var,
      const Tensor& ln_mean, const Tensor& ln_var, const OptionalTensor& bn_mean,
      const OptionalTensor& bn_var)
      : centre(centre, p.n * p.c, "centre"),
        a(mean, p.n * p.c, "mean"),
        b(var, p.n * p.c, "var"),
        ln_mean(ln_mean, p.n, "ln_mean"),
        ln_var(ln_var, p.n, "ln_var"),
        has_bn(given(bn_mean) && given(bn_var)),
        bn_mean(bn_mean, p.c, 0.0, "bn_mean"),
        bn_var(bn_var, p.c, 0.0, "bn_var") {}

  const Values centre, a, b, ln_mean, ln_var;
  const bool has_bn;
  const Values bn_mean, bn_var;
};

// Mixes the scopes and normalizes: y, and the mixed mean, var and rstd (N, C) float64.
std::tuple<Tensor, Tensor, Tensor, Tensor> sn_output(
    const Tensor& x, const Tensor& centre, const Tensor& mean, const Tensor& var,
    const Tensor& ln_mean, const Tensor& ln_var, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const Tensor& w, const Tensor& v, const OptionalTensor& weight,
    const OptionalTensor& bias, double eps, bool logits) {
  const Planes p = planes_of(x);
  const int64_t c = p.c;
  const SNScopes in(p, centre, mean, var, ln_mean, ln_var, bn_mean, bn_var);
  const auto wk = mixing_weights(w, logits, "w");
  const auto vk = mixing_weights(v, logits, "v");
  const Values gamma(weight, c, 1.0, "weight");
  const Values beta(bias, c, 0.0, "bias");
  auto [mixed_mean, mu] = new_doubles({p.n, c}, x);
  auto [mixed_var, sigma2] = new_doubles({p.n, c}, x);
  auto [rstd, r] = new_doubles({p.n, c}, x);
  Doubles scale(p.n * c);
  Doubles shift(p.n * c);
  for (int64_t s = 0; s < p.n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      mu[i] = wk[0] * in.a[i] + wk[1] * in.ln_mean[s];
      sigma2[i] = vk[0] * in.b[i] + vk[1] * in.ln_var[s];
      if (in.has_bn) {
        mu[i] += wk[2] * in.bn_mean[j];
        sigma2[i] += vk[2] * in.bn_var[j];
      }
      r[i] = 1.0 / std::sqrt(sigma2[i] + eps);
      scale[i] = r[i] * gamma[j];
      shift[i] = (in.centre[i] - mu[i]) * scale[i] + beta[j];
    }
  }
  auto y = plane_affine(x, p, in.centre.per(c), {scale.data(), c}, {shift.data(), c});
  return {y, mixed_mean, mixed_var, rstd};
}

// The backward reduction pass and the small math up to the backward collective: this rank's
// BN totals (zeros without the BN scope), the IN and LN terms of the gradients with respect
// to the instance statistics, and the local parameter gradients.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> sn_backward_reduce(
    const Tensor& x, const Tensor& dy_in, const Tensor& centre, const Tensor& mean,
    const Tensor& var, const Tensor& ln_mean, const Tensor& ln_var, const Tensor& mixed_mean,
    const Tensor& mixed_var, const Tensor& rstd, const OptionalTensor& bn_mean,
    const OptionalTensor& bn_var, const Tensor& w, const Tensor& v, const OptionalTensor& weight,
    int64_t ddof, bool logits) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const SNScopes in(p, centre, mean, var, ln_mean, ln_var, bn_mean, bn_var);
  const Values m(mixed_mean, n * c, "mixed_mean");
  const Values sigma2(mixed_var, n * c, "mixed_var");
  const Values r(rstd, n * c, "rstd");
  const auto wk = mixing_weights(w, logits, "w");
  const auto vk = mixing_weights(v, logits, "v");
  const Values gamma(weight, c, 1.0, "weight");

  const Tensor dy = like_planes(dy_in, x, p);
  auto [s1_t, s2c_t] = plane_sums(x, dy, p, in.centre.per(c));
  const double* s1 = s1_t.const_data_ptr<double>();
  const double* s2c = s2c_t.const_data_ptr<double>();
  Doubles g_mu(n * c);
  Doubles g_var(n * c);
  Doubles dweight(c, 0.0);
  Doubles dbias(c, 0.0);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      const double s2 = s2c[i] + (in.centre[i] - m[i]) * s1[i];  // sum dy * (x - mu)
      g_mu[i] = -r[i] * gamma[j] * s1[i];
      g_var[i] = -0.5 * (r[i] * r[i] * r[i]) * gamma[j] * s2;
      dweight[j] += r[i] * s2;
      dbias[j] += s1[i];
    }
  }
  // IN scope, then LN: per sample, over the channels.
  const double ln_divisor = static_cast<double>(std::max<int64_t>(c - ddof, 1));
  auto [grad_mean, g_a] = new_doubles({n, c}, x);
  auto [grad_var, g_b] = new_doubles({n, c}, x);
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
      g_a[i] = wk[0] * g_mu[i] + m_n / c + v_n * 2 * (in.a[i] - in.ln_mean[s]) / ln_divisor;
      g_b[i] = vk[0] * g_var[i] + v_n / ln_divisor;
    }
  }
  // BN: per channel, over the samples of every rank (the caller sums these totals); and the
  // switch logits: sum g * (scope - mixed), exact when the scopes are large and close.
  auto [totals, sums] = new_doubles({2 * c}, x);
  double dw[3] = {0.0, 0.0, 0.0};
  double dv[3] = {0.0, 0.0, 0.0};
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      dw[0] += g_mu[i] * (in.a[i] - m[i]);
      dw[1] += g_mu[i] * (in.ln_mean[s] - m[i]);
      dv[0] += g_var[i] * (in.b[i] - sigma2[i]);
      dv[1] += g_var[i] * (in.ln_var[s] - sigma2[i]);
      if (in.has_bn) {
        dw[2] += g_mu[i] * (in.bn_mean[j] - m[i]);
        dv[2] += g_var[i] * (in.bn_var[j] - sigma2[i]);
        sums[j] += wk[2] * g_mu[i];
        sums[c + j] += vk[2] * g_var[i];
      }
    }
  }
  if (logits) {
    to_logit_grads(dw, wk);
    to_logit_grads(dv, vk);
  }
  auto [grad_weight, grad_bias] = parameter_grads(dweight, dbias, weight, x);
  return {
      totals,
      grad_mean,
      grad_var,
      tensor_of({dw[0], dw[1], dw[2]}, {3}, x, w.scalar_type()),
      tensor_of({dv[0], dv[1], dv[2]}, {3}, x, v.scalar_type()),
      grad_weight,
      grad_bias};
}

// dx, with the BN terms from the summed totals and the global count when given.
Tensor sn_backward_input(
    const Tensor& x, const Tensor& dy, const Tensor& centre, const Tensor& mean,
    const Tensor& rstd, const Tensor& grad_mean, const Tensor& grad_var,
    const OptionalTensor& bn_mean, const OptionalTensor& totals, const OptionalTensor& count,
    const OptionalTensor& weight, int64_t ddof) {
  const Planes p = planes_of(x);
  const int64_t n = p.n;
  const int64_t c = p.c;
  const Values ce(centre, n * c, "centre");
  const Values a(mean, n * c, "mean");
  const Values r(rstd, n * c, "rstd");
  const Values g_a(grad_mean, n * c, "grad_mean");
  const Values g_b(grad_var, n * c, "grad_var");
  const Values gamma(weight, c, 1.0, "weight");
  const bool batch_scope = given(totals) && given(count) && given(bn_mean);
  const Values t(totals, 2 * c, 0.0, "totals");
  const Values mb(bn_mean, c, 0.0, "bn_mean");
  const double global = batch_scope ? Values(*count, 1, "count")[0] : 0.0;
  const double n_tot = std::max(global, 1.0);
  const double n_var = std::max(global - static_cast<double>(ddof), 1.0);
  const double length = static_cast<double>(p.l);
  Doubles k_x(n * c);
  Doubles k_0(n * c);
  Doubles k_dy(n * c);
  for (int64_t s = 0; s < n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      const int64_t i = s * c + j;
      double ga = g_a[i];
      double gb = g_b[i];
      if (batch_scope) {
        ga += t[j] / n_tot + t[c + j] * 2 * (a[i] - mb[j]) / n_var;
        gb += t[c + j] / n_var;
      }
      // d var_in / dx = 2 (x - a) / (L - 1) with x - a = (x - centre) + (centre - a); an
      // input with L = 1 has no IN variance.
      k_x[i] = p.l > 1 ? 2 * gb / (length - 1) : 0.0;
      k_0[i] = ga / std::max(length, 1.0) + k_x[i] * (ce[i] - a[i]);
      k_dy[i] = gamma[j] * r[i];
    }
  }
  return plane_combine(
      x, like_planes(dy, x, p), p, ce.per(c), {k_x.data(), c}, {k_0.data(), c},
      {k_dy.data(), c});
}

// ---------------------------------------------------------------------------------------
// Batch Normalization over (N, C, *S), pixel-weighted.

// The statistics pass: the per-(n, c) centre and this rank's partials [N * L, mean, m2].
std::tuple<Tensor, Tensor> bn_stats(const Tensor& x) {
  const Planes p = planes_of(x);
  auto [centre, mean, m2] = plane_stats(x, p);
  const auto count = static_cast<double>(p.n * p.l);
  const auto length = static_cast<double>(p.l);
  auto partials =
      partials_of(mean.const_data_ptr<double>(), m2.const_data_ptr<double>(), p, count, length, x);
  return {centre, partials};
}

// y from the global mean and biased variance (C,) float64; and what backward needs: the
// global mean in the arithmetic type (the centre of the backward passes), the mean itself and
// rstd (C,) float64.
std::tuple<Tensor, Tensor, Tensor, Tensor> bn_output(
    const Tensor& x, const Tensor& centre, const Tensor& mean, const Tensor& var,
    const OptionalTensor& weight, const OptionalTensor& bias, double eps) {
  const Planes p = planes_of(x);
  const int64_t c = p.c;
  const Values ce(centre, p.n * c, "centre");
  const Values mb(mean, c, "mean");
  const Values sigma2(var, c, "var");
  const Values gamma(weight, c, 1.0, "weight");
  const Values beta(bias, c, 0.0, "bias");
  Doubles saved_mean(c);
  Doubles invstd(c);
  Doubles scale(c);
  Doubles shift(p.n * c);
  for (int64_t j = 0; j < c; ++j) {
    saved_mean[j] = mb[j];
    invstd[j] = 1.0 / std::sqrt(sigma2[j] + eps);
    scale[j] = invstd[j] * gamma[j];
  }
  for (int64_t s = 0; s < p.n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      shift[s * c + j] = (ce[s * c + j] - mb[j]) * scale[j] + beta[j];
    }
  }
  auto y = plane_affine(x, p, ce.per(c), {scale.data(), 0}, {shift.data(), c});
  return {
      y,
      tensor_of(saved_mean, {c}, x, arith_type(x.scalar_type())),
      tensor_of(saved_mean, {c}, x, at::kDouble),
      tensor_of(invstd, {c}, x, at::kDouble)};
}

// The backward reduction: this rank's totals (2C,) [sum dy, sum dy * (x - mean)] and the
// local parameter gradients.
std::tuple<Tensor, Tensor, Tensor> bn_backward_reduce(
    const Tensor& x, const Tensor& dy, const Tensor& centre, const Tensor& mean,
    const Tensor& rstd, const OptionalTensor& weight) {
  const Planes p = planes_of(x);
  const int64_t c = p.c;
  const Values ce(centre, c, "centre");
  const Values mb(mean, c, "mean");
  const Values r(rstd, c, "rstd");
  auto [s1_t, s2c_t] = plane_sums(x, like_planes(dy, x, p), p, ce.per(0));
  const double* s1 = s1_t.const_data_ptr<double>();
  const double* s2c = s2c_t.const_data_ptr<double>();
  auto [totals, sums] = new_doubles({2 * c}, x);
  for (int64_t s = 0; s < p.n; ++s) {
    for (int64_t j = 0; j < c; ++j) {
      sums[j] += s1[s * c + j];
      sums[c + j] += s2c[s * c + j];
    }
  }
  Doubles dweight(c);
  Doubles dbias(c);
  for (int64_t j = 0; j < c; ++j) {
    sums[c + j] += (ce[j] - mb[j]) * sums[j];
    dweight[j] = sums[c + j] * r[j];
    dbias[j] = sums[j];
  }
  auto [grad_weight, grad_bias] = parameter_grads(dweight, dbias, weight, x);
  return {totals, grad_weight, grad_bias};
}

// dx from the totals summed over the ranks and the global count.
Tensor bn_backward_input(
    const Tensor& x, const Tensor& dy, const Tensor& centre, const Tensor& mean,
    const Tensor& rstd, const OptionalTensor& weight, const Tensor& totals, const Tensor& count) {
  const Planes p = planes_of(x);
  const int64_t c = p.c;
  const Values ce(centre, c, "centre");
  const Values mb(mean, c, "mean");
  const Values r(rstd, c, "rstd");
  const Values t(totals, 2 * c, "totals");
  const Values gamma(weight, c, 1.0, "weight");
  const double n_tot = std::max(Values(count, 1, "count")[0], 1.0);
  Doubles k_x(c);
  Doubles k_0(c);
  Doubles k_dy(c);
  for (int64_t j = 0; j < c; ++j) {
    k_x[j] = -gamma[j] * (r[j] * r[j] * r[j]) * t[c + j] / n_tot;
    k_0[j] = -gamma[j] * r[j] * t[j] / n_tot + k_x[j] * (ce[j] - mb[j]);
    k_dy[j] = gamma[j] * r[j];
  }
  return plane_combine(
      x, like_planes(dy, x, p), p, ce.per(0), {k_x.data(), 0}, {k_0.data(), 0},
      {k_dy.data(), 0});
}

// --- the shared merge ---------------------------------------------------------------------
// Its results must be the reference's bits, so no multiply-add is fused into one rounding.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#elif defined(__clang__)
#pragma clang fp contract(off)
#endif

// The bits of interface.Flags.
constexpr int32_t kNonFinite = 1;
constexpr int32_t kOverflow = 2;
constexpr int32_t kTooFew = 4;

// (1 - factor) * running + factor * batch in double, rounded to the buffer's type as
// Tensor.to() rounds (reference functional.fold_running).
template <typename T>
bool fold_into(const T* running, const double* batch, double factor, std::vector<T>& out) {
  bool finite = true;
  for (size_t j = 0; j < out.size(); ++j) {
    const double r = static_cast<double>(running[j]);
    out[j] = static_cast<T>(r + factor * (batch[j] - r));
    finite = finite && std::isfinite(static_cast<double>(out[j]));
  }
  return finite;
}

template <typename T>
int32_t fold_running(
    Tensor& running_mean, Tensor& running_var, const double* mean, const Doubles& unbiased,
    double factor) {
  T* rm = running_mean.mutable_data_ptr<T>();
  T* rv = running_var.mutable_data_ptr<T>();
  std::vector<T> new_mean(unbiased.size());
  std::vector<T> new_var(unbiased.size());
  const bool fits_mean = fold_into(rm, mean, factor, new_mean);
  const bool fits_var = fold_into(rv, unbiased.data(), factor, new_var);
  if (!(fits_mean && fits_var)) {
    return kOverflow;
  }
  std::copy(new_mean.begin(), new_mean.end(), rm);
  std::copy(new_var.begin(), new_var.end(), rv);
  return 0;
}

// The Chan merge of the gathered (world, 1 + 2C) partials (or one rank's (1 + 2C,)), the flags
// and the fold into the running statistics (interface.Backend.merge).
std::tuple<Tensor, Tensor, Tensor, Tensor> merge(
    const Tensor& gathered, int64_t ddof, const OptionalTensor& running_mean,
    const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
    std::optional<double> momentum, int64_t running_ddof) {
  TORCH_CHECK(
      (gathered.dim() == 1 || gathered.dim() == 2) && gathered.scalar_type() == at::kDouble &&
          gathered.size(-1) % 2 == 1,
      "syncsn_cpp: merge expects (world, 1 + 2C) or (1 + 2C,) float64 partials, got ",
      gathered.scalar_type(), " of shape ", gathered.sizes());
  const Tensor parts = gathered.contiguous();
  const double* g = parts.const_data_ptr<double>();
  const int64_t world = parts.dim() == 2 ? parts.size(0) : 1;
  const int64_t width = parts.size(-1);
  const int64_t c = (width - 1) / 2;

  double n = 0.0;
  for (int64_t r = 0; r < world; ++r) {
    n += g[r * width];
  }
  auto [mean_t, mean] = new_doubles({c}, parts);
  auto [var_t, var] = new_doubles({c}, parts);
  Doubles m2(c, 0.0);
  for (int64_t r = 0; r < world; ++r) {
    for (int64_t j = 0; j < c; ++j) {
      mean[j] += g[r * width] * g[r * width + 1 + j];
    }
  }
  const double denominator = std::max(n, 1.0);
  bool finite = true;
  for (int64_t j = 0; j < c; ++j) {
    mean[j] /= denominator;
    for (int64_t r = 0; r < world; ++r) {
      const double d = g[r * width + 1 + j] - mean[j];
      m2[j] += g[r * width + 1 + c + j] + g[r * width] * (d * d);
    }
    var[j] = m2[j] / std::max(n - static_cast<double>(ddof), 1.0);
    finite = finite && std::isfinite(mean[j]) && std::isfinite(m2[j]);
  }
  const bool enough = n >= 2.0;
  int32_t flags = (finite ? 0 : kNonFinite) | ((n > 0.0 && !enough) ? kTooFew : 0);

  if (given(running_mean) && given(running_var) && finite && enough) {
    Tensor rm = *running_mean;
    Tensor rv = *running_var;
    TORCH_CHECK(
        rm.is_contiguous() && rv.is_contiguous() && rm.numel() == c && rv.numel() == c &&
            rm.scalar_type() == rv.scalar_type(),
        "syncsn_cpp: merge expects contiguous (C,) running statistics of one dtype, got ",
        rm.scalar_type(), " ", rm.sizes(), " and ", rv.scalar_type(), " ", rv.sizes());
    double factor = momentum.value_or(0.0);
    if (!momentum.has_value()) {
      TORCH_CHECK(
          given(num_batches_tracked),
          "merge: momentum=None (cumulative average) needs num_batches_tracked, got None");
      // Read from memory, not with item(): the dispatcher sees no host read of a tensor.
      const Tensor tracked = num_batches_tracked->to(at::kLong);
      const double done = static_cast<double>(*tracked.const_data_ptr<int64_t>() + 1);
      factor = 1.0 / std::max(done, 1.0);
    }
    Doubles unbiased(c);
    const double unbiased_denominator = std::max(n - static_cast<double>(running_ddof), 1.0);
    for (int64_t j = 0; j < c; ++j) {
      unbiased[j] = m2[j] / unbiased_denominator;
    }
    int32_t overflow = 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rm.scalar_type(), "merge", [&] {
      overflow = fold_running<scalar_t>(rm, rv, mean, unbiased, factor);
    });
    flags |= overflow;
    if (overflow == 0 && given(num_batches_tracked)) {
      Tensor tracked = *num_batches_tracked;
      if (tracked.scalar_type() == at::kLong && tracked.numel() == 1) {
        *tracked.mutable_data_ptr<int64_t>() += 1;
      } else {
        tracked.add_(1);
      }
    }
  }
  auto count = at::empty({}, parts.options());
  *count.mutable_data_ptr<double>() = n;
  auto flag_tensor = at::empty({}, parts.options().dtype(at::kInt));
  *flag_tensor.mutable_data_ptr<int32_t>() = flags;
  return {count, mean_t, var_t, flag_tensor};
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

}  // namespace
}  // namespace syncsn

// The schemas name every argument and result as the interface does; optional tensors are
// the scopes and parameters a layer may not have.
TORCH_LIBRARY(syncsn_cpp, m) {
  m.def(
      "sn_stats(Tensor x, int ddof) -> (Tensor centre, Tensor mean, Tensor var, "
      "Tensor ln_mean, Tensor ln_var, Tensor partials)");
  m.def(
      "sn_output(Tensor x, Tensor centre, Tensor mean, Tensor var, Tensor ln_mean, "
      "Tensor ln_var, Tensor? bn_mean, Tensor? bn_var, Tensor w, Tensor v, Tensor? weight, "
      "Tensor? bias, float eps, bool logits) -> (Tensor y, Tensor mixed_mean, "
      "Tensor mixed_var, Tensor rstd)");
  m.def(
      "sn_backward_reduce(Tensor x, Tensor dy, Tensor centre, Tensor mean, Tensor var, "
      "Tensor ln_mean, Tensor ln_var, Tensor mixed_mean, Tensor mixed_var, Tensor rstd, "
      "Tensor? bn_mean, Tensor? bn_var, Tensor w, Tensor v, Tensor? weight, int ddof, "
      "bool logits) -> (Tensor totals, Tensor grad_mean, Tensor grad_var, Tensor grad_w, Tensor grad_v, "
      "Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "sn_backward_input(Tensor x, Tensor dy, Tensor centre, Tensor mean, Tensor rstd, "
      "Tensor grad_mean, Tensor grad_var, Tensor? bn_mean, Tensor? totals, Tensor? count, "
      "Tensor? weight, int ddof) -> Tensor dx");
  m.def("bn_stats(Tensor x) -> (Tensor centre, Tensor partials)");
  m.def(
      "merge(Tensor gathered, int ddof, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor(c!)? num_batches_tracked, float? momentum, int running_ddof) -> (Tensor count, "
      "Tensor mean, Tensor var, Tensor flags)");
  m.def(
      "bn_output(Tensor x, Tensor centre, Tensor mean, Tensor var, Tensor? weight, "
      "Tensor? bias, float eps) -> (Tensor y, Tensor saved_centre, Tensor saved_mean, "
      "Tensor rstd)");
  m.def(
      "bn_backward_reduce(Tensor x, Tensor dy, Tensor centre, Tensor mean, Tensor rstd, "
      "Tensor? weight) -> (Tensor totals, Tensor grad_weight, Tensor grad_bias)");
  m.def(
      "bn_backward_input(Tensor x, Tensor dy, Tensor centre, Tensor mean, Tensor rstd, "
      "Tensor? weight, Tensor totals, Tensor count) -> Tensor dx");
}

// The same functions at the CPU and the autograd dispatch keys: the layers' autograd
// Functions own the derivatives and call these under no_grad, so the autograd key goes
// straight to the kernel instead of through the fallback, which inspects every argument and
// redispatches (a few microseconds a call, as much as a small layer's arithmetic).
void register_kernels(torch::Library& m) {
  m.impl("sn_stats", &syncsn::sn_stats);
  m.impl("sn_output", &syncsn::sn_output);
  m.impl("sn_backward_reduce", &syncsn::sn_backward_reduce);
  m.impl("sn_backward_input", &syncsn::sn_backward_input);
  m.impl("bn_stats", &syncsn::bn_stats);
  m.impl("merge", &syncsn::merge);
  m.impl("bn_output", &syncsn::bn_output);
  m.impl("bn_backward_reduce", &syncsn::bn_backward_reduce);
  m.impl("bn_backward_input", &syncsn::bn_backward_input);
}

TORCH_LIBRARY_IMPL(syncsn_cpp, CPU, m) {
  register_kernels(m);
}

TORCH_LIBRARY_IMPL(syncsn_cpp, AutogradCPU, m) {
  register_kernels(m);
}

// The same functions as a Python module, for the CPU backend's calls (syncsn/kernels/cpp.py).
// Called through the dispatcher from Python, each operator costs about 3 us more per call in
// a training step (boxing the arguments, and the dispatcher's code evicted from the caches by
// the Python between calls): on small feature maps as much as the arithmetic. The GIL is
// released as the dispatcher does.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("sn_stats", &syncsn::sn_stats, release());
  m.def("sn_output", &syncsn::sn_output, release());
  m.def("sn_backward_reduce", &syncsn::sn_backward_reduce, release());
  m.def("sn_backward_input", &syncsn::sn_backward_input, release());
  m.def("bn_stats", &syncsn::bn_stats, release());
  m.def("merge", &syncsn::merge, release());
  m.def("bn_output", &syncsn::bn_output, release());
  m.def("bn_backward_reduce", &syncsn::bn_backward_reduce, release());
  m.def("bn_backward_input", &syncsn::bn_backward_input, release());
}
