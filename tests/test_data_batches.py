"""The one batch path (data.batches) and the collective-free bucket schedule (data.bucketing)."""

import json

import grain
import jax
import numpy as np
import pytest
import soundfile

from metis_jax import config_base
from metis_jax.data import batches
from metis_jax.data import bucketing
from metis_jax.data import pipeline
from metis_jax.data import synthetic
from metis_jax.data import waveform_pipeline as wp
from metis_jax.parallel import mesh as mesh_lib


def _mesh(shape=(2, 4, 1)):
  return jax.sharding.Mesh(np.asarray(jax.devices()[:8]).reshape(shape), mesh_lib.AXES)


# ----------------------------------------------------------------------------- global assembly


def test_global_batch_on_eight_devices_puts_each_row_block_on_its_devices():
  mesh = _mesh()
  rows = np.arange(8)
  host = {"tokens": np.arange(8 * 5, dtype=np.int32).reshape(8, 5), "valid": np.ones((8, 5), bool),
          "acoustic_tokens": np.arange(8 * 5 * 3, dtype=np.int32).reshape(8, 5, 3),
          "lengths": rows.astype(np.int32), "ids": [f"r{i}" for i in rows]}
  g = batches.make_global_batch(host, mesh)
  assert set(g) == {"tokens", "valid", "acoustic_tokens", "lengths"}  # lists are dropped
  for name, array in g.items():
    assert array.shape == host[name].shape
    assert array.sharding.is_equivalent_to(mesh_lib.batch_sharding(mesh, host[name].ndim), host[name].ndim)
    # 8 rows over data x fsdp = 8 devices: device (d, f) holds row 4 d + f, whatever the trailing axes.
    for d in range(2):
      for f in range(4):
        device = mesh.devices[d, f, 0]
        shard = next(s for s in array.addressable_shards if s.device == device)
        np.testing.assert_array_equal(np.asarray(shard.data), host[name][4 * d + f:4 * d + f + 1])
    np.testing.assert_array_equal(np.asarray(array), host[name])


def test_batch_sharding_uses_the_batch_axes_the_mesh_has():
  devices = np.asarray(jax.devices()[:8])
  only_data = jax.sharding.Mesh(devices, ("data",))
  assert mesh_lib.batch_sharding(only_data, 3).spec == jax.sharding.PartitionSpec(("data",), None, None)
  assert mesh_lib.batch_sharding(_mesh(), 2).spec == jax.sharding.PartitionSpec(("data", "fsdp"), None)
  other = jax.sharding.Mesh(devices, ("x",))
  assert mesh_lib.batch_sharding(other, 1).spec == jax.sharding.PartitionSpec(None)


class _CountingSource:
  """A host iterator whose state is a dict (like Grain's), or bytes."""

  def __init__(self, as_bytes=False):
    self.step, self.as_bytes = 0, as_bytes

  def __next__(self):
    self.step += 1
    return {"x": np.full((8, 2), self.step, np.int32)}

  def get_state(self):
    state = {"step": self.step}
    return json.dumps(state).encode() if self.as_bytes else state

  def set_state(self, state):
    self.step = json.loads(state.decode())["step"] if self.as_bytes else state["step"]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_global_iterator_state_is_json_bytes_of_the_host_state(as_bytes):
  it = batches.GlobalBatchIterator(_CountingSource(as_bytes), _mesh(), 8)
  next(it)
  next(it)
  state = it.get_state()
  assert isinstance(state, bytes) and json.loads(state.decode()) == {"step": 2}
  expected = np.asarray(next(it)["x"])
  fresh = batches.GlobalBatchIterator(_CountingSource(as_bytes), _mesh(), 8)
  fresh.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(fresh)["x"]), expected)
  fresh.set_state({"step": 0})  # the dict form is accepted too
  assert int(np.asarray(next(fresh)["x"])[0, 0]) == 1


# ----------------------------------------------------------------------------- the source chain


@pytest.mark.parametrize("process_count", [1, 2, 3])
def test_process_slices_are_disjoint_complete_and_interleave_the_global_order(process_count):
  sources = [list(range(0, 40)), list(range(100, 125))]
  whole = list(batches.source_chain(sources, seed=3, num_epochs=1))
  # Without weights the mixture alternates its sources, one epoch of the shorter one.
  assert all(x < 100 for x in whole[0::2]) and sorted(whole[1::2]) == list(range(100, 125))
  assert len(whole) == 50 and len(set(whole)) == 50
  slices = [list(batches.source_chain(sources, seed=3, num_epochs=1, process_index=p,
                                      process_count=process_count)) for p in range(process_count)]
  for p, part in enumerate(slices):
    assert part == whole[p::process_count]
  flat = [x for part in slices for x in part]
  assert len(flat) == len(set(flat)) == len(whole)


def test_chain_shuffles_each_source_with_its_own_seed_and_repeats_reshuffled():
  src = list(range(30))
  two = list(batches.source_chain([src], seed=5, num_epochs=2))
  assert sorted(two[:30]) == src and sorted(two[30:]) == src and two[:30] != two[30:]
  assert two[:30] != src  # shuffled
  forever = batches.source_chain([src], seed=5, num_epochs=0)
  assert [forever[i] for i in range(60)] == two
  with pytest.raises(ValueError, match="process_index 2 not in"):
    batches.source_chain([src], process_index=2, process_count=2)
  with pytest.raises(ValueError, match="1 mixture weights for 2 sources"):
    batches.source_chain([src, src], [1.0])


@pytest.fixture(scope="module")
def token_shards(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tokens"))
  return out, synthetic.write_token_shards(out, 41, 2, min_tokens=20, max_tokens=120, seed=4)


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory):
  """Nine wav files of distinct lengths (0.1 s, 0.15 s, ... at 16 kHz): a crop's length names its file."""
  root = tmp_path_factory.mktemp("audio")
  lengths = {}
  for i in range(9):
    n = 1600 + 800 * i
    path = str(root / f"clip{i}.wav")
    soundfile.write(path, 0.2 * np.sin(np.arange(n) * 0.05 * (i + 1)).astype(np.float32), 16000)
    lengths[path] = n
  return str(root), lengths


def test_token_and_waveform_elements_come_from_the_same_chain(token_shards, audio_files):
  (tokens_dir, records), (audio_dir, file_lengths) = token_shards, audio_files
  for p in range(2):
    # Tokens: the pipeline's records are the chain's records, decoded, in the chain's order.
    chain = batches.source_chain([pipeline.open_source(tokens_dir)], seed=9, num_epochs=1, process_index=p,
                                 process_count=2)
    expected_ids = [pipeline.decode_element(raw, keep_id=True)["id"] for raw in chain]
    elements = pipeline.element_dataset([tokens_dir], max_length=1000, min_length=1, seed=9, num_epochs=1,
                                        process_index=p, process_count=2, keep_ids=True)
    assert [e["id"] for e in elements] == expected_ids
    for e in elements:
      np.testing.assert_array_equal(e["tokens"], records[e["id"]])
    # Audio: the crops of the waveform pipeline are the chain's files, loaded, in the chain's order.
    files = batches.source_chain([wp.open_source(audio_dir)], seed=9, num_epochs=1, process_index=p,
                                 process_count=2)
    crops = wp.element_dataset([audio_dir], sample_rate=16000, crop=16000, seed=9, num_epochs=1,
                               process_index=p, process_count=2)
    assert [c["length"] for c in crops] == [file_lengths[f] for f in files]
  halves = [list(batches.source_chain([wp.open_source(audio_dir)], seed=9, num_epochs=1, process_index=p,
                                      process_count=2)) for p in range(2)]
  assert not set(halves[0]) & set(halves[1]) and set(halves[0]) | set(halves[1]) == set(file_lengths)


def test_token_and_waveform_batches_assemble_through_the_same_iterator(token_shards, audio_files):
  (tokens_dir, _), (audio_dir, _) = token_shards, audio_files
  mesh = _mesh((1, 8, 1))
  config = config_base.get_config()
  config.train.global_batch_size, config.train.seq_length = 8, 128
  config.data.train_sources, config.data.num_workers, config.data.min_length = (tokens_dir,), 0, 1
  token_it = pipeline.make_train_iterator(config, mesh, process_index=0, process_count=1)
  cfg = config_base.audio_data_config()
  cfg.train_sources, cfg.num_workers = (audio_dir,), 0
  audio_it = batches.GlobalBatchIterator(
      wp.make_local_iterator(cfg, sample_rate=16000, crop=4000, batch_size=8), mesh, 8)
  for it, shapes in ((token_it, {"tokens": 2, "valid": 2}), (audio_it, {"wav": 2, "lengths": 1})):
    assert isinstance(it, batches.GlobalBatchIterator)
    batch = next(it)
    assert {k: v.ndim for k, v in batch.items()} == shapes
    for v in batch.values():
      assert isinstance(v, jax.Array) and v.shape[0] == 8 and len(v.addressable_shards) == 8
    state = it.get_state()
    expected = {k: np.asarray(v) for k, v in next(it).items()}
    it.set_state(state)
    for k, v in next(it).items():
      np.testing.assert_array_equal(np.asarray(v), expected[k])
    it.close()
  assert "skipped_files" in json.loads(audio_it.get_state().decode())


# ----------------------------------------------------------------------------- the bucket schedule


def test_schedule_pads_each_sorted_group_to_the_bucket_of_its_quantile():
  sample = [10] * 50 + [100] * 50  # half short, half long
  schedule = bucketing.BucketSchedule((32, 64, 128), sample, window=4, seed=0)
  # Groups 1-2 of 4 hold the short half (bucket 32), groups 3-4 the long half (128).
  assert schedule.group_lengths(4) == (32, 32, 128, 128)
  assert schedule.group_lengths(1) == (128,) and schedule.group_lengths(2) == (32, 128)
  assert schedule.lengths() == (32, 128)  # 64 is never produced: nothing to compile for it
  for w in range(5):
    assert sorted(schedule.window_lengths(w)) == [32, 32, 128, 128]
  assert len({tuple(schedule.window_lengths(w)) for w in range(20)}) > 1  # the order varies by window
  single = bucketing.BucketSchedule((128,), (), window=4, seed=0)
  assert single.lengths() == (128,) and single.length_at(7) == 128
  with pytest.raises(ValueError, match="longer than the largest bucket"):
    schedule.bucket_of(129)


def test_schedule_is_a_function_of_seed_and_step_only():
  a = bucketing.BucketSchedule((64, 128, 192, 256), np.arange(20, 257), window=8, seed=11)
  b = bucketing.BucketSchedule((64, 128, 192, 256), np.arange(256, 19, -1), window=8, seed=11)  # another host
  steps = [a.length_at(s) for s in range(64)]
  assert steps == [b.length_at(s) for s in range(64)]
  assert steps[8:16] == a.window_lengths(1)
  assert [a.length_at(s) for s in range(40, 64)] == steps[40:]  # no hidden state: resumable anywhere
  c = bucketing.BucketSchedule((64, 128, 192, 256), np.arange(20, 257), window=8, seed=12)
  assert [c.length_at(s) for s in range(64)] != steps


def _host(elements, batch_size, schedule):
  ds = grain.MapDataset.source(elements).to_iter_dataset()
  return iter(bucketing.BucketBatchIterDataset(ds, batch_size, schedule, keep_ids=True))


def _elements(seed, n, lo=5, hi=120):
  rs = np.random.default_rng(seed)
  return [{"tokens": rs.integers(1, 50, rs.integers(lo, hi + 1)).astype(np.int32), "id": f"{seed}-{i}"}
          for i in range(n)]


def test_hosts_with_different_data_emit_the_same_lengths_and_crop_only_overlong_rows():
  schedule = bucketing.BucketSchedule((32, 64, 96, 120), [len(e["tokens"]) for e in _elements(0, 512)],
                                      window=4, seed=2)
  data = [_elements(1, 96), _elements(2, 96, lo=40)]  # host 2's data run longer than the sample
  hosts = [_host(d, 4, schedule) for d in data]
  originals = [{e["id"]: e["tokens"] for e in d} for d in data]
  seen, cropped = [[], []], [0, 0]
  for step in range(24):  # 6 windows of 4 batches of 4 rows: every element once
    out = [next(h) for h in hosts]
    assert out[0]["tokens"].shape == out[1]["tokens"].shape == (4, schedule.length_at(step))
    for h, batch in enumerate(out):
      length = batch["tokens"].shape[1]
      for row, rid in enumerate(batch["ids"]):
        full, n = originals[h][rid], int(batch["valid"][row].sum())
        assert n == min(len(full), length)
        cropped[h] += n < len(full)
        assert any(np.array_equal(batch["tokens"][row, :n], full[s:s + n]) for s in range(len(full) - n + 1))
        seen[h].append(rid)
  assert cropped[1] > cropped[0] > 0  # the crop is exercised, most where the data outrun the sample
  for h in range(2):
    assert sorted(seen[h]) == sorted(originals[h]) and len(seen[h]) == 96
    with pytest.raises(StopIteration):
      next(hosts[h])


def test_bucketed_iterator_resumes_mid_window_with_the_old_state_keys():
  schedule = bucketing.BucketSchedule((32, 64, 96, 120), [len(e["tokens"]) for e in _elements(0, 512)],
                                      window=3, seed=4)
  elements = _elements(3, 200)
  it = _host(elements, 4, schedule)
  for _ in range(4):
    next(it)
  state = it.get_state()
  assert set(state) == {"parent", "window_index", "emitted"} and state["emitted"] == 1
  reference = [next(it) for _ in range(7)]
  resumed = _host(elements, 4, schedule)
  resumed.set_state(json.loads(json.dumps(state)))
  for a, b in zip(reference, [next(resumed) for _ in range(7)]):
    assert a["ids"] == b["ids"]
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["valid"], b["valid"])


def test_schedule_crop_cuts_acoustic_tokens_at_the_tokens_offset():
  codes = np.arange(20 * 3).reshape(20, 3) + 1
  element = {"tokens": np.arange(1, 21, dtype=np.int32), "acoustic_tokens": codes}
  starts = set()
  for seed in range(10):
    cut = bucketing.crop_element(element, 8, np.random.default_rng(seed))
    start = int(cut["tokens"][0]) - 1
    starts.add(start)
    np.testing.assert_array_equal(cut["tokens"], np.arange(start + 1, start + 9))
    np.testing.assert_array_equal(cut["acoustic_tokens"], codes[start:start + 8])
  assert len(starts) > 1 and bucketing.crop_element(element, 20, None) is element
  padded = bucketing.pad_batch([cut["tokens"]], 2, 16, [cut["acoustic_tokens"]])
  assert padded["acoustic_tokens"].shape == (2, 16, 3) and not padded["acoustic_tokens"][:, 8:].any()
