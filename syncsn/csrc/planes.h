// The full-size passes of the normalization layers, on CPU.
//
// An (N, C, *S) input is seen as N * C "planes" of L = prod(S) elements, in one of two dense
// layouts: contiguous (element (n, c, l) at (n * C + c) * L + l) or channels-last (at
// (n * L + l) * C + c). Every pass takes per-(n, c) coefficients as contiguous (N, C) tensors
// ("coefficient tensors") in the arithmetic type of the input: float for float, bfloat16 and
// float16 input, double for double. Reductions accumulate in double.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace syncsn {

struct Planes {
  int64_t n;
  int64_t c;
  int64_t l;
  bool channels_last;
};

// The planes of x; fails for layouts other than the two above.
Planes planes_of(const at::Tensor& x);

// True when t (same shape as the planes' tensor) has that layout.
bool has_layout(const at::Tensor& t, const Planes& p);

// The arithmetic type of the passes for an input dtype (float or double).
at::ScalarType arith_type(at::ScalarType input);

// Per-(n, c) statistics: centre (N, C) in the arithmetic type (the mean, rounded), and the
// mean and sum of squared deviations m2, (N, C) double. The squares are summed about a first
// estimate of the mean (a contiguous plane is read twice, the second time from cache; a
// channels-last sample once, about the mean of its first pixels), so the result stays exact
// for means far larger than the spread.
std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_stats(const at::Tensor& x, const Planes& p);

// y = (x - centre) * scale + shift, in x's dtype and layout.
at::Tensor plane_affine(
    const at::Tensor& x,
    const Planes& p,
    const at::Tensor& centre,
    const at::Tensor& scale,
    const at::Tensor& shift);

// Per-(n, c) s1 = sum dy and s2c = sum dy * (x - centre), (N, C) double; dy in x's layout.
std::tuple<at::Tensor, at::Tensor> plane_sums(
    const at::Tensor& x, const at::Tensor& dy, const Planes& p, const at::Tensor& centre);

// dx = k_dy * dy + k_x * (x - centre) + k_0, in x's dtype and layout.
at::Tensor plane_combine(
    const at::Tensor& x,
    const at::Tensor& dy,
    const Planes& p,
    const at::Tensor& centre,
    const at::Tensor& k_dy,
    const at::Tensor& k_x,
    const at::Tensor& k_0);

}  // namespace syncsn
