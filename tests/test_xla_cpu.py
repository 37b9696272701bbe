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
      env=dict(os.environ, XLA_FLAGS="--xla_cpu_no_such_option_in_any_release=1",
               JAX_PLATFORMS="cpu"), capture_output=True, text=True)
  assert bad.returncode != 0 and "Unknown flag" in bad.stderr
  if _xla_cpu.jaxlib_defines(NAME):  # a known option starts cleanly
    ok = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=FLAG, JAX_PLATFORMS="cpu"),
        capture_output=True, text=True)
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
  base = {k: v for k, v in os.environ.items()
          if k not in ("XLA_FLAGS", _xla_cpu.OPT_OUT)}
  env = dict(base, JAX_PLATFORMS="cpu", **env)
  proc = subprocess.run([sys.executable, str(script), str(grads), str(text)],
                        cwd=REPO, env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  ynn, rest = text.read_text().split("\n", 1)
  return dict(np.load(grads)), ynn == "True", rest


@pytest.mark.skipif(not _xla_cpu.jaxlib_defines(NAME),
                    reason=f"this jaxlib has no {NAME} option")
def test_fast_path_same_gradients_and_accelerator_lowering(tmp_path):
  fast, fast_ynn, fast_text = _run(tmp_path, "fast")
  default, _, default_text = _run(tmp_path, "default", **{_xla_cpu.OPT_OUT: "0"})
  assert not fast_ynn  # no YNNPACK fusion left in the compiled step
  assert sorted(fast) == sorted(default) and len(fast) == 9
  for k in fast:
    np.testing.assert_allclose(fast[k], default[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The options are XLA:CPU backend options: what JAX lowers is unchanged.
  assert fast_text == default_text


@pytest.mark.skipif(not _xla_cpu.jaxlib_defines(NAME),
                    reason=f"this jaxlib has no {NAME} option")
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
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "1"


def test_models_conv_same_gradients_and_cpu_only_materialisation():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  from sparsejax import models  # pylint: disable=g-import-not-at-top
  from sparsejax.models import activations  # pylint: disable=g-import-not-at-top

  # resnet20 uses activations.conv_and_norm, hence _xla_cpu.conv_general_dilated
  model = models.get("resnet20", 10, width=1)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
  y = jnp.arange(4) % 10
  v = model.init(jax.random.key(1), x)

  def loss(p, conv):
    orig = activations.conv_and_norm

    def plain(train, dtype, init_gain=activations.HE_GAIN):
      c, n = orig(train, dtype, init_gain)
      return (c if conv is None else
              lambda *a, **k: c(*a, conv_general_dilated=conv, **k)), n

    activations.conv_and_norm = plain
    try:
      out, _ = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                           train=True, mutable=["batch_stats"])
    finally:
      activations.conv_and_norm = orig
    return -jnp.mean(jax.nn.log_softmax(out)[jnp.arange(4), y])

  fast = jax.jit(jax.grad(lambda p: loss(p, None)))
  ref = jax.jit(jax.grad(lambda p: loss(p, lax.conv_general_dilated)))
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
