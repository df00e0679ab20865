"""Logical axis names and the rules table that maps them onto the device mesh.

Model code names every parameter axis and constrains every large activation
with *logical* names only; which mesh axis (`data`, `fsdp`, `tensor`) each
name lands on is decided here, in one table, so a sharding plan is a config
choice and never an edit of model code.
"""

from typing import Sequence

import flax.linen as nn
import jax

from metis_jax import config_base

MESH_AXES = ("data", "fsdp", "tensor")

# Logical names every rules table must map, with the mesh axes they take when
# a config's table does not name them: the LoRA rank axis is never split (its
# factors shard along their base weight's other axes).
REQUIRED_RULES = (("lora_rank", None),)


def rules_from_config(rules) -> tuple:
  """Config rules (list of [name, axis-or-list-or-None]) -> the tuple flax wants.

  Names of `REQUIRED_RULES` the table lacks are appended with their default.
  """
  out = []
  for name, axes in rules:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.append((name, axes))
  named = {name for name, _ in out}
  out.extend(rule for rule in REQUIRED_RULES if rule[0] not in named)
  return tuple(out)


# The default rules table lives with every other knob, in
# `config_base.mesh_config().logical_axis_rules` (where it is documented);
# this is that table as the tuple flax wants, for code that has no config.
DEFAULT_RULES = rules_from_config(config_base.mesh_config().logical_axis_rules)

# Shorthands for the activation layouts used throughout the model.
BATCH_LENGTH_EMBED = ("activation_batch", "activation_length", "activation_embed")
BATCH_LENGTH_HEADS_KV = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
BATCH_LENGTH_MLP = ("activation_batch", "activation_length", "activation_mlp")
BATCH_LENGTH_VOCAB = ("activation_batch", "activation_length", "activation_vocab")


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, tuple(logical_axes))


def partitioned(init_fn, logical_axes: Sequence[str | None]):
  """Wraps an initializer so the parameter carries its logical axis names."""
  return nn.with_logical_partitioning(init_fn, tuple(logical_axes))

