"""The XLA:CPU settings applied on import (sparsejax._xla_cpu)."""

import os
import pathlib
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

from sparsejax import _xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAG = _xla_cpu.FLAGS[0]
NAME = FLAG.lstrip("-").split("=")[0]


def _apply(env, *, defines=lambda name: True, initialized=lambda: False):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    added = _xla_cpu.apply(env, defines=defines, initialized=initialized)
  return added, [str(w.message) for w in caught]


def test_appends_to_the_users_flags_and_is_idempotent():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added, warned = _apply(env)
  assert added == [FLAG] and warned == []
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  assert _apply(env) == ([], [])
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}"
  empty = {}
  assert _apply(empty)[0] == [FLAG] and empty["XLA_FLAGS"] == FLAG


def test_never_overrides_a_users_own_value():
  env = {"XLA_FLAGS": f"--{NAME}=ynn_dot_conv"}
  assert _apply(env) == ([], [])
  assert env["XLA_FLAGS"] == f"--{NAME}=ynn_dot_conv"


@pytest.mark.parametrize("value", ["0", "false", "OFF"])
def test_opt_out(value):
  env = {_xla_cpu.OPT_OUT: value, "XLA_FLAGS": "--a=1"}
  assert _apply(env) == ([], [])
  assert env["XLA_FLAGS"] == "--a=1"


def test_unknown_option_falls_back_with_one_warning():
  env = {"XLA_FLAGS": "--a=1"}
  added, warned = _apply(env, defines=lambda name: False)
  assert added == [] and env["XLA_FLAGS"] == "--a=1"
  assert len(warned) == 1 and NAME in warned[0] and "slower" in warned[0]


def test_backend_already_started_warns_once_and_leaves_flags():
  env = {}
  added, warned = _apply(env, initialized=lambda: True)
  assert added == [] and "XLA_FLAGS" not in env
  assert len(warned) == 1 and "Import sparsejax before" in warned[0]
  assert FLAG in warned[0]


def test_jaxlib_defines_real_and_made_up_options():
  assert not _xla_cpu.jaxlib_defines("xla_cpu_no_such_option_in_any_release")
  # XLA aborts the process on an unknown option: that is why apply() checks.
  bad = subprocess.run(
    [sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
    env=dict(
      os.environ, XLA_FLAGS="--xla_cpu_no_such_option_in_any_release=1", JAX_PLATFORMS="cpu"
    ),
    capture_output=True,
    text=True,
  )
  assert bad.returncode != 0 and "Unknown flag" in bad.stderr
  if _xla_cpu.jaxlib_defines(NAME):  # a known option starts cleanly
    ok = subprocess.run(
      [sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
      env=dict(os.environ, XLA_FLAGS=FLAG, JAX_PLATFORMS="cpu"),
      capture_output=True,
      text=True,
    )
    assert ok.returncode == 0, ok.stderr


# A small conv net with a strided 3x3 and a strided 1x1 convolution and batch
# norm in training mode; prints its gradients, the compiled HLO's use of
# YNNPACK fusions and the StableHLO it lowers to for CPU and for CUDA.
_SCRIPT = textwrap.dedent("""
    import sys, warnings
    warnings.simplefilter("error")  # the import itself must not warn
    import sparsejax, flax.linen as nn, jax, jax.numpy as jnp, numpy as np

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        bn = lambda: nn.BatchNorm(use_running_average=False, momentum=0.9)
        h = nn.relu(bn()(nn.Conv(8, (3, 3), use_bias=False)(x)))
        y = bn()(nn.Conv(16, (3, 3), strides=2, use_bias=False)(h))
        s = nn.Conv(16, (1, 1), strides=2, use_bias=False)(h)
        return nn.Dense(3)(nn.relu(y + s).mean((1, 2)))

    x = jax.random.normal(jax.random.key(0), (16, 12, 12, 3))
    labels = jnp.arange(16) % 3
    net = Net()
    v = net.init(jax.random.key(1), x)
    def loss(p):
      out, _ = net.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                         mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(16), labels])
    g = jax.jit(jax.grad(loss))
    flat = jax.tree_util.tree_flatten_with_path(g(v["params"]))[0]
    np.savez(sys.argv[1], **{jax.tree_util.keystr(k): np.asarray(a) for k, a in flat})
    hlo = g.lower(v["params"]).compile().as_text()
    cuda = jax.export.export(g, platforms=["cuda"])(v["params"]).mlir_module()
    cpu = jax.export.export(g, platforms=["cpu"])(v["params"]).mlir_module()
    with open(sys.argv[2], "w") as f:
      f.write(str("__ynn_fusion" in hlo) + "\\n" + cuda + "\\n@@\\n" + cpu)
""")


def _run(tmp_path, tag, **env):
  script = tmp_path / "net.py"
  script.write_text(_SCRIPT)
  grads, text = tmp_path / f"{tag}.npz", tmp_path / f"{tag}.txt"
  base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", _xla_cpu.OPT_OUT)}
  env = dict(base, JAX_PLATFORMS="cpu", **env)
  proc = subprocess.run(
    [sys.executable, str(script), str(grads), str(text)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  ynn, rest = text.read_text().split("\n", 1)
  return dict(np.load(grads)), ynn == "True", rest


@pytest.mark.skipif(not _xla_cpu.jaxlib_defines(NAME), reason=f"this jaxlib has no {NAME} option")
def test_fast_path_same_gradients_and_accelerator_lowering(tmp_path):
  fast, fast_ynn, fast_text = _run(tmp_path, "fast")
  default, _, default_text = _run(tmp_path, "default", **{_xla_cpu.OPT_OUT: "0"})
  assert not fast_ynn  # no YNNPACK fusion left in the compiled step
  assert sorted(fast) == sorted(default) and len(fast) == 9
  for k in fast:
    np.testing.assert_allclose(fast[k], default[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The options are XLA:CPU backend options: what JAX lowers is unchanged.
  assert fast_text == default_text


@pytest.mark.skipif(not _xla_cpu.jaxlib_defines(NAME), reason=f"this jaxlib has no {NAME} option")
def test_import_after_jax_started_warns_through_real_jax():
  code = textwrap.dedent("""
      import warnings, jax
      jax.numpy.ones(1).block_until_ready()
      with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import sparsejax
      print(sum("Import sparsejax before" in str(x.message) for x in w))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  env.pop(_xla_cpu.OPT_OUT, None)
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True
  )
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "1"


def test_models_conv_same_gradients_and_cpu_only_materialisation():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from sparsejax import modeling  # pylint: disable=g-import-not-at-top
  from sparsejax import models  # pylint: disable=g-import-not-at-top

  # resnet20's convs are activations.Conv: modeling.apply_model's fast path
  # materialises their inputs; a bare model.apply is the plain reference.
  model = models.get("resnet20", 10, width=1)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  y = jnp.arange(4) % 10
  v = model.init(jax.random.key(1), x)

  def loss(p, fast_path):
    variables = {"params": p, "batch_stats": v["batch_stats"]}
    if fast_path:
      out, _ = modeling.apply_model(model, variables, x, train=True)
    else:
      out, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(4), y])

  fast = jax.jit(jax.grad(lambda p: loss(p, True)))
  ref = jax.jit(jax.grad(lambda p: loss(p, False)))
  for a, b in zip(jax.tree.leaves(fast(v["params"])), jax.tree.leaves(ref(v["params"]))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # 19 convolutions, each input through a conditional on CPU (forward, and
  # the cotangent's on the way back); none on GPU.
  hlo = fast.lower(v["params"]).compile().as_text()
  assert hlo.count(" conditional(") >= 19
  cuda = jax.export.export(fast, platforms=["cuda"])(v["params"]).mlir_module()
  cpu = jax.export.export(fast, platforms=["cpu"])(v["params"]).mlir_module()
  # the runtime predicate (is_finite) is lowered for CPU only
  assert "is_finite" not in cuda and cpu.count("is_finite") >= 19


def _bn_pair(x, *, train):
  """Variables, outputs and updated statistics of sparsejax's and flax's BN."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top

  from sparsejax.models import norm  # pylint: disable=g-import-not-at-top

  ours = norm.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  ref = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)
  v = ours.init(jax.random.key(0), x)
  assert jax.tree.map(lambda a: (a.shape, a.dtype, a.tolist()), v) == jax.tree.map(
    lambda a: (a.shape, a.dtype, a.tolist()), ref.init(jax.random.key(0), x)
  )
  v = {
    "params": {
      "scale": jax.numpy.linspace(0.5, 2.0, x.shape[-1]),
      "bias": jax.numpy.linspace(-1.0, 1.0, x.shape[-1]),
    },
    "batch_stats": {
      "mean": jax.numpy.full((x.shape[-1],), 0.3),
      "var": jax.numpy.full((x.shape[-1],), 1.7),
    },
  }
  return ours, ref, v


@pytest.mark.parametrize("opt_out", ["1", "0"])
def test_batch_norm_same_values_and_gradients_as_flax(monkeypatch, opt_out):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv(_xla_cpu.OPT_OUT, opt_out)  # GEMV path, then the plain one
  x = 3.0 * jax.random.normal(jax.random.key(1), (6, 5, 5, 4)) + 2.0
  cot = jax.random.normal(jax.random.key(2), x.shape)
  ours, ref, v = _bn_pair(x, train=True)

  def run(module, x, params):
    y, upd = module.apply(
      {"params": params, "batch_stats": v["batch_stats"]}, x, mutable=["batch_stats"]
    )
    return jnp.sum(y * cot), (y, upd["batch_stats"])

  grads, outs = {}, {}
  for name, module in (("ours", ours), ("ref", ref)):
    f = jax.jit(jax.grad(lambda x, p, m=module: run(m, x, p), (0, 1), has_aux=True))
    with _xla_cpu.fast_path():  # ours: the GEMV batch norm of the fast path
      grads[name], outs[name] = f(x, v["params"])
  for a, b in zip(jax.tree.leaves(outs["ours"]), jax.tree.leaves(outs["ref"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(grads["ours"]), jax.tree.leaves(grads["ref"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # hand check of the running averages: 0.9 * old + 0.1 * batch statistic
  stats = outs["ours"][1]
  np.testing.assert_allclose(stats["mean"], 0.9 * 0.3 + 0.1 * x.mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(stats["var"], 0.9 * 1.7 + 0.1 * x.var((0, 1, 2)), rtol=1e-5)
  ours_eval, ref_eval, _ = _bn_pair(x, train=False)
  np.testing.assert_allclose(ours_eval.apply(v, x), ref_eval.apply(v, x), rtol=1e-6, atol=1e-6)


def test_batch_norm_reductions_are_gemvs_on_cpu_only():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 4))
  _, _, v = _bn_pair(x, train=True)

  def loss(x, scale, bias):
    y, mean, var = _xla_cpu.batch_norm_train(x, scale, bias, 1e-5)
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean * var)

  g = jax.jit(jax.grad(loss, (0, 1, 2)))
  args = (x, v["params"]["scale"], v["params"]["bias"])
  hlo = g.lower(*args).compile().as_text()
  # statistics forward (2) and the scale/bias gradients backward (2)
  assert hlo.count(" dot(") >= 4 and "reduce-window" not in hlo
  cuda = jax.export.export(g, platforms=["cuda"])(*args).mlir_module()
  assert "stablehlo.dot_general" not in cuda and "stablehlo.reduce" in cuda

  # gradient values against autodiff of the textbook formula
  def textbook(x, scale, bias):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    y = (x - mean) / jnp.sqrt(var + 1e-5) * scale + bias
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean * var)

  for a, b in zip(g(*args), jax.grad(textbook, (0, 1, 2))(*args)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_plain_ops_traces_without_the_cpu_rewrites_and_restores_them():
  import jax  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
  w = jax.random.normal(jax.random.key(2), (3, 3, 3, 4))
  scale, bias = jnp.ones((4,)), jnp.zeros((4,))

  def f(x, w):
    y = _xla_cpu.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return jnp.sum(_xla_cpu.batch_norm_train(y, scale, bias, 1e-5)[0] ** 3)

  def branches(fn):
    text = str(jax.make_jaxpr(jax.grad(fn))(x, w))
    return text.count("platform_index") + text.count("cond[")

  assert branches(f) > 0  # the rewrites, outside the context
  with _xla_cpu.plain_ops():
    assert branches(f) == 0  # plain convolution and batch norm
    plain_grad = jax.grad(f)(x, w)
  assert branches(f) > 0  # restored on exit
  np.testing.assert_allclose(plain_grad, jax.grad(f)(x, w), rtol=1e-4, atol=1e-4)
  ref = jax.grad(
    lambda x, w: jnp.sum(
      (
        (lambda y: (y - y.mean((0, 1, 2))) / jnp.sqrt(y.var((0, 1, 2)) + 1e-5))(
          lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        )
      )
      ** 3
    )
  )
  np.testing.assert_allclose(plain_grad, ref(x, w), rtol=1e-4, atol=1e-4)
