"""Episode streams for training at scale: resuming at a data position, and
splitting each episode's rows over processes, give exactly the episodes of
one uninterrupted, unsplit stream."""

import itertools

import numpy as np
import pytest

from ctx_jax.training import input_pipeline
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


def test_bad_row_block(specs):
  dtd = specs[1]
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(dtd, "TRAIN", CFG, SIZE,
                                        pad_multiple=3, row_block=(0, 2))
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(dtd, "TRAIN", CFG, SIZE,
                                        pad_multiple=2, row_block=(2, 2))
