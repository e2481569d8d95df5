"""The embedded demo: procedural glyph data and the end-to-end `ctx-demo`.

  glyphs.py   the glyph programs (strokes per class and family)
  render.py   one image of a class under random nuisances
  dataset.py  `ctx-make-demo-data`: writes Meta-Dataset records (+ baselines)
  run.py      `ctx-demo`: data, CTX and ProtoNet training, evaluation, table

Generating the data needs numpy and Pillow only; the baselines and the demo
run use the evaluation library and the training code.
"""
