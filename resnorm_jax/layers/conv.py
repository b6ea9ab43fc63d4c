"""Convolution with optional Weight Standardization (Qiao et al. 2019)."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# He et al. 2015 initialisation, fan-out mode as in the authors' Torch ResNets.
he_normal = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def standardize_weight(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Weight Standardization: Ŵ = (W − mean(W)) / (std(W) + ε) per output filter.

  Mean and std are over the (kh, kw, in) axes of an HWIO kernel.
  """
  axes = tuple(range(kernel.ndim - 1))
  mean = jnp.mean(kernel, axes, keepdims=True)
  std = jnp.std(kernel, axes, keepdims=True)
  return (kernel - mean) / (std + eps)


class Conv(nn.Module):
  """2-D NHWC convolution with symmetric padding (k−1)/2, as in Torch ResNets.

  ``weight_standardization=True`` standardizes each output filter's weights before the
  convolution.  Parameters are float32; the convolution runs in ``dtype``.
  """
  features: int
  kernel_size: int = 3
  strides: int = 1
  use_bias: bool = False
  weight_standardization: bool = False
  dtype: Any = jnp.float32
  kernel_init: Callable = he_normal

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    if self.weight_standardization:
      kernel = standardize_weight(kernel)
    pad = (k - 1) // 2
    y = lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides),
        ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,),
                         jnp.float32).astype(self.dtype)
    return y
