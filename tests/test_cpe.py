"""The PEG (conditional positional encoding) against a direct depthwise convolution; the
depthwise conv's CPU program against XLA's grouped conv."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vitjax.models.cpe import PEG

D = 8


def naive_peg(p, x, grid, npre, act=False):
  """x + DWConv_3x3(x) with zero padding, written out tap by tap."""
  kernel, bias = np.asarray(p["proj"]["kernel"]), np.asarray(p["proj"]["bias"])  # [3, 3, 1, D]
  h, w = grid
  img = np.asarray(x[:, npre:]).reshape(x.shape[0], h, w, D)
  padded = np.pad(img, ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros_like(img) + bias
  for dy in range(3):
    for dx in range(3):
      conv += padded[:, dy:dy + h, dx:dx + w] * kernel[dy, dx, 0]
  if act:
    conv = np.asarray(jax.nn.gelu(conv, approximate=False))
  return np.concatenate([np.asarray(x[:, :npre]), (img + conv).reshape(x.shape[0], h * w, D)], 1)


def random_params(m, x, grid, npre):
  p = m.init(jax.random.key(0), x, grid, npre)["params"]
  return jax.tree.map(lambda t: jax.random.normal(jax.random.key(t.size), t.shape), p)


@pytest.mark.parametrize("grid,npre,act", [((4, 5), 1, False), ((3, 3), 0, True)])
def test_peg_matches_a_direct_convolution_and_keeps_the_prefix(grid, npre, act):
  m = PEG(act=act)
  x = jax.random.normal(jax.random.key(1), (2, npre + grid[0] * grid[1], D))
  p = random_params(m, x, grid, npre)
  y = m.apply({"params": p}, x, grid, npre)
  np.testing.assert_allclose(y, naive_peg(p, x, grid, npre, act), atol=1e-5)
  r = jax.random.normal(jax.random.key(2), y.shape)
  gx = jax.grad(lambda x_: (m.apply({"params": p}, x_, grid, npre) * r).sum())(x)
  np.testing.assert_allclose(gx[:, :npre], r[:, :npre], atol=1e-6)  # the prefix passes through


def test_zero_kernel_is_the_identity_and_any_grid_runs():
  m, grid = PEG(), (4, 4)
  x = jax.random.normal(jax.random.key(1), (1, 17, D))
  p = jax.tree.map(jnp.zeros_like, m.init(jax.random.key(0), x, grid, 1)["params"])
  np.testing.assert_array_equal(m.apply({"params": p}, x, grid, 1), x)
  big = jax.random.normal(jax.random.key(3), (1, 1 + 7 * 9, D))  # the same weights, another grid
  assert m.apply({"params": p}, big, (7, 9), 1).shape == big.shape


def test_translation_equivariance_in_the_interior():
  m, grid = PEG(), (6, 6)
  img = jax.random.normal(jax.random.key(1), (1, 6, 6, D))
  p = random_params(m, img.reshape(1, 36, D), grid, 0)
  y = m.apply({"params": p}, img.reshape(1, 36, D), grid).reshape(1, 6, 6, D)
  shifted = jnp.roll(img, (1, 1), axis=(1, 2))
  ys = m.apply({"params": p}, shifted.reshape(1, 36, D), grid).reshape(1, 6, 6, D)
  np.testing.assert_allclose(ys[:, 2:5, 2:5], y[:, 1:4, 1:4], atol=1e-5)


def test_errors_are_one_line():
  x = jnp.zeros((1, 10, D))
  with pytest.raises(ValueError, match=r"^error: PEG got 10 tokens for a 3x3 grid with 0 prefix"):
    PEG().init(jax.random.key(0), x, (3, 3))
  with pytest.raises(ValueError, match=r"^error: PEG kernel_size 2; an odd int"):
    PEG(kernel_size=2).init(jax.random.key(0), x, (3, 3), 1)


@pytest.mark.parametrize("k", [3, 5])
def test_depthwise_shifted_sums_equal_the_grouped_conv(k):
  """The CPU program (shifted sums) against XLA's grouped conv: values and both gradients, on a
  grid smaller than the kernel in one direction; DepthwiseConv draws nn.Conv's parameters."""
  from vitjax.kernels import depthwise  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(0), (2, 3, 7, 5))
  w = jax.random.normal(jax.random.key(1), (k, k, 1, 5))
  np.testing.assert_allclose(depthwise.shifted(x, w), depthwise.grouped(x, w), atol=1e-5)
  grads = [jax.grad(lambda x, w, f=f: (f(x, w) ** 3).sum(), argnums=(0, 1))(x, w)
           for f in (depthwise.shifted, depthwise.grouped)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  ours = depthwise.DepthwiseConv(k).init(jax.random.key(2), x)
  flax_conv = nn.Conv(5, (k, k), padding="SAME", feature_group_count=5).init(jax.random.key(2), x)
  jax.tree.map(np.testing.assert_array_equal, ours, flax_conv)
