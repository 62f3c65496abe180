// The full-size passes of the normalization layers, on CPU.
//
// An (N, C, *S) input is seen as N * C "planes" of L = prod(S) elements, in one of two dense
// layouts: contiguous (element (n, c, l) at (n * C + c) * L + l) or channels-last, "rows" of
// the C channels of one pixel (at (n * L + l) * C + c). An (N, C) input, or any input with
// L = 1, is rows. Per-(n, c) coefficients come in as doubles and are applied in the
// arithmetic type of the input (float for float, bfloat16 and float16 input, double for
// double); reductions accumulate in double.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace syncsn {

struct Planes {
  int64_t n;
  int64_t c;
  int64_t l;
  bool rows;  // channels-last: the channels of one pixel are adjacent
};

// The planes of x; fails for layouts other than the two above.
Planes planes_of(const at::Tensor& x);

// t (an upstream gradient of x's shape) in x's dtype and the planes' layout: t itself when
// it already is, else a copy.
at::Tensor like_planes(const at::Tensor& t, const at::Tensor& x, const Planes& p);

// The arithmetic type of the passes for an input dtype (float or double).
at::ScalarType arith_type(at::ScalarType input);

// Coefficients of the passes: the value of plane (n, c) is data[n * sample_stride + c], so
// (N, C) values have sample_stride C and per-channel (C,) values sample_stride 0.
struct Coefficients {
  const double* data;
  int64_t sample_stride;
};

// Per-(n, c) statistics: centre (N, C) in the arithmetic type (the mean, rounded), and the
// mean and the sum of squared deviations m2, (N, C) double. One pass: the squares are summed
// about the mean of the plane's first elements, which keeps the result exact for means far
// larger than the spread.
std::tuple<at::Tensor, at::Tensor, at::Tensor> plane_stats(const at::Tensor& x, const Planes& p);

// Per-(n, c) s1 = sum dy and s2c = sum dy * (x - centre), (N, C) double; dy in x's layout.
std::tuple<at::Tensor, at::Tensor> plane_sums(
    const at::Tensor& x, const at::Tensor& dy, const Planes& p, Coefficients centre);

// y = (x - centre) * scale + shift, in x's dtype and layout.
at::Tensor plane_affine(
    const at::Tensor& x,
    const Planes& p,
    Coefficients centre,
    Coefficients scale,
    Coefficients shift);

// dx = (x - centre) * k_x + k_0 + dy * k_dy, in x's dtype and layout.
at::Tensor plane_combine(
    const at::Tensor& x,
    const at::Tensor& dy,
    const Planes& p,
    Coefficients centre,
    Coefficients k_x,
    Coefficients k_0,
    Coefficients k_dy);

}  // namespace syncsn
