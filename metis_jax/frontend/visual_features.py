"""Lip-to-speech (L2S) conditions: 25 fps visual features onto the 50 Hz token grid.

The visual encoder is not released; its 768-dim features per video frame are
the input here. The original interpolates them x2 in time
(`F.interpolate(mode='linear', align_corners=False)`) and puts zero vectors on
the prompt frames.
"""

import jax.numpy as jnp


def upsample_x2(video_feat) -> jnp.ndarray:
  """Linear x2 interpolation in time, align_corners=False (edge samples clamped).

  out[2k] = 0.75 v[k] + 0.25 v[max(k-1, 0)],
  out[2k+1] = 0.75 v[k] + 0.25 v[min(k+1, T-1)].

  Args:
    video_feat: `[..., T25, dim]` features at 25 fps.

  Returns:
    `[..., 2 * T25, dim]` float32 features at 50 Hz.
  """
  v = jnp.asarray(video_feat, jnp.float32)
  if v.ndim < 2 or v.shape[-2] == 0:
    raise ValueError(f"video features must be [..., frames >= 1, dim], got shape {v.shape}")
  previous = jnp.concatenate([v[..., :1, :], v[..., :-1, :]], axis=-2)
  following = jnp.concatenate([v[..., 1:, :], v[..., -1:, :]], axis=-2)
  even = 0.75 * v + 0.25 * previous
  odd = 0.75 * v + 0.25 * following
  out = jnp.stack([even, odd], axis=-2)  # [..., T25, 2, dim]
  return out.reshape(v.shape[:-2] + (2 * v.shape[-2], v.shape[-1]))


def pad_prompt_frames(cond_feat, prompt_len: int) -> jnp.ndarray:
  """Zero vectors in front for the prompt's token frames.

  Args:
    cond_feat: `[..., T, dim]` target-frame features.
    prompt_len: number of prompt tokens (>= 0).

  Returns:
    `[..., prompt_len + T, dim]`: zeros, then `cond_feat`. The adapter of a
    zero vector is not zero (its biases), so prompt embeddings still move.
  """
  c = jnp.asarray(cond_feat, jnp.float32)
  if prompt_len < 0:
    raise ValueError(f"prompt_len must be >= 0, got {prompt_len}")
  pad = [(0, 0)] * (c.ndim - 2) + [(prompt_len, 0), (0, 0)]
  return jnp.pad(c, pad)


def l2s_condition(video_feat, prompt_len: int) -> jnp.ndarray:
  """`[..., T25, 768]` visual features -> `[..., prompt_len + 2 T25, 768]` condition."""
  return pad_prompt_frames(upsample_x2(video_feat), prompt_len)
