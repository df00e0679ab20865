"""The linear map of every projection, `x @ kernel` over trailing axes, with a CPU-friendly VJP.

Autodiff writes the kernel gradient of `y = x @ W` as `dot(dy, x)` followed by a
transpose. XLA:CPU then asks for `dy` (or whatever elementwise op produced it, e.g.
the SwiGLU derivative) in transposed layout and fuses that op into a strided
transposing loop: in the tiny train step that one fusion was 21% of all op time
(`benchmarks/profile_top.py`: an `[4 x 500, 512]` SwiGLU gradient, 64 ms of a
500 ms step). Writing the kernel gradient as `dot(x, dy)` contracted over the
token axis lets XLA transpose the small input `x` instead, with nothing fused into
it: the SwiGLU MLP's forward + backward went from 113 to 30 ms of op time.

The rewrite is the same math (both are exact float32 matmuls; results agree to
rounding). It is used on the CPU only: TPU and GPU layouts are chosen differently,
and there remat policies such as `checkpoint_dots` must see plain `dot_general`s.
"""

import functools

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
  n_out = kernel.ndim - contract  # feature axes of y
  # dx[..., in] = dy[..., out] . kernel[in, out]
  out_axes_dy = tuple(range(dy.ndim - n_out, dy.ndim))
  out_axes_k = tuple(range(contract, kernel.ndim))
  dx = jax.lax.dot_general(dy, kernel, ((out_axes_dy, out_axes_k), ((), ())))
  # dkernel[in, out] = x[tokens, in] . dy[tokens, out], x as the left operand.
  token_axes = tuple(range(n_in))
  dkernel = jax.lax.dot_general(x, dy, ((token_axes, token_axes), ((), ())))
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


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
