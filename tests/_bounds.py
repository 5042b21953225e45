"""Rounding-error bounds for comparing float32 results with float64 references.

The standard model of floating-point arithmetic, `fl(a op b) = (a op b)(1 + d)`
with `|d| <= u` (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd
ed., Sec. 2.2), gives for a sum or dot product of length n, in any summation
order and with or without fused multiply-adds (Sec. 3.1),

    |fl(x . y) - x . y| <= gamma(n) sum_i |x_i y_i|,    gamma(n) = n u / (1 - n u),

and for a chain of k roundings a relative error of at most gamma(k) (Lemma 3.1).
The references are evaluated in float64 from the same float32 inputs, so their
own error (u = 2^-53) is below 1e-9 of these bounds and is not counted. Where the
jitted code requests `Precision.HIGHEST` the bounds also hold on GPUs; on CPU
every float32 product is exact float32 anyway.
"""

import numpy as np

U32 = 2.0**-24  # float32 unit roundoff
U64 = 2.0**-53  # float64 unit roundoff


def gamma(n, u=U32):
  """`n u / (1 - n u)`: the relative error of n successive roundings."""
  n = np.asarray(n, np.float64)
  return n * u / (1 - n * u)


def dot_bound(x_abs, y_abs, n, u=U32):
  """Elementwise bound of `x @ y` (contraction length n): `gamma(n) |x| @ |y|`."""
  return gamma(n, u) * (np.asarray(x_abs, np.float64) @ np.asarray(y_abs, np.float64))


def assert_within(actual, expected, bound, what=""):
  """`|actual - expected| <= bound` elementwise, with the worst ratio in the message."""
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  bound = np.broadcast_to(np.asarray(bound, np.float64), expected.shape)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  err = np.abs(actual - expected)
  worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
  assert np.all(err <= bound), (
    f"{what}: |error| {err[worst]:.3g} > bound {bound[worst]:.3g} at {worst} "
    f"(max error / bound {np.max(err / np.maximum(bound, 1e-300)):.3g})"
  )
