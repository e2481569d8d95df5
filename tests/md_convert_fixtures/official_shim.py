"""Runs the official converter's entry point with one Python 3 shim.

The official `AircraftConverter` stores its boxes as `map(int, ...)`, a
list under Python 2 but a one-shot iterator under Python 3, which
`PIL.Image.crop` rejects ("'map' object is not subscriptable"). The shim
makes `map` return a list inside `dataset_to_records` only; nothing else of
the official code is changed. Run from the root of the official source
tree, with the official flags.
"""

import builtins

from absl import app
from meta_dataset.dataset_conversion import convert_datasets_to_records
from meta_dataset.dataset_conversion import dataset_to_records

dataset_to_records.map = lambda fn, *its: list(builtins.map(fn, *its))

if __name__ == "__main__":
  app.run(convert_datasets_to_records.main)
