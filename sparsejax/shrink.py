"""Shrinking: a physically smaller dense model with the logits of a masked one.

A sparse network often has units (MLP neurons, conv channels) that lie on no
input-to-output path of its mask: the effective mask of
:mod:`sparsejax.diagnostics` prunes every weight into and out of them, and
SRigL's neuron ablation leaves units with an all-zero fan-in. :func:`shrink`
cuts them out and returns a *smaller registry model of the same family*
(fewer hidden units per MLP layer, fewer channels per conv) with its
variables and mask, whose logits equal the masked model's within float
rounding.

A unit is cut when it is *dead* (no effective weight into it from any of the
kernels that write it) and cutting it cannot change the logits:

* it is read by no kept unit (every kernel reading it has zero kept weights
  from it into the kept units of its output), or
* its value, which then does not depend on the input (it has no input path),
  is exactly zero wherever it is read (e.g. ``relu`` of a negative batch-norm
  offset), or
* its constant contribution can be folded exactly: into the bias of a
  ``Dense`` reader (MLP layers, the classifier after global average
  pooling), or into the running mean of the batch norm after a 1x1,
  unpadded conv (a ResNet projection shortcut) when the value is the same at
  every position.

**What cannot shrink, and why**: a dead channel whose input-independent value
is nonzero and is read by a 3x3 zero-padded convolution is kept: the conv of a
constant map is not constant at the image border, so no bias (the convs have
none) or batch-norm offset can replace it. ``Result.report`` names every
such channel, its layer and the reason. A layer whose units are all cut keeps
one unit whose outgoing weights are zeroed (a width of 0 is not a model). The
input and the logits never shrink. Batch norm is kept (not folded): the
shrunk model's ``batch_stats`` are the kept channels' statistics, with the
folded constants subtracted from the running means.

Residual streams (ResNets): the channels of a stage's stream are one group
written by the stem or the projection shortcut and by the second conv of every
block of the stage, read by the first conv of every block, the next stage's
projection and first conv, or the classifier; a stream channel is cut only if
it is dead in every block that reads or writes it.

Families: the registry MLP (:class:`sparsejax.models.MLP`, new ``hidden``),
CIFAR ResNets of basic blocks (:class:`sparsejax.models.ResNet`: ResNet-20/
32/56/18, new ``stage_channels`` and ``block_channels``; not the ghost-skip
variant, export it first with :func:`sparsejax.tost.export`) and VGG
(:class:`sparsejax.models.VGG`, new ``config``). Other models raise
``ValueError``.

Example::

  result = shrink.shrink(model, variables, mask, x[:1])
  print(result.report)                     # widths before/after, kept dead units
  logits = result.model.apply(result.variables, x, train=False)  # = masked logits
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import diagnostics
from sparsejax import masks
from sparsejax import models
from sparsejax import scores

PyTree = Any


@dataclasses.dataclass
class _Reader:
  module: str  # path of the reading Dense/Conv module, "A/B"
  dst: str | None  # group written by it (None: the logits)
  absorb: str  # "bias" | "norm" | "none"
  norm: str | None = None  # the batch norm after it ("norm" absorb)


@dataclasses.dataclass
class _Group:
  name: str
  writers: list[tuple[str, str | None]]  # (kernel module, batch norm after it)
  readers: list[_Reader]


class Report(dict):
  """The report of :func:`shrink` (a dict; ``str()`` gives a table).

  Keys: ``layers``: ``{group: {"before", "after", "dead", "kept_dead":
  {unit: reason}}}`` (``group`` names a layer of units, e.g. ``"Dense_0"``,
  ``"stage1"`` for a residual stream, ``"BasicBlock_4/Conv_0"``);
  ``params_before``, ``params_after`` (parameter counts).
  """

  def __str__(self) -> str:
    width = max([len(g) for g in self["layers"]] + [5])
    rows = [f"{'layer':<{width}}  {'units':>6}  {'dead':>6}  {'after':>6}"]
    notes = []
    for g, r in self["layers"].items():
      rows.append(f"{g:<{width}}  {r['before']:>6}  {r['dead']:>6}  {r['after']:>6}")
      for unit, why in r["kept_dead"].items():
        notes.append(f"  {g} unit {unit} kept: {why}")
    rows.append(f"params {self['params_before']} -> {self['params_after']}")
    return "\n".join(rows + notes)


@dataclasses.dataclass(frozen=True)
class Result:
  """What :func:`shrink` returns.

  Attributes:
    model: the smaller model (same class, smaller widths).
    variables: its variables (``params`` masked, ``batch_stats`` if any).
    mask: its bool mask (the kept part of the original mask).
    report: a :class:`Report`.
  """

  model: nn.Module
  variables: dict
  mask: PyTree
  report: Report


def _get(tree: Mapping, path: str):
  node = tree
  for key in path.split("/"):
    node = node[key]
  return node


# ----------------------------------------------------------------------------
# Families: the unit groups, their writers and readers, and the smaller model
# ----------------------------------------------------------------------------


def _mlp_groups(model: models.MLP) -> tuple[list[_Group], Any]:
  n = len(model.hidden)
  groups = [
    _Group(
      f"Dense_{l}",
      [(f"Dense_{l}", None)],
      [_Reader(f"Dense_{l + 1}", f"Dense_{l + 1}" if l + 1 < n else None, "bias")],
    )
    for l in range(n)
  ]
  return groups, lambda sizes: model.clone(hidden=tuple(sizes[g.name] for g in groups))


def _vgg_groups(model: models.VGG) -> tuple[list[_Group], Any]:
  convs = [c for c in model.config if c != "M"]
  groups = []
  for l in range(len(convs)):
    last = l + 1 == len(convs)
    reader = (
      _Reader("Dense_0", None, "bias")
      if last
      else _Reader(f"Conv_{l + 1}", f"Conv_{l + 1}", "none")
    )
    groups.append(_Group(f"Conv_{l}", [(f"Conv_{l}", f"BatchNorm_{l}")], [reader]))

  def build(sizes):
    it = iter(sizes[g.name] for g in groups)
    return model.clone(config=tuple(c if c == "M" else next(it) for c in model.config))

  return groups, build


def _resnet_groups(model: models.ResNet) -> tuple[list[_Group], Any]:
  if model.ghost_skips:
    raise ValueError(
      "shrink needs the plain ResNet: drop the ghost skips first "
      "(sparsejax.tost.export and ghost_skips=False)"
    )
  stages = [_Group("stage0", [("Conv_0", "BatchNorm_0")], [])]
  stages += [_Group(f"stage{i}", [], []) for i in range(1, len(model.stage_sizes))]
  mids, b = [], 0
  for i, n in enumerate(model.stage_sizes):
    for j in range(n):
      blk = f"BasicBlock_{b}"
      src = stages[i - 1] if (i > 0 and j == 0) else stages[i]
      mid = _Group(
        f"{blk}/Conv_0",
        [(f"{blk}/Conv_0", f"{blk}/BatchNorm_0")],
        [_Reader(f"{blk}/Conv_1", stages[i].name, "none")],
      )
      mids.append(mid)
      src.readers.append(_Reader(f"{blk}/Conv_0", mid.name, "none"))
      if i > 0 and j == 0:
        src.readers.append(_Reader(f"{blk}/conv_proj", stages[i].name, "norm", f"{blk}/norm_proj"))
        stages[i].writers.append((f"{blk}/conv_proj", f"{blk}/norm_proj"))
      stages[i].writers.append((f"{blk}/Conv_1", f"{blk}/BatchNorm_1"))
      b += 1
  stages[-1].readers.append(_Reader("Dense_0", None, "bias"))

  def build(sizes):
    return model.clone(
      stage_channels=tuple(sizes[g.name] for g in stages),
      block_channels=tuple(sizes[g.name] for g in mids),
    )

  return stages + mids, build


def _family(model: nn.Module):
  if isinstance(model, models.MLP):
    return _mlp_groups(model)
  if isinstance(model, models.ResNet):
    return _resnet_groups(model)
  if isinstance(model, models.VGG):
    return _vgg_groups(model)
  raise ValueError(
    f"shrink supports the registry MLP, CIFAR ResNets of basic blocks and VGG; "
    f"got {type(model).__name__} (its layer graph is not described to shrink)"
  )


# ----------------------------------------------------------------------------
# The shrink
# ----------------------------------------------------------------------------


def _reader_inputs(model, variables, x, **kwargs) -> dict[str, np.ndarray]:
  """The input of every Dense/Conv module on an all-zero batch of one example."""
  seen: dict[str, np.ndarray] = {}

  def record(next_fun, args, kwargs_, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, (nn.Dense, nn.Conv)):
      seen["/".join(module.path)] = args[0] if args else kwargs_["inputs"]
    return next_fun(*args, **kwargs_)

  def run(v, inp):
    with nn.intercept_methods(record):
      model.apply(v, inp, **kwargs)
    return dict(seen)

  out = jax.jit(run)(variables, jnp.zeros((1, *x.shape[1:]), x.dtype))
  return {k: np.asarray(v, np.float64) for k, v in out.items()}


def _rows(kernel: np.ndarray) -> np.ndarray:
  """``[..., c_in, c_out]`` → ``[c_in, rest]``: each input channel's weights."""
  return np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1)


def shrink(
  model: nn.Module, variables: Mapping[str, PyTree], mask: PyTree, x: jax.Array, **kwargs
) -> Result:
  """The smaller dense model of ``model``'s family with the masked model's logits.

  Args:
    model: a registry MLP, ResNet (basic blocks) or VGG.
    variables: its trained ``{'params', 'batch_stats'?}``.
    mask: bool mask of ``variables['params']`` (the params are masked with it).
    x: an example batch (its shape and dtype are used), e.g. ``x[:1]``.
    **kwargs: further static ``model.apply`` arguments (evaluation mode is
      implied: ``train=False``).

  Returns:
    A :class:`Result`: the smaller ``model``, its ``variables`` and ``mask``,
    and the :class:`Report` naming every layer's widths and the dead units
    that could not be cut, with the reason.

  Raises:
    ValueError: an unsupported model family or a mask that does not fit.
  """
  groups, build = _family(model)
  params = variables["params"]
  masks.check_mask(mask, params)
  params = jax.tree.map(lambda p, m: np.asarray(masks.apply(p, m)), params, mask)
  np_mask = jax.tree.map(lambda m: np.array(m, bool), mask)
  state = {k: jax.tree.map(np.asarray, v) for k, v in variables.items() if k != "params"}
  mvars = {**state, "params": params}

  _, apply_fn = scores.linen_apply_fn(model, mvars, **kwargs)
  eff = diagnostics.effective_mask(mask, apply_fn, tuple(x.shape[1:]))
  eff = jax.tree.map(lambda m: np.asarray(m, bool), eff)
  inputs = _reader_inputs(model, mvars, x, train=False, **kwargs)
  kernel = lambda module: _get(params, module)["kernel"]

  size = {g.name: kernel(g.writers[0][0]).shape[-1] for g in groups}
  dead = {}
  for g in groups:
    live = np.zeros(size[g.name], bool)
    for module, _ in g.writers:
      live |= _get(eff, module)["kernel"].reshape(-1, size[g.name]).any(axis=0)
    dead[g.name] = ~live
  kept = {g: ~d for g, d in dead.items()}
  why: dict[str, dict[int, str]] = {g.name: {} for g in groups}

  def reads(r: _Reader, g: _Group) -> np.ndarray:
    """Per channel of ``g``: a kept weight into a kept unit of ``r.dst``."""
    w = _rows(kernel(r.module))
    if r.dst is not None:
      k = kernel(r.module)
      w = np.moveaxis(k, -2, 0)[..., kept[r.dst]].reshape(k.shape[-2], -1)
    return (w != 0).any(axis=1)

  def value(r: _Reader) -> np.ndarray:
    v = inputs[r.module]
    return v.reshape(-1, v.shape[-1])  # [positions, channels]

  def absorbable(r: _Reader) -> np.ndarray:
    v = value(r)
    if r.absorb == "bias":
      return np.ones(v.shape[1], bool)
    if r.absorb == "norm":
      return (v == v[:1]).all(axis=0)
    return np.zeros(v.shape[1], bool)

  changed = True
  while changed:
    changed = False
    for g in groups:
      for r in g.readers:
        nonzero = (value(r) != 0).any(axis=0)
        need = dead[g.name] & ~kept[g.name] & reads(r, g) & nonzero & ~absorbable(r)
        for c in np.flatnonzero(need):
          kind = tuple(kernel(r.module).shape[:-2])
          why[g.name][int(c)] = (
            f"no active input path, but its input-independent value "
            f"(max |v| = {np.abs(value(r)[:, c]).max():.3g}) is read by the "
            f"{'x'.join(map(str, kind))} zero-padded conv {r.module}, whose "
            f"border output no bias or batch-norm offset can replace"
          )
        if need.any():
          kept[g.name] = kept[g.name] | need
          changed = True

  # Fold the constant contributions of the cut channels into their readers.
  new_params = jax.tree.map(np.copy, params)
  new_state = jax.tree.map(np.copy, state)
  for g in groups:
    cut = ~kept[g.name]
    for r in g.readers:
      v = value(r)
      k = kernel(r.module)
      contrib_in = np.where(cut, v[0], 0.0)  # constant per cut channel
      if r.absorb == "none" or not contrib_in.any():
        continue
      flat = k.reshape(-1, k.shape[-2], k.shape[-1])  # [taps, c_in, c_out]
      contrib = np.einsum("c,tco->o", contrib_in, flat.astype(np.float64))
      if r.absorb == "bias":
        b = _get(new_params, r.module)["bias"]
        b += contrib.astype(b.dtype)
      else:
        mean = _get(new_state["batch_stats"], r.norm)["mean"]
        mean -= contrib.astype(mean.dtype)

  keep = {}
  for g in groups:
    idx = np.flatnonzero(kept[g.name])
    if idx.size == 0:  # a model needs one unit: keep one that reads nothing
      idx = np.array([0])
      for r in g.readers:
        for tree in (new_params, np_mask):
          ker = _get(tree, r.module)["kernel"]
          ker[..., 0, :] = 0
    keep[g.name] = idx

  in_keep: dict[str, np.ndarray] = {}
  out_keep: dict[str, np.ndarray] = {}
  norm_keep: dict[str, np.ndarray] = {}
  for g in groups:
    for module, norm in g.writers:
      out_keep[module] = keep[g.name]
      if norm is not None:
        norm_keep[norm] = keep[g.name]
    for r in g.readers:
      in_keep[r.module] = keep[g.name]

  def slice_leaf(path: str, leaf):
    module, name = path.rsplit("/", 1)
    a = np.asarray(leaf)
    if name == "kernel":
      if module in in_keep:
        a = np.take(a, in_keep[module], axis=-2)
      if module in out_keep:
        a = np.take(a, out_keep[module], axis=-1)
    elif module in out_keep or module in norm_keep:
      a = a[(out_keep.get(module) if module in out_keep else norm_keep[module])]
    return a

  def slice_tree(tree):
    return masks.map_with_path(slice_leaf, tree)

  shrunk_params = slice_tree(new_params)
  shrunk_mask = slice_tree(np_mask)
  shrunk_state = {k: slice_tree(v) for k, v in new_state.items()}
  small = build({g: int(i.size) for g, i in keep.items()})
  layers = {
    g.name: {
      "before": int(size[g.name]),
      "after": int(keep[g.name].size),
      "dead": int(dead[g.name].sum()),
      "kept_dead": why[g.name],
    }
    for g in groups
  }
  count = lambda t: sum(int(np.size(a)) for a in jax.tree.leaves(t))
  report = Report(layers=layers, params_before=count(params), params_after=count(shrunk_params))
  shrunk_vars = {**shrunk_state, "params": shrunk_params}
  _check_fits(small, shrunk_vars, x)
  return Result(
    small, jax.tree.map(jnp.asarray, shrunk_vars), jax.tree.map(jnp.asarray, shrunk_mask), report
  )


def _check_fits(model: nn.Module, variables: dict, x: jax.Array) -> None:
  """The shrunk variables have the structure and shapes of the shrunk model."""
  want = jax.eval_shape(model.init, jax.random.key(0), x[:1])
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  if jax.tree.structure(want) != jax.tree.structure(got) or any(
    a.shape != b.shape for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got))
  ):
    raise AssertionError(
      "shrink built variables that do not fit the smaller model (a bug; please report it)"
    )


def widths(model: nn.Module) -> dict[str, Sequence[int]]:
  """The width fields :func:`shrink` sets on ``model``'s family."""
  if isinstance(model, models.MLP):
    return {"hidden": tuple(model.hidden)}
  if isinstance(model, models.ResNet):
    return {"stage_channels": model.stage_channels, "block_channels": model.block_channels}
  if isinstance(model, models.VGG):
    return {"config": tuple(model.config)}
  raise ValueError(f"no width fields known for {type(model).__name__}")
