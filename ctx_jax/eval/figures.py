"""Pictures of what CTX attends to, and the confusion of validation episodes.

Drawn from `models.inspect_episode` outputs (the model's own head code), with
matplotlib (Agg, no display). Used by `ctx-attention` (attention_main.py) and,
when `config.eval.attention_images` is on, by validation during training
(`write_validation_images`, TensorBoard images through clu's writer).

A feature-map cell (y, x) is drawn as the (y, x) tile of an h x w grid laid
over the image; the backbone's receptive field of that cell is larger.

Shape letters: Q queries, S support images, W ways, h and w the feature map,
H and X the image.
"""

from typing import Mapping, Sequence

from absl import logging
from flax import nnx
import jax
import numpy as np

from ctx_jax import mesh as mesh_lib
from ctx_jax import models
from ctx_jax.data import input_pipeline
from ctx_jax.models import episode as episode_lib

# Figure cells are CELL_INCHES square at DPI dots per inch.
CELL_INCHES = 1.3
DPI = 100
HEAT_CMAP = "inferno"


def _plt():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def display(image: np.ndarray) -> np.ndarray:
  """An image in [-1, 1] (the pipeline's range) as RGB in [0, 1]."""
  return np.clip((np.asarray(image, np.float32) + 1) / 2, 0, 1)


def grid_positions(h: int, w: int, n: int) -> list[tuple[int, int]]:
  """n x n feature positions (y, x), at the centres of n x n equal bins."""
  ys = sorted({(2 * k + 1) * h // (2 * n) for k in range(n)})
  xs = sorted({(2 * k + 1) * w // (2 * n) for k in range(n)})
  return [(y, x) for y in ys for x in xs]


def _overlay(ax, image, heat, vmax, title=None):
  """Image with the [h,w] heat map laid over it (alpha blended)."""
  size_y, size_x = image.shape[:2]
  ax.imshow(display(image), interpolation="nearest")
  ax.imshow(heat, cmap=HEAT_CMAP, alpha=0.6, vmin=0, vmax=vmax,
            extent=(0, size_x, size_y, 0), interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])
  if title:
    ax.set_title(title, fontsize=7, pad=2)


def _class_text(c, out, query, true_label, class_names):
  name = f" {class_names[c]}" if class_names and c in class_names else ""
  marks = []
  if c == int(np.argmax(out.logits[query])):
    marks.append("predicted")
  if true_label is not None and c == true_label:
    marks.append("true")
  mark = f"\n({', '.join(marks)})" if marks else ""
  return f"class {c}{name}\nd = {out.distances[query, c]:.3g}{mark}"


def _class_rows(out, c):
  """Indices of the real support images of class c."""
  return np.flatnonzero(out.support_mask & (out.support_labels == c))


def _present_classes(out):
  return [c for c in range(out.logits.shape[1]) if _class_rows(out, c).size]


def figure_shape(num_classes: int, max_support: int) -> tuple[int, int]:
  """(height, width) in pixels of an `attention_figure`."""
  rows, cols = max(num_classes, 2), max_support + 2
  return (round(rows * CELL_INCHES * DPI), round(cols * CELL_INCHES * DPI))


def attention_figure(out, support_images: np.ndarray,
                     query_image: np.ndarray, query: int,
                     position: tuple[int, int], max_support: int = 6,
                     true_label: int | None = None,
                     class_names: Mapping[int, str] | None = None,
                     title: str = "", query_name: int | None = None):
  """Attention of one query position over each class's support images.

  One row per class: a label with its distance d (the logit is -d), then
  its support images (the `max_support` most attended), each overlaid with
  the attention of the query position; the colour scale is shared within
  the row and each title gives the image's share of the class's attention
  (they sum to 100% per class). Left: the query with the position boxed and
  the distances as bars.

  Args:
    out: an `Inspection` (from `models.inspect_episode`).
    support_images: [S,H,X,3] in [-1, 1], the rows of `out`.
    query_image: [H,X,3] the image of query row `query` of `out`.
    query: row of `out`'s queries.
    position: (y, x) on the h x w feature map.
    max_support: support images drawn per class.
    true_label: the query's label, if known (marked in the row labels).
    class_names: optional class label -> name.
    title: figure title.
    query_name: the query's index shown (default `query`).

  Returns:
    A matplotlib Figure of `figure_shape(classes, max_support)` pixels.
  """
  plt = _plt()
  from matplotlib import patches  # pylint: disable=g-import-not-at-top
  h, w = out.attention.shape[1:3]
  y, x = position
  classes = _present_classes(out)
  rows, cols = max(len(classes), 2), max_support + 2
  fig = plt.figure(figsize=(cols * CELL_INCHES, rows * CELL_INCHES), dpi=DPI)
  grid = fig.add_gridspec(rows, cols, hspace=0.35, wspace=0.1, left=0.02,
                          right=0.98, top=0.9, bottom=0.04,
                          width_ratios=[1.25, 0.75] + [1] * max_support)
  ax = fig.add_subplot(grid[0, 0])
  ax.imshow(display(query_image), interpolation="nearest")
  size_y, size_x = query_image.shape[:2]
  cell_y, cell_x = size_y / h, size_x / w
  ax.add_patch(patches.Rectangle((x * cell_x, y * cell_y), cell_x, cell_y,
                                 fill=False, edgecolor="cyan", linewidth=2))
  ax.set_xticks([])
  ax.set_yticks([])
  name = query if query_name is None else query_name
  ax.set_title(f"query {name}, position ({y}, {x})", fontsize=7, pad=2)
  bars = fig.add_subplot(grid[1:, 0])
  dist = [out.distances[query, c] for c in classes]
  predicted = int(np.argmax(out.logits[query]))
  bars.barh(range(len(classes)), dist, color=[
      "tab:green" if c == predicted else "tab:gray" for c in classes])
  bars.set_yticks(range(len(classes)), [str(c) for c in classes],
                  fontsize=6)
  bars.invert_yaxis()
  bars.tick_params(axis="x", labelsize=6)
  bars.set_title("distance per class", fontsize=7, pad=2)
  for r, c in enumerate(classes):
    label_ax = fig.add_subplot(grid[r, 1])
    label_ax.axis("off")
    label_ax.text(0.5, 0.5, _class_text(c, out, query, true_label,
                                        class_names),
                  ha="center", va="center", fontsize=7)
    rows_c = _class_rows(out, c)
    heat = out.attention[query, y, x][rows_c]  # [n,h,w]
    mass = heat.sum(axis=(1, 2))
    order = np.argsort(-mass, kind="stable")[:max_support]
    vmax = float(heat.max()) or 1.0
    for k, i in enumerate(order):
      _overlay(fig.add_subplot(grid[r, k + 2]), support_images[rows_c[i]],
               heat[i], vmax, f"support {rows_c[i]}: {100 * mass[i]:.0f}%")
  fig.suptitle(title or f"query {name}: attention of position ({y}, {x}) "
               "per class", fontsize=8)
  return fig


def summary_figure(out, support_images: np.ndarray,
                   query_images: np.ndarray, query_rows: Sequence[int],
                   true_labels: Sequence[int] | None = None,
                   title: str = ""):
  """One row per query: its image, then per class the most attended
  support image overlaid with the attention averaged over all query
  positions (where in the class the query looked overall), titled with the
  class's distance; the predicted class is marked with *.

  Args:
    out: an `Inspection`.
    support_images: [S,H,X,3].
    query_images: [Q,H,X,3] the rows of `out`.
    query_rows: labels for the query rows (their episode indices).
    true_labels: the queries' labels, if known.
    title: figure title.
  """
  plt = _plt()
  classes = _present_classes(out)
  rows, cols = len(query_rows), len(classes) + 1
  fig, axes = plt.subplots(rows, cols, squeeze=False, dpi=DPI,
                           figsize=(cols * CELL_INCHES,
                                    rows * CELL_INCHES + 0.4))
  mean_attention = out.attention.mean(axis=(1, 2))  # [Q,S,h,w]
  for r, q in enumerate(query_rows):
    ax = axes[r, 0]
    ax.imshow(display(query_images[r]), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    truth = f", true {true_labels[r]}" if true_labels is not None else ""
    ax.set_title(f"query {q}{truth}", fontsize=7, pad=2)
    predicted = int(np.argmax(out.logits[r]))
    for k, c in enumerate(classes):
      rows_c = _class_rows(out, c)
      heat = mean_attention[r, rows_c]
      best = int(np.argmax(heat.sum(axis=(1, 2))))
      star = " *" if c == predicted else ""
      _overlay(axes[r, k + 1], support_images[rows_c[best]], heat[best],
               float(heat.max()) or 1.0,
               f"class {c}{star}: d={out.distances[r, c]:.3g}")
  fig.suptitle(title or "mean attention over query positions; "
               "* = predicted class", fontsize=8)
  fig.tight_layout()
  return fig


def save(fig, path) -> None:
  """Writes `fig` as a PNG at DPI (the size the figure was made with)."""
  fig.savefig(path, dpi=DPI)
  _plt().close(fig)


def to_array(fig) -> np.ndarray:
  """The figure as a [H,X,3] uint8 RGB array (and closes it)."""
  fig.canvas.draw()
  image = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
  _plt().close(fig)
  return image


def confusion_figure(confusion: np.ndarray, class_ids: Sequence[int],
                     title: str):
  """Row-normalised confusion matrix (true class rows, predicted columns)."""
  plt = _plt()
  n = len(class_ids)
  side = min(max(3.0, 0.25 * n + 1.5), 12.0)
  fig, ax = plt.subplots(figsize=(side + 1, side), dpi=DPI)
  totals = np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  image = ax.imshow(confusion / totals, cmap="Blues", vmin=0, vmax=1)
  if n <= 40:
    ticks = [str(c) for c in class_ids]
    ax.set_xticks(range(n), ticks, fontsize=6, rotation=90)
    ax.set_yticks(range(n), ticks, fontsize=6)
  ax.set_xlabel("predicted class id")
  ax.set_ylabel("true class id")
  ax.set_title(title, fontsize=8)
  fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of the row")
  fig.tight_layout()
  return fig


def episode_confusion(confusion: dict[tuple[int, int], int],
                      logits: np.ndarray, episode: Mapping[str, np.ndarray]
                      ) -> None:
  """Adds the episode's (true, predicted) class-id pairs to `confusion`.

  Episode labels are per-episode; `support_class_ids` / `query_class_ids`
  map them back to the dataset's class ids.
  """
  mask = episode["support_mask"]
  to_id = dict(zip(episode["support_labels"][mask].tolist(),
                   episode["support_class_ids"][mask].tolist()))
  query_mask = episode["query_mask"]
  predicted = np.argmax(logits, axis=-1)[query_mask]
  for truth, guess in zip(episode["query_class_ids"][query_mask].tolist(),
                          predicted.tolist()):
    key = (truth, to_id.get(guess, -1))
    confusion[key] = confusion.get(key, 0) + 1


def confusion_matrix(pairs: dict[tuple[int, int], int]
                     ) -> tuple[np.ndarray, list[int]]:
  """Dense [K,K] counts over the class ids seen, and those ids (sorted)."""
  ids = sorted({i for pair in pairs for i in pair if i >= 0})
  index = {c: k for k, c in enumerate(ids)}
  matrix = np.zeros((len(ids), len(ids)), np.int64)
  for (truth, guess), count in pairs.items():
    if truth in index and guess in index:
      matrix[index[truth], index[guess]] += count
  return matrix, ids


@nnx.jit(static_argnames="num_ways")
def _logits(model, episode, num_ways):
  """[Q,W] logits of an (eval-mode) model on a device episode."""
  return model(episode["support_images"], episode["support_labels"],
               episode["support_mask"], episode["query_images"],
               num_ways=num_ways)


def validation_images(config, model, mesh) -> dict[str, np.ndarray]:
  """{tag: [1,H,X,3] uint8}: per valid source, one attention figure (query
  0 of the first validation episode, the centre position) and the confusion
  of the validation episodes (the episodes validation ran: same seed and
  count), by dataset class id.

  Costs one more forward pass over the validation episodes.
  """
  images = {}
  num_ways = input_pipeline.max_ways(config, "VALID")
  for source in config.data.valid_sources:
    stream = input_pipeline.episodes(
        config, "VALID", [source], seed=config.eval.seed,
        pad_multiple=mesh.size,
        buckets=input_pipeline.eval_buckets(config, "VALID", source,
                                            mesh.size))
    pairs, first = {}, None
    model.eval()
    try:
      for _ in range(config.train.num_valid_episodes):
        episode = next(stream)
        first = episode if first is None else first
        device = mesh_lib.shard_episode(episode, mesh,
                                        episode_lib.MODEL_INPUT_KEYS)
        width = episode_lib.logit_width(num_ways, device)
        logits = np.asarray(_logits(model, device, num_ways=width))
        episode_confusion(pairs, logits, episode)
    finally:
      model.train()
      stream.close()
    matrix, ids = confusion_matrix(pairs)
    images[f"valid/{source}/confusion"] = to_array(confusion_figure(
        matrix, ids, f"{source} VALID: {config.train.num_valid_episodes} "
        "episodes"))[None]
    one = dict(first, query_images=first["query_images"][:1])
    out = models.inspect_episode(model, one, num_ways=int(first["num_ways"]))
    h, w = out.attention.shape[1:3]
    fig = attention_figure(
        out, first["support_images"], first["query_images"][0], 0,
        (h // 2, w // 2), true_label=int(first["query_labels"][0]),
        title=f"{source} VALID episode 0, query 0: attention of position "
        f"({h // 2}, {w // 2})")
    images[f"valid/{source}/attention"] = to_array(fig)[None]
  return images


def write_validation_images(config, model, mesh, step: int, writer) -> None:
  """The validation hook: writes `validation_images` with `writer`.

  Single-process runs only (the figures run the model outside the sharded
  steps); a multi-process run logs that it skips them.
  """
  if jax.process_count() > 1:
    logging.warning("config.eval.attention_images: skipped in multi-process "
                    "runs")
    return
  writer.write_images(step, validation_images(config, model, mesh))
