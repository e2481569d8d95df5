"""Episode streams for training at scale: resuming at a data position, and
splitting each episode's rows over processes, give exactly the episodes of
one uninterrupted, unsplit stream."""

import itertools

import numpy as np
import pytest

from ctx_jax.data import input_pipeline
from meta_dataset_pipeline import padding
from meta_dataset_pipeline import pipeline
from meta_dataset_pipeline import reader
import meta_dataset_pipeline as mdp

SIZE = 16
# Small variable episodes keep the tests quick; flushes still happen (dtd's
# classes are small), so the class-stream state must be carried exactly.
# Half the episodes are SimCLR episodes (converted by episode index, with
# their own augmentation), which resumed and split streams must also follow.
CFG = mdp.EpisodeDescriptionConfig(max_ways_upper_bound=6,
                                   max_support_set_size=20, max_num_query=3,
                                   simclr_episode_fraction=0.5)
NOISE = mdp.DataAugmentation(enable_gaussian_noise=True,
                             gaussian_noise_std=0.1)


@pytest.fixture(scope="module")
def specs(shared_dir):
  root = shared_dir / "fixtures" / "md_records"
  return [mdp.load_dataset_spec(root / s) for s in ("omniglot", "dtd")]


def _take(ds, num):
  it = ds.as_numpy_iterator()
  out = list(itertools.islice(it, num))
  del it
  return out


def test_start_episode_continues_the_uninterrupted_stream(specs):
  make = lambda start: mdp.make_multisource_episode_dataset(
      specs, "TRAIN", CFG, SIZE, seed=3, support_augmentation=NOISE,
      start_episode=start)
  whole = _take(make(0), 7)
  resumed = _take(make(4), 3)
  assert len({int(ep["source_id"]) for ep in whole}) == 2
  for a, b in zip(whole[4:], resumed):
    for key in mdp.EPISODE_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # And it is not trivially equal to a fresh stream's first episodes.
  assert any(not np.array_equal(a["support_class_ids"],
                                b["support_class_ids"])
             for a, b in zip(whole[:3], resumed))


@pytest.mark.parametrize("on_device,cache", [(False, 0), (True, 0),
                                             (False, 1 << 30)])
def test_row_blocks_equal_slices_of_the_whole_episode(specs, on_device,
                                                      cache):
  """Also with host or device augmentation, and the blocks served by the
  decoded-image cache (which must stay exact)."""
  make = lambda block: mdp.make_multisource_episode_dataset(
      specs, "TRAIN", CFG, SIZE, seed=7, pad_multiple=4,
      support_augmentation=NOISE, augment_on_device=on_device,
      row_block=block, decoded_cache_bytes=0 if block is None else cache)
  whole = _take(make(None), 8)
  blocks = [_take(make((b, 2)), 8) for b in range(2)]
  keys = set(whole[0])
  assert any(k.endswith("aug_mode") for k in keys) == on_device
  for i, episode in enumerate(whole):
    for b in range(2):
      want = input_pipeline.local_rows(episode, b, 2)
      got = blocks[b][i]
      assert set(got) == keys
      for key in keys:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_row_blocks_read_only_their_own_records(specs, monkeypatch):
  """Each block reads exactly the records its output rows show (SimCLR
  query rows show support images, possibly of the other block; the
  replaced query records are not read at all), so a host's record I/O
  shrinks with the number of blocks."""
  reads = []
  read_image = reader.ClassStream.read_image

  def counting_read_image(stream, index):
    reads.append((stream.path, index))
    return read_image(stream, index)

  monkeypatch.setattr(reader.ClassStream, "read_image", counting_read_image)
  totals = {}
  for block in (None, (0, 2), (1, 2)):
    sources = pipeline._make_sources(specs, "TRAIN", CFG, 7, False, False)  # pylint: disable=protected-access
    buckets = padding.buckets_for_samplers([s.sampler for s in sources], 4)
    generate = pipeline._episode_generator(  # pylint: disable=protected-access
        sources, 7, buckets, 100, CFG.simclr_episode_fraction,
        row_block=block)()
    for i in range(8):
      del reads[:]
      ep = next(generate)
      shown = set(zip(ep["row_files"].tolist(), ep["record_index"].tolist()))
      assert set(reads) == shown and len(reads) == len(shown)
      totals[block, i] = len(reads)
  assert len({totals[None, i] for i in range(8)}) > 1
  for i in range(8):
    assert totals[(0, 2), i] + totals[(1, 2), i] >= totals[None, i]
    assert max(totals[(0, 2), i], totals[(1, 2), i]) < totals[None, i]


def test_bad_row_block(specs):
  dtd = specs[1]
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(dtd, "TRAIN", CFG, SIZE,
                                        pad_multiple=3, row_block=(0, 2))
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(dtd, "TRAIN", CFG, SIZE,
                                        pad_multiple=2, row_block=(2, 2))
