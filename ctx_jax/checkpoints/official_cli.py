"""Command lines for official TF checkpoints.

  ctx-import-official CKPT_PREFIX OUTDIR [--backbone ... --max_stride ...]
  ctx-run-episode --model_dir OUTDIR --episode episode.npz --output out.npz

The second writes the keys of the official fixture's `expected.npz`, so any
conversion can be checked against outputs of the official code.
"""

from collections.abc import Sequence
import json

import numpy as np

from ctx_jax import paths
from ctx_jax.checkpoints import export
from ctx_jax.checkpoints import official
from meta_dataset_pipeline import cli


def run(argv: Sequence[str] | None = None) -> None:
  """`ctx-import-official CKPT_PREFIX OUTDIR`: converts and exports a model."""
  parser = cli.ArgumentParser(
      prog='ctx-import-official',
      description='Convert an official TF CTX checkpoint to a ctx_jax '
      'exported model (orbax state + model_config.json). Entries that are '
      'not model weights (optimizer state, global_step, the fc classifier '
      'of Baseline learners, ExponentialMovingAverage shadows, '
      'replica_<i> copies) are left out and listed.')
  parser.add_argument('checkpoint', help='TF checkpoint prefix '
                      '(the path before .index)')
  parser.add_argument('outdir', help='export folder (must not exist)')
  parser.add_argument('--backbone', default=None,
                      help='default: from the variable names')
  parser.add_argument('--max_stride', type=int, default=16,
                      help='not stored in checkpoints; official CTX: 16')
  parser.add_argument('--query_dim', type=int, default=None,
                      help='CTX query/key width (default: from the '
                      'checkpoint)')
  parser.add_argument('--val_dim', type=int, default=None,
                      help='CTX value width (default: from the checkpoint)')
  parser.add_argument('--query_chunk_size', type=int, default=None,
                      help='queries per rematerialised chunk of the CTX '
                      'head (default: the model default)')
  parser.add_argument('--dtype', default=None, choices=('float32',
                                                        'bfloat16'),
                      help='compute dtype (default: float32)')
  args = parser.parse_args(argv)
  cli.guarded('ctx-import-official', lambda: _import(args), args.verbose)


def _import(args) -> None:
  if paths.resolve(args.outdir).exists():
    raise FileExistsError(f'{args.outdir} already exists: give a new export '
                          'folder')
  variables, ignored = official.read_official_checkpoint_and_ignored(
      args.checkpoint)
  model, config = official.build_official_model(
      variables, backbone=args.backbone, max_stride=args.max_stride,
      query_dim=args.query_dim, val_dim=args.val_dim,
      query_chunk_size=args.query_chunk_size, dtype=args.dtype)
  path = export.export_model(args.outdir, model, config)
  # Marks a released official checkpoint: ctx-eval compares it with the
  # official leaderboard row. What was left out is kept for the record.
  (path / 'imported_from.json').write_text(json.dumps(
      {'checkpoint': str(args.checkpoint), 'ignored': ignored},
      indent=1) + '\n')
  for line in official.describe_ignored(ignored):
    print(line)
  print(f'imported {len(variables)} variables from {args.checkpoint} '
        f'into {path}')


def run_episode_main(argv: Sequence[str] | None = None) -> None:
  """`ctx-run-episode`: writes the fixture's keys for an exported model."""
  parser = cli.ArgumentParser(
      prog='ctx-run-episode',
      description='Run an exported model on one episode in train and eval '
      "mode and write the keys of the official fixture's expected.npz.")
  parser.add_argument('--model_dir', required=True,
                      help='exported model (ctx-import-official or '
                      'ctx-train output)')
  parser.add_argument('--episode', required=True,
                      help='npz with support_images, support_labels, '
                      'query_images, query_labels')
  parser.add_argument('--output', required=True, help='npz to write')
  parser.add_argument('--gradients', default=None,
                      help="comma-separated TF names ('/' or '__'); default "
                      'all parameters')
  args = parser.parse_args(argv)
  cli.guarded('ctx-run-episode', lambda: _run_episode(args), args.verbose)


def _run_episode(args) -> None:
  model, _ = export.load_exported_model_or_explain(args.model_dir)
  names = None
  if args.gradients:
    names = [n.strip().replace('__', '/') for n in args.gradients.split(',')]
  with np.load(args.episode) as episode:
    out = official.episode_outputs(model, dict(episode), gradient_names=names)
  np.savez(args.output, **out)
  print(f"wrote {len(out)} arrays to {args.output} (train loss "
        f"{float(out['loss_train']):.6f}, eval loss "
        f"{float(out['loss_eval']):.6f})")
