"""Canonical-layout convolutions (sparsejax._conv_layout)."""

import importlib
import re
import warnings

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import _conv_layout
from sparsejax import masks
from sparsejax import models
from sparsejax import scores

NHWC = ("NHWC", "HWIO", "NHWC")


def _net(params, x):
  """Strided, dilated, grouped and 1-D convolutions, relu (custom_jvp), a nested jit."""
  h = lax.conv_general_dilated(x, params["w1"], (2, 2), "SAME", dimension_numbers=NHWC)
  h = jax.nn.relu(h)
  h = jax.jit(
    lambda h_, w: lax.conv_general_dilated(
      h_, w, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=NHWC
    )
  )(h, params["w2"])
  h = lax.conv_general_dilated(
    h, params["dw"], (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=8
  )
  h = h.reshape(h.shape[0], -1, h.shape[-1])
  h = lax.conv_general_dilated(
    h, params["w1d"], (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
  )
  return jnp.sum(jnp.tanh(h) ** 2)


def _setup():
  keys = jax.random.split(jax.random.key(0), 5)
  params = {
    "w1": jax.random.normal(keys[0], (3, 3, 4, 8)),
    "w2": jax.random.normal(keys[1], (3, 3, 8, 8)) * 0.2,
    "dw": jax.random.normal(keys[2], (3, 3, 1, 8)) * 0.3,
    "w1d": jax.random.normal(keys[3], (2, 8, 4)) * 0.2,
  }
  x = jax.random.normal(keys[4], (2, 8, 8, 4))
  return params, x


def _dim_labels(compiled_text):
  return set(re.findall(r"dim_labels=([^,\s]+)", compiled_text))


def test_same_values_as_the_original_function():
  params, x = _setup()
  grad_fn = jax.grad(_net)
  hvp = lambda p, v: jax.jvp(lambda q: grad_fn(q, x), (p,), (v,))[1]
  for fn, args in [(grad_fn, (params, x)), (hvp, (params, params))]:
    want = jax.jit(fn)(*args)
    got = jax.jit(_conv_layout.canonical_convs(fn))(*args)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def _loop(grad_fn, x):
  def run(params):
    def body(i, acc):
      p = jax.tree.map(lambda w: w * (1.0 + 0.1 * i), params)
      # A convolution under cond, inside the loop body, is rewritten too.
      g = lax.cond(
        i % 2 == 0, lambda q: grad_fn(q, x), lambda q: jax.tree.map(jnp.negative, grad_fn(q, x)), p
      )
      return jax.tree.map(jnp.add, acc, g)

    return lax.fori_loop(0, 3, body, jax.tree.map(jnp.zeros_like, params))

  return run


def test_loop_body_convolutions_are_canonical_on_cpu():
  params, x = _setup()
  canonical = jax.jit(_loop(_conv_layout.canonical_convs(jax.grad(_net)), x))
  plain = jax.jit(_loop(jax.grad(_net), x))
  labels = _dim_labels(canonical.lower(params).compile().as_text())
  # 2-D convolutions b01f_01io->b01f; the 1-D one b0f_0io->b0f.
  assert labels == {"b01f_01io->b01f", "b0f_0io->b0f"}, labels
  for g, w in zip(jax.tree.leaves(canonical(params)), jax.tree.leaves(plain(params))):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(w))))


def test_rewrite_is_lowered_for_cpu_only():
  params, x = _setup()
  fn = jax.jit(_conv_layout.canonical_convs(jax.grad(_net)))

  def transposes(platform):
    text = fn.trace(params, x).lower(lowering_platforms=(platform,)).as_text()
    return text.count("stablehlo.transpose")

  plain = jax.jit(jax.grad(_net)).trace(params, x).lower(lowering_platforms=("cuda",))
  assert transposes("cuda") == plain.as_text().count("stablehlo.transpose")
  assert transposes("cpu") > transposes("cuda")


def _resnet20():
  """ResNet-20 params, apply_fn, dense mask and input shape.

  CIFAR-sized input: on tiny feature maps XLA swaps the operands of some
  weight-gradient convolutions (kernel window larger than the input), which
  gives them other dimension numbers.
  """
  shape = (32, 32, 3)
  model = models.get("resnet20", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, *shape)))
  params, apply_fn = scores.linen_apply_fn(model, variables)
  return params, apply_fn, masks.ones_like(params), shape


def test_synflow_loop_on_resnet_is_canonical_and_matches_per_round_masks():
  params, apply_fn, mask, shape = _resnet20()
  rounds, sparsity = 3, 0.9
  compiled = (
    jax.jit(lambda p, m_: scores.synflow(p, m_, apply_fn, shape, sparsity, rounds))
    .lower(params, mask)
    .compile()
  )
  assert _dim_labels(compiled.as_text()) == {"b01f_01io->b01f"}
  fused = compiled(params, mask)
  # The same rounds, one jitted call each, outside any loop.
  m = mask
  for k in range(1, rounds + 1):
    s = scores.synflow_scores(params, m, apply_fn, shape)
    m = masks.topk_mask(s, 1.0 - (1.0 - sparsity) ** (k / rounds), within=m)
  assert masks.summary(m).kept == masks.summary(fused).kept
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(m)):
    np.testing.assert_array_equal(a, b)


def test_snip_and_grasp_over_stacked_batches_are_canonical():
  # Several scoring batches are summed in a lax.scan: a loop body again.
  params, apply_fn, mask, shape = _resnet20()
  xs = jax.random.normal(jax.random.key(1), (2, 10, *shape))
  ys = jnp.tile(jnp.arange(10), (2, 1))
  for score in (scores.snip, scores.grasp):
    compiled = jax.jit(lambda p, s=score: s(p, mask, apply_fn, (xs, ys))).lower(params).compile()
    assert _dim_labels(compiled.as_text()) == {"b01f_01io->b01f"}, score.__name__


@pytest.fixture
def fresh_warning(monkeypatch):
  """A process that has not warned about the fallback yet."""
  monkeypatch.setattr(_conv_layout, "_warned", False)


def _fallback_warnings(record):
  return [
    w
    for w in record
    if issubclass(w.category, RuntimeWarning)
    and "canonical-layout convolutions are off" in str(w.message)
  ]


def _run_with_fallback():
  """Plain and wrapped gradients of ``_net``; the fallback warnings of two traces."""
  params, x = _setup()
  expected = jax.jit(jax.grad(_net))(params, x)
  wrapped = jax.jit(_conv_layout.canonical_convs(jax.grad(_net)))
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    got = wrapped(params, x)
    # A second trace (other shapes) in the same process does not warn again.
    jax.jit(_conv_layout.canonical_convs(_net))(params, x[:1])
  for k in expected:
    np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-5)
  return wrapped, _fallback_warnings(record)


def _cpu_transposes(fn):
  text = fn.trace(*_setup()).lower(lowering_platforms=("cpu",)).as_text()
  return text.count("stablehlo.transpose")


def test_falls_back_with_one_warning_when_reevaluation_fails(monkeypatch, fresh_warning):
  calls = []

  def changed_internals(*args, **kwargs):
    # Fails at the second convolution, mid-way through the jaxpr.
    calls.append(1)
    if len(calls) == 2:
      raise TypeError("bind() got an unexpected keyword argument 'precision'")
    return original(*args, **kwargs)

  original = _conv_layout._canonical_conv
  monkeypatch.setattr(_conv_layout, "_canonical_conv", changed_internals)
  wrapped, warned = _run_with_fallback()
  assert len(warned) == 1 and "TypeError" in str(warned[0].message), warned
  # Nothing of the failed rewrite is left in the program: no transposes
  # beyond those of the plain gradient (16 with the rewrite, checked below).
  assert _cpu_transposes(wrapped) == _cpu_transposes(jax.jit(jax.grad(_net)))
  monkeypatch.setattr(_conv_layout, "_canonical_conv", original)
  assert _cpu_transposes(jax.jit(_conv_layout.canonical_convs(jax.grad(_net)))) > 1


def test_falls_back_with_one_warning_without_the_conv_primitive(monkeypatch, fresh_warning):
  class OldPrimitives:  # no conv_general_dilated_p, and no custom_vjp_call_p
    jit_p, closed_call_p, custom_jvp_call_p = object(), object(), object()

  class NewerPrimitives(OldPrimitives):  # only a call primitive missing
    conv_general_dilated_p = lax.conv_general_dilated_p

  assert _conv_layout._lookup(OldPrimitives) is None
  conv, inline = _conv_layout._lookup(NewerPrimitives)
  assert conv is lax.conv_general_dilated_p
  assert inline == {
    NewerPrimitives.jit_p: "jaxpr",
    NewerPrimitives.closed_call_p: "call_jaxpr",
    NewerPrimitives.custom_jvp_call_p: "call_jaxpr",
  }
  # The module wires the lookup in at import: reload it under the old JAX.
  monkeypatch.setattr(jax.extend.core, "primitives", OldPrimitives)
  try:
    importlib.reload(_conv_layout)
    assert _conv_layout._conv_p is None
    _, warned = _run_with_fallback()
    assert len(warned) == 1 and "conv_general_dilated_p" in str(warned[0].message), warned
  finally:
    monkeypatch.undo()
    importlib.reload(_conv_layout)
  assert _conv_layout._conv_p is lax.conv_general_dilated_p


def test_no_fallback_warning_off_cpu(monkeypatch, fresh_warning):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    _conv_layout._warn_fallback("test")
  assert not _fallback_warnings(record) and not _conv_layout._warned


if __name__ == "__main__":
  pytest.main([__file__])
