"""Effective sparsity, layer collapse and the mask report (SPEC §1)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sparsejax import diagnostics
from sparsejax import masks
from sparsejax import scores


def _mlp_params():
  return {
    "l1": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    "l2": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)},
    "l3": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
  }


def _mlp_apply(p, x, train):
  del train
  for k in ("l1", "l2"):
    x = jax.nn.relu(x @ p[k]["kernel"] + p[k]["bias"])
  return x @ p["l3"]["kernel"] + p["l3"]["bias"]


def test_dead_hidden_units_prune_their_weights_effectively():
  params = _mlp_params()
  m = {
    k: {"kernel": np.ones(v["kernel"].shape, bool), "bias": np.ones(v["bias"].shape, bool)}
    for k, v in params.items()
  }
  m["l1"]["kernel"][:, 1] = False  # hidden unit 1 of layer 1: no incoming weights
  m["l2"]["kernel"][0, 2] = False
  m["l3"]["kernel"][2, :] = False  # unit 2 of layer 2: no outgoing weights
  mask = jax.tree.map(jnp.asarray, m)

  eff = diagnostics.effective_mask(mask, _mlp_apply, (4,))
  # l1: unit 1 has nothing in; unit 0, 2 alive -> 8 effective of 8 kept.
  # l2: row 1 starts at a dead unit (-3); column 2 ends at a unit with no way
  #     out (-2 more: (0, 2) is already pruned, (1, 2) counted in row 1).
  # l3: row 2 pruned; rows 0 and 1 (units fed by l1 units 0, 2) alive.
  want_l2 = np.array([[1, 1, 0], [0, 0, 0], [1, 1, 0]], bool)
  np.testing.assert_array_equal(eff["l1"]["kernel"], m["l1"]["kernel"])
  np.testing.assert_array_equal(eff["l2"]["kernel"], want_l2)
  np.testing.assert_array_equal(eff["l3"]["kernel"], m["l3"]["kernel"])
  # Biases are returned unchanged.
  np.testing.assert_array_equal(eff["l1"]["bias"], m["l1"]["bias"])

  # Nominal 8 + 8 + 4 = 20 of 27 kept; effective 8 + 4 + 4 = 16.
  assert masks.summary(mask).kept == 20
  assert np.isclose(diagnostics.effective_sparsity(mask, _mlp_apply, (4,)), 1 - 16 / 27)

  # Layer 2 unit 2 now fed by nothing and layer 3 keeps only its row: the
  # network is disconnected and everything is effectively pruned.
  m["l2"]["kernel"][:, :2] = False
  m["l3"]["kernel"][:2, :] = False
  m["l3"]["kernel"][2, :] = True
  m["l2"]["kernel"][:, 2] = False
  mask = jax.tree.map(jnp.asarray, m)
  assert diagnostics.layer_collapse(mask) == ["l2/kernel"]
  assert diagnostics.effective_sparsity(mask, _mlp_apply, (4,)) == 1.0


class _ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.Conv(4, (3, 3), padding="SAME")(nn.relu(x))
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(2)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _conv_net():
  model = _ConvNet()
  variables = model.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  # Statistics that would kill every unit if used as they are (or abs'd).
  stats = jax.tree.map(lambda s: s + 100.0, variables["batch_stats"])
  return scores.linen_apply_fn(model, {"params": variables["params"], "batch_stats": stats})


def test_conv_channels_without_inputs_or_outputs_and_batch_norm():
  params, apply_fn = _conv_net()
  mask = masks.ones_like(params)
  eff = diagnostics.effective_mask(mask, apply_fn, (6, 6, 3))
  for a, b in zip(jax.tree.leaves(eff), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)  # dense: everything is effective

  mask["Conv_0"]["kernel"] = mask["Conv_0"]["kernel"].at[..., 2].set(False)
  mask["Dense_0"]["kernel"] = mask["Dense_0"]["kernel"].at[3, :].set(False)
  rep = diagnostics.report(mask, params, apply_fn, (6, 6, 3))
  layers = rep["layers"]
  assert layers["Conv_0/kernel"]["kept"] == layers["Conv_0/kernel"]["effective_kept"] == 81
  # Conv_1: input channel 2 is dead (9 * 4) and output channel 3 has no way
  # out (9 * 4), overlapping in 9 entries.
  assert layers["Conv_1/kernel"]["kept"] == 144
  assert layers["Conv_1/kernel"]["effective_kept"] == 144 - 36 - 36 + 9
  assert layers["Dense_0/kernel"]["effective_kept"] == 6
  assert rep["total"] == 108 + 144 + 8
  assert rep["effective_kept"] == 81 + 81 + 6
  assert np.isclose(rep["effective_sparsity"], 1 - 168 / 260)
  assert np.isclose(layers["Conv_1/kernel"]["effective_density"], 81 / 144)
  assert rep["collapsed"] == [] and rep["effectively_collapsed"] == []
  assert "Conv_1/kernel" in str(rep)

  mask["Dense_0"]["kernel"] = jnp.zeros_like(mask["Dense_0"]["kernel"])
  rep = diagnostics.report(mask, params, apply_fn, (6, 6, 3))
  assert rep["collapsed"] == ["Dense_0/kernel"]
  assert rep["effectively_collapsed"] == ["Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel"]
  assert rep["effective_sparsity"] == 1.0
  assert "COLLAPSED" in str(rep)
