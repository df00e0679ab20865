"""The Grain training pipeline: batches, process slices, resume, mixing, packing."""

import collections
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import grain
from metis_jax import config_base
from metis_jax.data import demo_corpus
from metis_jax.data import fit_kmeans
from metis_jax.data import pipeline
from metis_jax.data import records
from metis_jax.data import shards
from metis_jax.data import synthetic
from metis_jax.data import tokenize
from metis_jax.parallel import mesh as mesh_lib


def _config(sources, *, batch=4, seq=128, **data):
  config = config_base.get_config()
  config.train.global_batch_size = batch
  config.train.seq_length = seq
  config.data.train_sources = tuple(sources)
  config.data.num_workers = 0
  config.data.min_length = 10
  for k, v in data.items():
    config.data[k] = v
  return config


@pytest.fixture(scope="module")
def corpus_a(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("a"))
  return out, synthetic.write_token_shards(out, 203, 3, min_tokens=20, max_tokens=300, seed=1, prefix="a")


@pytest.fixture(scope="module")
def corpus_b(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("b"))
  return out, synthetic.write_token_shards(out, 60, 2, min_tokens=20, max_tokens=300, seed=2, prefix="b")


def _check_batch(batch, batch_size, buckets):
  tokens, valid = batch["tokens"], batch["valid"]
  assert tokens.dtype == np.int32 and valid.dtype == bool
  assert tokens.shape == valid.shape and tokens.shape[0] == batch_size and tokens.shape[1] in buckets
  lengths = valid.sum(axis=1)
  # `valid` is a prefix of each row; padding holds 0.
  np.testing.assert_array_equal(valid, np.arange(tokens.shape[1])[None] < lengths[:, None])
  assert np.all(tokens[~valid] == 0)
  return lengths


def _is_window_of(seq, full):
  n = len(seq)
  return any(np.array_equal(seq, full[s:s + n]) for s in range(len(full) - n + 1))


def test_round_trip_audio_to_batches(tmp_path):
  corpus = str(tmp_path / "corpus")
  demo_corpus.generate(corpus, languages=("es",), speakers_per_language=2, sentences_per_speaker=4)
  cfg = config_base.data_config()
  cfg.kmeans_clusters, cfg.kmeans_iterations, cfg.files_per_shard = 8, 3, 3
  tok = fit_kmeans.fit_tokenizer(cfg, corpus, log=lambda s: None)
  out = str(tmp_path / "tokens")
  tokenize.run(cfg, corpus, out, tokenizer=tok, log=lambda s: None)
  recs = {r["id"]: r["ssl_tokens"] for r in map(records.decode, shards.read_all(shards.list_shards(out)))}
  assert len(recs) == 8
  config = _config([out], batch=3, seq=128, num_epochs=1, min_length=25)
  ds = pipeline.host_batch_dataset(config.data, batch_size=3, max_length=128, keep_ids=True)
  seen = []
  for batch in ds:
    lengths = _check_batch(batch, 3, (32, 64, 96, 128))
    for row, rid in enumerate(batch["ids"]):
      full = recs[rid]
      assert lengths[row] == min(len(full), 128)
      assert _is_window_of(batch["tokens"][row, :lengths[row]], full)  # A random crop of the record.
      seen.append(rid)
    assert np.all(lengths[len(batch["ids"]):] == 0)  # Rows past the data are all padding.
  assert sorted(seen) == sorted(recs)


def test_each_record_once_per_epoch_across_processes(corpus_a):
  out, data = corpus_a
  config = _config([out], num_epochs=1, min_length=1, seq=512)
  per_process = []
  for p in range(2):
    ds = pipeline.host_batch_dataset(config.data, batch_size=4, max_length=512, process_index=p, process_count=2,
                                     keep_ids=True)
    per_process.append([rid for batch in ds for rid in batch["ids"]])
  a, b = per_process
  assert len(a) + len(b) == len(data) and abs(len(a) - len(b)) <= 1
  assert not set(a) & set(b) and set(a) | set(b) == set(data)
  # Two epochs: every record exactly twice over both processes.
  config.data.num_epochs = 2
  counts = collections.Counter()
  for p in range(2):
    ds = pipeline.element_dataset([out], max_length=512, num_epochs=2, process_index=p, process_count=2,
                                  keep_ids=True)
    counts.update(e["id"] for e in ds.to_iter_dataset())
  assert set(counts.values()) == {2} and len(counts) == len(data)


def test_crop_and_min_length(corpus_a):
  out, data = corpus_a
  ds = pipeline.element_dataset([out], max_length=100, min_length=60, num_epochs=1, keep_ids=True)
  elements = list(ds.to_iter_dataset())
  assert {e["id"] for e in elements} == {k for k, v in data.items() if min(len(v), 100) >= 60}
  for e in elements:
    assert len(e["tokens"]) == min(len(data[e["id"]]), 100) and e["tokens"].dtype == np.int32
    assert _is_window_of(e["tokens"], data[e["id"]])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_from_checkpoint_matches_uninterrupted(corpus_a, tmp_path, workers):
  out, _ = corpus_a
  config = _config([out], batch=4, seq=256, bucket_window=3, num_workers=workers)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  reference = _take(it, 4)  # Stops mid-window (a window is 3 batches).
  pipeline.save_iterator(it, str(tmp_path / "ckpt4"))
  state4 = pipeline.get_state(it)
  assert len(str(state4)) < 4000
  reference += _take(it, 2)  # Now at a window boundary.
  state6 = pipeline.get_state(it)
  reference += _take(it, 8)  # Crosses the epoch end (203 records).
  it.close()

  resumed = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  pipeline.restore_iterator(resumed, str(tmp_path / "ckpt4"))
  assert pipeline.get_state(resumed) == state4
  _assert_same_batches(_take(resumed, 10), reference[4:])
  pipeline.set_state(resumed, state6)
  _assert_same_batches(_take(resumed, 8), reference[6:])
  resumed.close()


def test_orbax_checkpoint_manager_with_model_state(corpus_a, tmp_path):
  """How the trainer saves the iterator beside the model (CheckpointManager)."""
  out, _ = corpus_a
  config = _config([out], batch=4, seq=256)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  _take(it, 3)
  params = {"w": np.arange(4.0)}
  with ocp.CheckpointManager(str(tmp_path / "ckpts"), item_names=("state", "data"),
                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                            "data": grain.checkpoint.CheckpointHandler()}) as mngr:
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave(params), data=pipeline.checkpoint_args(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  it.close()
  fresh = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  with ocp.CheckpointManager(str(tmp_path / "ckpts"), item_names=("state", "data"),
                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                            "data": grain.checkpoint.CheckpointHandler()}) as mngr:
    restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(params), data=pipeline.checkpoint_args(fresh, restore=True)))
  np.testing.assert_array_equal(restored["state"]["w"], params["w"])
  _assert_same_batches(_take(fresh, 3), expected)
  fresh.close()


def test_weighted_mixture_proportions(corpus_a, corpus_b):
  (a, _), (b, data_b) = corpus_a, corpus_b
  ds = pipeline.element_dataset([a, b], [0.75, 0.25], max_length=512, keep_ids=True)
  it = iter(ds.to_iter_dataset())
  ids = [next(it)["id"] for _ in range(800)]
  n_b = sum(i.startswith("b-") for i in ids)
  assert n_b == pytest.approx(200, abs=10)
  # The small corpus repeats (reshuffled) rather than running dry.
  assert collections.Counter(i for i in ids if i.startswith("b-")).most_common(1)[0][1] >= 3
  assert set(i for i in ids if i.startswith("b-")) == set(data_b)


def test_packing(corpus_a):
  out, data = corpus_a
  config = _config([out], batch=4, seq=256, packing=True, num_epochs=1)
  ds = pipeline.host_batch_dataset(config.data, batch_size=4, max_length=256)
  batches = list(ds)
  assert batches
  for batch in batches:
    assert set(batch) == {"tokens", "valid", "segment_ids", "positions"}
    seg, pos, valid = batch["segment_ids"], batch["positions"], batch["valid"]
    assert seg.shape == (4, 256) and pos.dtype == np.int32
    np.testing.assert_array_equal(valid, seg > 0)
    lengths = valid.sum(axis=1)
    np.testing.assert_array_equal(valid, np.arange(256)[None] < lengths[:, None])
    for row in range(4):
      for s in np.unique(seg[row][seg[row] > 0]):
        where = np.flatnonzero(seg[row] == s)
        np.testing.assert_array_equal(pos[row, where], np.arange(len(where)))
        assert where[-1] - where[0] + 1 == len(where)
  fill = np.mean([b["valid"].mean() for b in batches])
  assert fill > 0.7


def test_global_batches_on_a_mesh(corpus_a):
  out, _ = corpus_a
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices).reshape(len(devices), 1), ("data", "fsdp"))
  sharding = mesh_lib.batch_sharding(mesh)
  config = _config([out], batch=2 * len(devices), seq=256)
  it = pipeline.make_train_iterator(config, sharding)
  local = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  for _ in range(3):
    g, h = next(it), next(local)
    assert set(g) == {"tokens", "valid"}
    for k in g:
      assert isinstance(g[k], jax.Array) and g[k].shape == h[k].shape
      assert g[k].sharding.is_equivalent_to(sharding, 2)
      assert {s.data.shape[0] for s in g[k].addressable_shards} == {2}
      np.testing.assert_array_equal(np.asarray(g[k]), h[k])
  it.close()
  local.close()


def test_bucketing_pads_less_than_fixed_length(corpus_a):
  out, _ = corpus_a
  config = _config([out], batch=8, seq=256, bucket_window=16)
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  batches = _take(it, 40)
  it.close()
  real = sum(int(b["valid"].sum()) for b in batches)
  bucketed = real / sum(b["valid"].size for b in batches)
  fixed = real / (40 * 8 * 256)
  assert bucketed > 0.75 and bucketed > fixed + 0.15
  assert {b["tokens"].shape[1] for b in batches} <= {64, 128, 192, 256}


def test_config_errors(corpus_a):
  out, _ = corpus_a
  with pytest.raises(ValueError, match="last bucket"):
    pipeline.host_batch_dataset(_config([out], bucket_lengths=(64, 128)).data, batch_size=4, max_length=256)
  with pytest.raises(ValueError, match="min_length"):
    pipeline.host_batch_dataset(_config([out], min_length=300).data, batch_size=4, max_length=256)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_iterator(_config([out], batch=5), process_index=0, process_count=2)
  with pytest.raises(ValueError, match="train_sources"):
    pipeline.make_train_iterator(_config([]), process_index=0, process_count=1)
  with pytest.raises(FileNotFoundError, match="no ArrayRecord shards"):
    pipeline.make_train_iterator(_config([os.path.join(out, "missing")]), process_index=0, process_count=1)


def test_hosts_pad_to_the_same_scheduled_length_without_a_collective(corpus_a, monkeypatch):
  """Two hosts of one run: equal padded lengths at every step, each host reading only its slice."""
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel

  def no_collective(*args, **kwargs):
    raise AssertionError("the input pipeline must not call a collective")

  monkeypatch.setattr(multihost_utils, "process_allgather", no_collective)
  out, _ = corpus_a
  config = _config([out], batch=8, seq=256, bucket_window=4)
  hosts = [pipeline.make_local_iterator(config, p, 2) for p in range(2)]
  steps = [[next(it) for it in hosts] for _ in range(12)]  # 3 windows
  for it in hosts:
    it.close()
  lengths = [[b["tokens"].shape[1] for b in step] for step in steps]
  assert all(a == b for a, b in lengths)
  assert len({a for a, _ in lengths}) >= 2  # the schedule does use several buckets
  assert {a for a, _ in lengths} <= set(pipeline.bucket_lengths(config)) <= {64, 128, 192, 256}
  for step in steps:
    for b in step:
      _check_batch(b, 4, pipeline.bucket_lengths(config))
