"""The one model closure (sparsejax.modeling) and the explicit scalar feed."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import gradient_flow
from sparsejax import modeling
from sparsejax import models
from sparsejax import scores
from sparsejax import tost
from sparsejax.models import activations

REPO = pathlib.Path(__file__).resolve().parents[1]
X = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))


def _small(**kwargs):
  return models.get("resnet20", 10, stage_sizes=(1, 1), num_filters=4, **kwargs)


@pytest.mark.parametrize("name", models.names())
def test_scalar_names_come_from_the_fields(name):
  assert models.get(name, 10).scalar_names == frozenset()
  assert models.get(name, 10, act=activations.blend()).scalar_names == {"act_coef"}
  if tost.supports_ghost_skips(name):
    assert tost.ghost_model(name, 10).scalar_names == {"ghost_coef"}
    assert tost.ghost_model(name, 10, act=activations.blend()).scalar_names == {
      "act_coef",
      "ghost_coef",
    }


def test_an_unknown_scalar_is_an_error_naming_the_known_ones():
  model = _small(act=activations.blend())
  variables = model.init(jax.random.key(0), X)
  with pytest.raises(ValueError, match=r"reads no scalar 'ghost_coef'; it reads: act_coef"):
    modeling.apply_model(model, variables, X, train=False, scalars={"ghost_coef": 0.5})
  with pytest.raises(ValueError, match=r"reads no scalar 'act_coef'; it reads: none"):
    modeling.apply_model(_small(), variables, X, train=False, scalars={"act_coef": 0.5})
  with pytest.raises(ValueError, match="reads no scalar 'act_coeff'"):
    scores.linen_apply_fn(model, variables, scalars={"act_coeff": 1.0})
  with pytest.raises(ValueError, match="reads no scalar 'ghost_coef'"):
    gradient_flow.masked_grad_norms(
      model,
      variables["params"],
      (X, jnp.zeros(2, jnp.int32)),
      batch_stats=variables["batch_stats"],
      scalars={"ghost_coef": 0.5},
    )
  # model_scalars picks the model's own and leaves the others (a loss's) out
  assert modeling.model_scalars(model, {"act_coef": 1, "tost_label_smoothing": 2}) == {
    "act_coef": 1
  }


@pytest.mark.parametrize("train", [False, True])
def test_apply_model_is_the_models_own_output(train):
  # The scalars collection is the model's input: apply_model with the fast
  # path gives the logits and statistics of the bare model.apply, the scalar
  # changes them, and an unfed scalar is the plain model (ReLU, γ = 1).
  model = tost.ghost_model(
    "resnet20", 10, stage_sizes=(1, 1), num_filters=4, act=activations.blend()
  )
  variables = model.init(jax.random.key(0), X)
  feed = {"act_coef": jnp.float32(0.3), "ghost_coef": jnp.float32(0.5)}
  fn = jax.jit(lambda v, s: modeling.apply_model(model, v, X, train=train, scalars=s))
  logits, state = fn(variables, feed)
  mutable = ["batch_stats"] if train else False
  ref = jax.jit(lambda v, s: model.apply({**v, "scalars": s}, X, train=train, mutable=mutable))(
    variables, feed
  )
  ref_logits, ref_state = ref if train else (ref, variables["batch_stats"])
  rtol = 1e-5 if train else 0  # training: the GEMV batch norm on CPU
  np.testing.assert_allclose(logits, ref_logits, rtol=rtol, atol=1e-6 if train else 0)
  for a, b in zip(jax.tree.leaves(state["batch_stats"]), jax.tree.leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  plain, _ = fn(variables, {})
  relu_full = jax.jit(
    lambda v: modeling.apply_model(
      model, v, X, train=train, scalars={"act_coef": 0.0, "ghost_coef": 1.0}
    )
  )(variables)[0]
  np.testing.assert_allclose(plain, relu_full, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(plain - logits).max()) > 1e-4


def test_loss_and_logits_routes_the_models_scalars_and_gives_the_loss_all():
  model = models.get("mlp", 10, hidden=(8,), act=activations.blend())
  x = jax.random.normal(jax.random.key(2), (4, 4, 4, 1))
  y = jnp.arange(4) % 10
  params = model.init(jax.random.key(0), x)["params"]
  seen = {}

  def loss_fn(logits, labels, scalars):
    seen.update(scalars)
    return scalars["alpha"] * jnp.sum(logits, -1) + labels

  loss, (logits, state) = modeling.loss_and_logits(
    model, params, {}, x, y, loss_fn, scalars={"act_coef": 0.25, "alpha": 2.0}
  )
  assert set(seen) == {"act_coef", "alpha"} and state == {}
  ref = model.apply({"params": params, "scalars": {"act_coef": 0.25}}, x)
  np.testing.assert_allclose(logits, ref, rtol=1e-6)
  np.testing.assert_allclose(loss, jnp.mean(2.0 * jnp.sum(ref, -1) + y), rtol=1e-6)


def _imports(path: pathlib.Path) -> set[str]:
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_only_modeling_applies_the_cpu_fast_path():
  # The CPU rewrites live in _xla_cpu (and its _conv_layout); the package
  # __init__ sets the XLA options, modeling applies the rest. Models, scores
  # and recipes never import them.
  cpu = {"sparsejax._xla_cpu", "sparsejax._conv_layout"}
  users = {
    str(p.relative_to(REPO)) for p in (REPO / "sparsejax").rglob("*.py") if _imports(p) & cpu
  }
  assert users == {"sparsejax/__init__.py", "sparsejax/modeling.py", "sparsejax/_xla_cpu.py"}


def test_the_fast_path_is_installed_once_when_nested():
  from sparsejax import _xla_cpu  # pylint: disable=g-import-not-at-top

  model = _small()
  variables = model.init(jax.random.key(0), X)

  def conds(nested):
    def f(v):
      if nested:
        with _xla_cpu.fast_path():
          return modeling.apply_model(model, v, X, train=False)[0]
      return modeling.apply_model(model, v, X, train=False)[0]

    return str(jax.make_jaxpr(f)(variables)).count("platform_index")

  assert conds(False) > 0 and conds(True) == conds(False)
