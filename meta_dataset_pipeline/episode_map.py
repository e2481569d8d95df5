"""The episode map: a planned episode's encoded images -> padded arrays.

One function (`episode_fn`) used by the in-process `tf.data` pipeline
(`pipeline.py`, as its parallel map) and by the worker processes
(`workers.py`, as a `tf.function`), so episode i is computed by the same
ops wherever it runs. Its input is a planned episode (`EPISODE_SIGNATURE`:
the plan of `pipeline.EpisodePlanner` plus the images packed by `pack`),
its output the episode dict described in `pipeline.py`.
"""

from typing import Sequence

import numpy as np
import tensorflow as tf

from meta_dataset_pipeline import decoder


def pack(images: Sequence[bytes]) -> tuple[bytes, np.ndarray]:
  """One buffer and the lengths: much cheaper to hand to TF than a list."""
  return b"".join(images), np.array([len(x) for x in images], np.int64)


def _unpack(blob, lengths):
  """Inverse of `_pack`, in TF: a [N] string tensor."""
  starts = tf.cumsum(lengths, exclusive=True)
  # `substr` broadcasts the scalar buffer; tiling it first would copy the
  # whole buffer once per image.
  return tf.strings.substr(blob, starts, lengths)


EPISODE_SIGNATURE = {
    "blob": tf.TensorSpec([], tf.string),
    "lengths": tf.TensorSpec([None], tf.int64),
    "labels": tf.TensorSpec([None], tf.int32),
    "class_ids": tf.TensorSpec([None], tf.int32),
    "info": tf.TensorSpec([5], tf.int32),
    "aug_seeds": tf.TensorSpec([None, 2], tf.int64),
    "simclr": tf.TensorSpec([], tf.bool),
    "record_index": tf.TensorSpec([None], tf.int32),
    "row_files": tf.TensorSpec([None], tf.string),
    "cache_slots": tf.TensorSpec([None], tf.int32),
}


def _describe_row(files, records, class_ids):
  """`describe` of `decoder.decode_rows`: row -> "<file>: record R of
  class C: the image failed to decode ..." (files: [N] string; records,
  class_ids: [N] int32)."""

  def describe(i):
    return tf.strings.join([
        files[i], ": record ", tf.strings.as_string(records[i]),
        " of class ", tf.strings.as_string(class_ids[i]),
        ": the image failed to decode (corrupt image data)"])

  return describe


def _pad_rows(x, size, value):
  pad = [[0, size - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1)
  return tf.pad(x, pad, constant_values=value)


def episode_fn(image_size, support_augmentation, query_augmentation,
                episode_augmenter=None, cache=None):
  """Per-episode map: decode every image once, augment, pad, add masks.

  `episode_augmenter` (a `simclr.EpisodeAugmenter`) augments SimCLR and
  ordinary episodes after the decoder's own augmentation.
  """
  extra = episode_augmenter if (episode_augmenter and
                                episode_augmenter.augments_in_map) else None

  def decode_padded(ep, rows, size, augmentation, is_query):
    """[size, H, W, 3]: decoded images, then zero rows up to `size`."""
    images = _unpack(ep["blob"], ep["lengths"])[rows]
    describe = _describe_row(ep["row_files"][rows], ep["record_index"][rows],
                             ep["class_ids"][rows])
    more = None
    if extra is not None:
      more = lambda image, seed: extra(image, seed, is_query, ep["simclr"])
    return decoder.decode_rows(images, size, image_size, augmentation,
                               ep["aug_seeds"][rows], describe, cache,
                               ep["cache_slots"][rows], more)

  def process(ep):
    num_support, s_pad, q_pad = ep["info"][0], ep["info"][1], ep["info"][2]
    out = {}
    for prefix, rows, size, aug in (
        ("support_", slice(None, num_support), s_pad, support_augmentation),
        ("query_", slice(num_support, None), q_pad, query_augmentation)):
      labels = ep["labels"][rows]
      out[prefix + "images"] = decode_padded(ep, rows, size, aug,
                                             prefix == "query_")
      out[prefix + "labels"] = _pad_rows(labels, size, 0)
      out[prefix + "mask"] = tf.range(size) < tf.shape(labels)[0]
      out[prefix + "class_ids"] = _pad_rows(ep["class_ids"][rows], size, -1)
      if episode_augmenter is not None:  # Only with on-device augmentation.
        out.update(episode_augmenter.device_fields(
            prefix, ep["aug_seeds"][rows], tf.shape(labels)[0], size,
            ep["simclr"]))
    out["num_ways"] = ep["info"][3]
    out["source_id"] = ep["info"][4]
    return out

  return process
