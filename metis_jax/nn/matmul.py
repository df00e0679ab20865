"""The linear map of every projection, `x @ kernel` over trailing axes, with a CPU-friendly VJP.

Autodiff writes the kernel gradient of `y = x @ W` as `dot(dy, x)` followed by a
transpose. XLA:CPU then asks for `dy` (or whatever elementwise op produced it, e.g.
the SwiGLU derivative) in transposed layout and fuses that op into a strided
transposing loop: in the tiny train step that one fusion was 21% of all op time
(`benchmarks/profile_top.py`: an `[4 x 500, 512]` SwiGLU gradient, 64 ms of a
500 ms step). Writing the kernel gradient as `dot(x, dy)` contracted over the
token axis lets XLA transpose the small input `x` instead, with nothing fused into
it: the SwiGLU MLP's forward + backward went from 113 to 30 ms of op time.

Both backward products see the kernel as a 2-D `[in, out]` matrix (a free reshape):
contracted over two of its axes, q/k/v's `[embed, heads, head_dim]` and the output
projection's `[heads, head_dim, embed]` were copied out transposed for `dx` every
layer (metis_base train step, B 1 x T 500: 4 copies of 9 MiB per layer; the step
went from 11.4-11.8 to 11.0-11.2 s).

The rewrite is the same math (both are exact float32 matmuls; results agree to
rounding). It is used on the CPU only: TPU and GPU layouts are chosen differently,
and there remat policies such as `checkpoint_dots` must see plain `dot_general`s.
"""

import functools
import math

import jax


def _contract(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
  axes = (tuple(range(x.ndim - contract, x.ndim)), tuple(range(contract)))
  return jax.lax.dot_general(x, kernel, (axes, ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _contract_cpu(x: jax.Array, kernel: jax.Array, contract: int) -> jax.Array:
  return _contract(x, kernel, contract)


def _contract_cpu_fwd(x, kernel, contract):
  return _contract(x, kernel, contract), (x, kernel)


def _contract_cpu_bwd(contract, residuals, dy):
  x, kernel = residuals
  n_in = x.ndim - contract  # leading (token) axes of x
  in_shape, out_shape = kernel.shape[:contract], kernel.shape[contract:]
  # As 2-D matrices (free reshapes of contiguous arrays): a kernel with 3 axes, such as
  # q/k/v's [embed, heads, head_dim], was otherwise copied out transposed for dx.
  kernel_2d = kernel.reshape(math.prod(in_shape), math.prod(out_shape))
  dy_2d = dy.reshape(dy.shape[:n_in] + (kernel_2d.shape[1],))
  x_2d = x.reshape(x.shape[:n_in] + (kernel_2d.shape[0],))
  # dx[..., in] = dy[..., out] . kernel[in, out]
  dx = jax.lax.dot_general(dy_2d, kernel_2d, (((n_in,), (1,)), ((), ())))
  # dkernel[in, out] = x[tokens, in] . dy[tokens, out], x as the left operand.
  token_axes = tuple(range(n_in))
  dkernel = jax.lax.dot_general(x_2d, dy_2d, ((token_axes, token_axes), ((), ())))
  return (dx.reshape(x.shape).astype(x.dtype),
          dkernel.reshape(kernel.shape).astype(kernel.dtype))


_contract_cpu.defvjp(_contract_cpu_fwd, _contract_cpu_bwd)


def contract_trailing(x: jax.Array, kernel: jax.Array, contract: int,
                      backend: str = "") -> jax.Array:
  """`[..., *in]` x `[*in, *out]` -> `[..., *out]`, contracting the `contract` trailing axes of x.

  Args:
    x: input, its last `contract` axes equal to the kernel's first `contract` axes.
    kernel: `[*in, *out]`.
    contract: number of contracted axes (1 for q/k/v/gate/up/down, 2 for the output
      projection over (heads, head_dim)).
    backend: the platform traced for ('cpu' takes the custom VJP); '' means
      `jax.default_backend()`.
  """
  if (backend or jax.default_backend()) == "cpu":
    return _contract_cpu(x, kernel, contract)
  return _contract(x, kernel, contract)
