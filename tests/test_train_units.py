"""Small pieces of the trainer: schedule, weight decay, mesh sizes, FLOPs, metrics, launchers, CLI."""

import glob
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from metis_jax import config_base
from metis_jax.parallel import distributed
from metis_jax.training import codec_objective
from metis_jax.training import input_pipeline
from metis_jax.parallel import mesh as mesh_lib
from metis_jax.models import metis
from metis_jax.training import metrics
from metis_jax.training import optimizer
from metis_jax.parallel import sharding
from metis_jax.training import step as train_step
from tests import train_testlib as lib


def train_cfg(**kw):
  c = config_base.train_config()
  c.update(dict(steps=100, learning_rate=1.0, warmup_steps=10, end_learning_rate_ratio=0.1), **kw)
  return c


@pytest.mark.parametrize("decay, at_60", [("cosine", 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 50 / 90))),
                                          ("linear", 1.0 - 0.9 * 50 / 90), ("constant", 1.0)])
def test_schedule_warms_up_linearly_then_decays_to_the_end_ratio(decay, at_60):
  lr = optimizer.learning_rate_schedule(train_cfg(decay=decay))
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(at_60, rel=1e-5)
  assert float(lr(100)) == pytest.approx(1.0 if decay == "constant" else 0.1, rel=1e-5)
  with pytest.raises(ValueError, match="decay"):
    optimizer.learning_rate_schedule(train_cfg(decay="exp"))


def test_weight_decay_only_on_matmul_kernels():
  model = metis.MetisModel(metis.MetisConfig.from_config(lib.tiny_config("model.use_phone_cond=True",
                                                                         "model.cond_feature_dim=8").model))
  params = jax.eval_shape(lambda: metis.init_params(model, jax.random.key(0)))
  mask = optimizer.weight_decay_mask(params)
  flat = {"/".join(str(k.key) for k in path): v
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  assert "backbone/layers/attention/query/kernel" in decayed
  assert "backbone/layers/mlp/down/kernel" in decayed and "to_logits/kernel" in decayed
  assert "adapter/in_linear/kernel" in decayed and "phone_mlp/fc1/kernel" in decayed
  for name in ("token_embed/embedding", "phone_embed/embedding", "mask_embedding", "to_logits/bias",
               "backbone/layers/input_norm/to_weight/kernel", "backbone/final_norm/to_weight/bias",
               "adapter/gate_scale", "backbone/time_mlp/fc1/bias"):
    assert not flat[name], name


def test_adamw_decays_masked_parameters_only():
  opt = optimizer.make_optimizer(train_cfg(warmup_steps=0, decay="constant", weight_decay=0.5,
                                           learning_rate=0.1, grad_clip_norm=0.0))
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}}
  zeros = jax.tree.map(jnp.zeros_like, params)
  new, _ = opt.apply(zeros, opt.init(params), params, jnp.float32(0.0), jnp.ones((), bool))
  np.testing.assert_allclose(new["dense"]["kernel"], 1.0 - 0.05)  # w - lr * wd * w
  np.testing.assert_allclose(new["dense"]["bias"], 1.0)


def mesh_cfg(**kw):
  c = config_base.mesh_config()
  c.update(kw)
  return c


def test_mesh_sizes_fill_the_minus_one_axis_and_reject_bad_shapes():
  assert mesh_lib.mesh_shapes(mesh_cfg(), 8) == ((1, 8, 1), (1, 1, 1))
  assert mesh_lib.mesh_shapes(mesh_cfg(data=2, fsdp=-1, tensor=2), 8) == ((2, 2, 2), (1, 1, 1))
  assert mesh_lib.mesh_shapes(mesh_cfg(fsdp=-1), 512, slices=2) == ((1, 256, 1), (2, 1, 1))
  for bad in (dict(data=-1, fsdp=-1), dict(fsdp=3), dict(data=2, fsdp=2, tensor=1), dict(tensor=0)):
    with pytest.raises(ValueError, match="ICI mesh"):
      mesh_lib.mesh_shapes(mesh_cfg(**bad), 8)
  mesh = mesh_lib.create_mesh(mesh_cfg(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert mesh_lib.data_parallel_size(mesh) == 4


def test_default_rules_come_from_the_config():
  assert sharding.DEFAULT_RULES == mesh_lib.logical_rules(config_base.get_config())
  assert dict(sharding.DEFAULT_RULES)["activation_batch"] == ("data", "fsdp")


def test_training_flops_count_full_bidirectional_attention():
  model = ml_collections.ConfigDict(dict(hidden_size=1536, num_layers=16, mlp_ratio=4, vocab_size=8192))
  per_layer = 4 * 1536 ** 2 + 3 * 1536 * 6144 + 2 * 1024 * 1536
  expected = 3 * 2 * (16 * per_layer + 1536 * 8192)
  assert metrics.training_flops_per_token(model, 1024) == expected
  # Doubling T adds 2 * T * H per layer (both QK^T and AV over all keys).
  extra = metrics.training_flops_per_token(model, 2048) - expected
  assert extra == 3 * 2 * 16 * 2 * 1024 * 1536


@pytest.mark.parametrize("kind, peak", [("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
                                        ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
                                        ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA A100-SXM4-80GB", 312e12), ("cpu", metrics.CPU_FALLBACK_FLOPS)])
def test_peak_flops_table(kind, peak):
  assert metrics.peak_flops_per_device(kind) == peak
  assert metrics.peak_flops_per_device(kind, override=5.0) == 5.0


def test_metrics_are_read_one_step_late_and_written_to_tensorboard(tmp_path):
  config = lib.tiny_config("logging.tensorboard=True", "train.steps=3")
  logger = metrics.MetricsLogger(str(tmp_path), config, num_devices=1, device_kind="cpu", is_writer=True)
  fake = lambda v: {k: jnp.float32(v) for k in ("loss", "accuracy", "grad_norm", "learning_rate")}
  assert logger.push(1, fake(1.0)) is None  # nothing fetched yet: the host did not wait
  assert logger.push(2, fake(2.0))["loss"] == 1.0
  assert logger.flush()["step"] == 2
  assert "mfu" in logger.history[-1] and logger.history[-1]["tokens_per_second"] > 0
  logger.close()
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
  line = metrics.progress_line(2, 3, logger.history[-1])
  assert line.startswith("step 2/3 |") and "tok/s" in line and "MFU" in line


def test_synthetic_batches_do_not_depend_on_the_number_of_processes():
  whole = input_pipeline.synthetic_rows(0, 5, np.arange(8), 16, 64)
  halves = [input_pipeline.synthetic_rows(0, 5, np.arange(4 * p, 4 * p + 4), 16, 64) for p in (0, 1)]
  for key in ("tokens", "valid"):
    np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
  assert whole["valid"][:, 0].all() and not np.array_equal(whole["tokens"],
                                                          input_pipeline.synthetic_rows(0, 6, np.arange(8), 16, 64)["tokens"])


def test_packed_batches_are_rejected_with_the_reason():
  with pytest.raises(NotImplementedError, match="segment_ids"):
    train_step.check_batch({"tokens": 0, "valid": 0, "segment_ids": 0})
  with pytest.raises(KeyError, match="valid"):
    train_step.check_batch({"tokens": 0})


def test_microbatches_interleave_rows():
  x = jnp.arange(8)
  np.testing.assert_array_equal(train_step.split_microbatches(x, 2), [[0, 2, 4, 6], [1, 3, 5, 7]])
  with pytest.raises(ValueError, match="divisible"):
    train_step.split_microbatches(x, 3)


def test_distributed_arguments_from_flags_or_environment(monkeypatch):
  for key in ("METIS_COORDINATOR_ADDRESS", "METIS_NUM_PROCESSES", "METIS_PROCESS_ID",
              "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "CLOUD_TPU_TASK_ID"):
    monkeypatch.delenv(key, raising=False)
  assert distributed.resolve() == {}
  assert distributed.resolve("h:1", 2, 1) == dict(coordinator_address="h:1", num_processes=2, process_id=1)
  monkeypatch.setenv("METIS_COORDINATOR_ADDRESS", "10.0.0.1:99")
  monkeypatch.setenv("METIS_NUM_PROCESSES", "4")
  monkeypatch.setenv("METIS_PROCESS_ID", "3")
  assert distributed.resolve()["process_id"] == 3
  assert distributed.resolve(process_id=0)["process_id"] == 0  # flags win
  monkeypatch.delenv("METIS_PROCESS_ID")
  with pytest.raises(ValueError, match="process id"):
    distributed.resolve()
  for key in ("METIS_COORDINATOR_ADDRESS", "METIS_NUM_PROCESSES"):
    monkeypatch.delenv(key)
  monkeypatch.setattr(distributed.glob, "glob", lambda pattern: [])
  monkeypatch.setattr(distributed.os.path, "isdir", lambda path: False)
  assert distributed.resolve() == {}  # a plain machine: one process
  monkeypatch.setenv("TPU_WORKER_ID", "1")
  assert distributed.resolve() == {"auto": True}


def run(cmd, env=None):
  return subprocess.run(cmd, cwd=lib.REPO_ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, **(env or {})))


def test_launchers_dry_run():
  out = run([sys.executable, "launch/local_multiprocess.py", "--num_processes", "3", "--dry_run", "--",
             "python", "-m", "metis_jax.train"])
  lines = out.stdout.strip().splitlines()
  assert out.returncode == 0 and len(lines) == 3
  assert "METIS_PROCESS_ID=2" in lines[2] and "device_count=4" in lines[2]
  out = run(["bash", "launch/tpu_pod.sh", "create"], dict(DRY_RUN="1", TPU_NAME="t", ZONE="z", QUEUED="1"))
  assert out.returncode == 0 and "queued-resources create t" in out.stdout
  out = run(["bash", "launch/tpu_pod.sh", "train"], dict(DRY_RUN="1", TPU_NAME="t", ZONE="z", WORKDIR="gs://b/r"))
  assert out.returncode == 0 and "--worker=all" in out.stdout and "metis_jax.train" in out.stdout
  out = run(["bash", "launch/gpu_slurm.sbatch", "configs/tiny.py", "/tmp/r"],
            dict(DRY_RUN="1", SLURM_NTASKS="2", SLURMD_NODENAME="n1", SLURM_JOB_ID="5"))
  assert out.returncode == 0 and "task 1: METIS_COORDINATOR_ADDRESS=n1:12005 METIS_NUM_PROCESSES=2 " \
                                 "METIS_PROCESS_ID=1" in out.stdout


def test_train_cli_rejects_unknown_config_keys(tmp_path):
  out = run([sys.executable, "-m", "metis_jax.train", "--config", "configs/tiny.py",
             "--workdir", str(tmp_path), "--config.train.stepz=3"], dict(JAX_PLATFORMS="cpu"))
  assert out.returncode != 0 and "stepz" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_run_logger_reports_the_objectives_unit_and_rewrites_metrics_past_a_resume(tmp_path):
  from metis_jax.training import objective, run_logger  # pylint: disable=import-outside-toplevel
  config = lib.tiny_config("logging.tensorboard=False", "train.steps=3")
  lines = []
  progress = objective.Progress("audio_seconds", 2.0, lambda step, total, v: lines.append((step, total)) or "x")
  logger = run_logger.RunLogger(str(tmp_path), config, progress, 1, "cpu", is_writer=True, resume_step=0)
  fake = lambda v: {"loss": jnp.float32(v), "grad_norm": jnp.float32(1.0)}
  for step in (1, 2, 3):
    logger.push(step, fake(step))
  logger.close()
  last = logger.history[-1]
  assert last["audio_seconds_per_second"] == 2.0 * last["steps_per_second"] and "mfu" not in last
  assert lines[-1] == (3, 3)
  # A run resumed from step 1 drops what the first run logged after it.
  resumed = run_logger.RunLogger(str(tmp_path), config, progress, 1, "cpu", is_writer=True, resume_step=1)
  resumed.push(2, fake(20.0))
  resumed.close()
  logged = lib.read_metrics(str(tmp_path))
  assert sorted(logged) == [1, 2] and logged[2]["loss"] == 20.0 and logged[1]["loss"] == 1.0


def test_trailing_skips_count_the_skipped_updates_at_the_end():
  from metis_jax.training import loop  # pylint: disable=import-outside-toplevel
  history = [{"skipped": 1.0}, {"skipped": 0.0}, {"skipped": 1.0}, {"skipped": 0.0, "disc_skipped": 1.0}]
  assert loop.trailing_skips(history) == 2
  assert loop.trailing_skips(history[:2]) == 0 and loop.trailing_skips([]) == 0


def test_throughput_times_steps_that_ran_inline_to_their_end(tmp_path):
  # A step run inline (the CPU train command) is done when its metrics are queued: every
  # window, the last one flushed right after it included, spans the steps' own time.
  config = lib.tiny_config("logging.tensorboard=False", "logging.log_every_steps=1", "train.steps=4")
  logger = metrics.MetricsLogger(str(tmp_path), config, num_devices=1, device_kind="cpu", is_writer=True)
  fake = {k: jnp.float32(1.0) for k in ("loss", "accuracy", "grad_norm", "learning_rate")}
  for step in range(1, 5):
    time.sleep(0.2)  # the step's run
    logger.push(step, fake)
  logger.flush()
  rates = [v["steps_per_second"] for v in logger.history if "steps_per_second" in v]
  assert len(rates) == 3 and all(0.5 < r <= 5.5 for r in rates), rates


def test_progress_line_counts_read_at_any_rate():
  values = {"steps_per_second": 0.08, "tokens_per_second": 40.0, "loss": 1.0, "accuracy": 0.5,
            "grad_norm": 1.0, "learning_rate": 1e-4, "mfu": 0.1}
  assert "0.08 step/s 40 tok/s" in metrics.progress_line(2, 10, values)
  assert "3.1 step/s 52.3k tok/s" in metrics.progress_line(
      2, 10, dict(values, steps_per_second=3.1, tokens_per_second=52_300.0))
  assert metrics.format_count(1.25e6) == "1.25M"
  codec_line = codec_objective.progress_line(2, 10, dict(values, audio_seconds_per_second=0.16), ("loss",))
  assert "0.08 step/s 0.16 s audio/s" in codec_line  # the codec runs' line reads the same way
