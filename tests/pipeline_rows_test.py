"""Splitting an episode over processes: each reads only its own rows."""

import itertools

import numpy as np
import pytest

from ctx_jax.training import input_pipeline
import meta_dataset_pipeline as mdp

SIZE = 16
CFG = mdp.EpisodeDescriptionConfig(max_ways_upper_bound=6,
                                   max_support_set_size=20, max_num_query=3,
                                   simclr_episode_fraction=0.5)


def _take(ds, num):
  it = ds.as_numpy_iterator()
  out = list(itertools.islice(it, num))
  del it
  return out


@pytest.mark.parametrize("on_device,cache", [(False, 0), (True, 0),
                                             (False, 1 << 30)])
def test_row_blocks_equal_slices_of_the_whole_episode(shared_dir, on_device,
                                                      cache):
  """Also with SimCLR episodes, host or device augmentation, and the blocks
  served by the decoded-image cache (which must stay exact)."""
  specs = [mdp.load_dataset_spec(shared_dir / "fixtures" / "md_records" / s)
           for s in ("omniglot", "dtd")]
  noise = mdp.DataAugmentation(enable_gaussian_noise=True,
                               gaussian_noise_std=0.1)
  make = lambda block: mdp.make_multisource_episode_dataset(
      specs, "TRAIN", CFG, SIZE, seed=7, pad_multiple=4,
      support_augmentation=noise, augment_on_device=on_device,
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


def test_bad_row_block(shared_dir):
  spec = mdp.load_dataset_spec(shared_dir / "fixtures" / "md_records" / "dtd")
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(spec, "TRAIN", CFG, SIZE,
                                        pad_multiple=3, row_block=(0, 2))
  with pytest.raises(ValueError, match="row_block"):
    mdp.make_one_source_episode_dataset(spec, "TRAIN", CFG, SIZE,
                                        pad_multiple=2, row_block=(2, 2))
