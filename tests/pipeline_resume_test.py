"""Resuming an episode stream at a data position gives the same episodes."""

import itertools

import numpy as np

import meta_dataset_pipeline as mdp

SIZE = 16
# Small variable episodes keep the test quick; flushes still happen (dtd's
# classes are small), so the class-stream state must be carried exactly.
# Half the episodes are SimCLR episodes (converted by episode index, with
# their own augmentation), which a resumed stream must also continue.
CFG = mdp.EpisodeDescriptionConfig(max_ways_upper_bound=6,
                                   max_support_set_size=20, max_num_query=3,
                                   simclr_episode_fraction=0.5)


def _take(ds, num):
  it = ds.as_numpy_iterator()
  out = list(itertools.islice(it, num))
  del it
  return out


def test_start_episode_continues_the_uninterrupted_stream(shared_dir):
  root = shared_dir / "fixtures" / "md_records"
  specs = [mdp.load_dataset_spec(root / s) for s in ("omniglot", "dtd")]
  noise = mdp.DataAugmentation(enable_gaussian_noise=True,
                               gaussian_noise_std=0.1)
  make = lambda start: mdp.make_multisource_episode_dataset(
      specs, "TRAIN", CFG, SIZE, seed=3, support_augmentation=noise,
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
