"""md-convert: raw Meta-Dataset downloads to the official record format.

One module per source family reads that source's raw layout and returns a
`common.Plan` (the classes in id order, each with the function that yields
its encoded images, and how to build `dataset_spec.json`); `runner` writes
the plan's class files in parallel and resumably, `verify` checks a
records folder against its spec and `cli` is the `md-convert` command.

The semantics (class order, splits, image transforms, record order, spec
contents) are those of the official converter,
`meta_dataset/dataset_conversion/dataset_to_records.py` in
google-research/meta-dataset; `tests/md_convert_test.py` compares our
output with records that converter wrote from the same raw files. Pure
Python, numpy and Pillow: neither TensorFlow nor JAX is imported.
"""
