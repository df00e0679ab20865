"""The training state and its sharded creation.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the
state's shardings are derived from them with the rules of `config.mesh`, and
the state is created by a jitted init whose `out_shardings` are those
shardings, so no host ever holds a whole parameter.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding

from metis_jax.parallel import mesh as mesh_lib
from metis_jax.training import optimizer as optimizer_lib
from metis_jax.training import objectives as train_objectives


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator.

  Attributes:
    step: int32 scalar, batches consumed (updates applied + skipped).
    params: model parameters (float32 master weights by default).
    opt_state: optax state (its own count counts *applied* updates).
    rng: uint32 `[2]` raw key data of the run's base PRNG key; the key of
      step s is `fold_in(key(rng), s)`, so a resumed run draws the same masks.
    skipped_steps: int32 scalar, updates skipped for a non-finite loss or
      gradient norm.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped_steps: jax.Array


@dataclasses.dataclass(frozen=True)
class Setup:
  """The static pieces of a run, built once from the config.

  Attributes:
    objective: what is trained (`train_objectives`, by `config.model.kind`).
    optimizer: the optimizer (`optimizer.make_optimizer`).
    rules: logical axis rules.
  """
  objective: Any
  optimizer: optimizer_lib.Optimizer
  rules: tuple

  @property
  def model(self) -> nn.Module:
    return self.objective.model


def make_setup(config: ml_collections.ConfigDict) -> Setup:
  """Objective (model), optimizer and logical axis rules of `config`."""
  return Setup(objective=train_objectives.make_objective(config),
               optimizer=optimizer_lib.make_optimizer(config.train), rules=mesh_lib.logical_rules(config))


def init_fn(setup: Setup, seed: int, boxed: bool = False) -> Callable[[], TrainState]:
  """A zero-argument function building the TrainState from `seed`.

  The key is made inside the function (not passed in), so the jitted init
  has no host-local inputs and runs the same on every process. `boxed`
  keeps the logical-axis boxes (for eval_shape).
  """

  def init() -> TrainState:
    init_rng, run_rng = jax.random.split(jax.random.key(seed))
    variables = setup.model.init(init_rng, **setup.model.init_inputs())
    params = variables["params"] if boxed else nn.unbox(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=setup.optimizer.init(params), rng=jax.random.key_data(run_rng),
                      skipped_steps=jnp.zeros((), jnp.int32))

  return init


def logical_specs(setup: Setup) -> TrainState:
  """TrainState-shaped pytree of logical PartitionSpecs (nothing is allocated)."""
  boxed = jax.eval_shape(init_fn(setup, 0, boxed=True))
  return nn.get_partition_spec(boxed)


def state_shardings(setup: Setup, mesh: Mesh) -> TrainState:
  """TrainState-shaped pytree of NamedShardings on `mesh`.

  Optimizer moments follow their parameter (they are built by tree_map over
  the boxed parameters, so they inherit the logical names); scalars such as
  the step and counts are replicated.
  """
  return nn.logical_to_mesh_sharding(logical_specs(setup), mesh, setup.rules)


def abstract_state(setup: Setup, mesh: Mesh) -> TrainState:
  """TrainState of `jax.ShapeDtypeStruct`s carrying their target shardings."""
  shapes = jax.eval_shape(init_fn(setup, 0))
  shardings = state_shardings(setup, mesh)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def create_sharded_state(setup: Setup, mesh: Mesh, seed: int) -> TrainState:
  """Initializes the state directly in its sharded layout (jit with out_shardings).

  Traced outside the mesh/rules context on purpose: the dummy init batch
  (batch 1) cannot honour the activation constraints, and the out_shardings
  alone make XLA partition the initializers, so each device only ever
  computes its own shards.
  """
  shardings = state_shardings(setup, mesh)
  return jax.jit(init_fn(setup, seed), out_shardings=shardings)()


def param_partition_specs(setup: Setup, mesh: Mesh) -> dict[str, Any]:
  """{'path/to/param': mesh PartitionSpec} for every parameter (for the golden file)."""
  shardings = state_shardings(setup, mesh).params
  flat = jax.tree_util.tree_flatten_with_path(shardings,
                                              is_leaf=lambda x: isinstance(x, NamedSharding))[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): sh.spec for path, sh in flat}
