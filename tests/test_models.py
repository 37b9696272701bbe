"""Tests for sparsejax.models: registry, shapes, parameter counts, BN, activations."""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsejax import modeling
from sparsejax import models
from sparsejax.models import activations

ALL_NAMES = (
    "resnet20", "resnet32", "resnet56", "resnet18", "resnet50", "wrn22_2",
    "wrn28_10", "vgg11", "vgg16", "vgg19", "mobilenetv2", "lenet5", "mlp",
)  # fmt: skip
BN_NAMES = tuple(n for n in ALL_NAMES if n not in ("lenet5", "mlp"))
CIFAR = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)

# Exact parameter counts ('params' collection) for num_classes=10 on 32x32x3.
PARAM_COUNTS = {
  # ResNet-20 = 270,256 conv weights
  #   stem 3*3*3*16 = 432
  #   stage 1: 6 convs 3*3*16*16 = 13,824
  #   stage 2: 3*3*16*32 + 5 * 3*3*32*32 = 50,688, 1x1 shortcut 16*32 = 512
  #   stage 3: 3*3*32*64 + 5 * 3*3*64*64 = 202,752, 1x1 shortcut 32*64 = 2,048
  # + 1,568 BatchNorm scales and biases (2 * 784 channels: 16 stem, 6 * 16,
  #   6 * 32 + 32 shortcut, 6 * 64 + 64 shortcut)
  # + 650 classifier (64 * 10 + 10).
  "resnet20": 272_474,
  "resnet32": 466_906,
  "resnet56": 855_770,
  "resnet18": 11_173_962,
  # The next three equal the counts of independent PyTorch builds of the
  # same architectures (torch.nn parameters(), BatchNorm affine included):
  # CIFAR ResNet-50 with bottlenecks [3, 4, 6, 3] and 1x1 projection
  # shortcuts; WRN-22-2 and WRN-28-10 with 1x1 conv shortcuts, no bias.
  "resnet50": 23_520_842,
  "wrn22_2": 1_079_642,
  "wrn28_10": 36_479_194,
  "vgg11": 9_228_362,
  # VGG-16: 14,710,464 conv weights + 8,448 BN params + 5,130 classifier.
  "vgg16": 14_724_042,
  "vgg19": 20_035_018,
  "mobilenetv2": 2_296_922,
  # LeNet-5 on 32x32x3: 456 + 2,416 conv, 1024*120+120, 120*84+84, 84*10+10.
  "lenet5": 136_886,
  # MLP on 3072 inputs: 3072*300+300, 300*100+100, 100*10+10.
  "mlp": 953_010,
}
# Activations applied per forward pass (each must receive act_coef).
ACT_CALLS = {
  "resnet20": 1 + 2 * 9,
  "resnet32": 1 + 2 * 15,
  "resnet56": 1 + 2 * 27,
  "resnet18": 1 + 2 * 8,
  "resnet50": 1 + 3 * 16,
  "wrn22_2": 2 * 9 + 1,
  "wrn28_10": 2 * 12 + 1,
  "vgg11": 8,
  "vgg16": 13,
  "vgg19": 16,
  "mobilenetv2": 1 + 2 * 17 + 1,
  "lenet5": 4,
  "mlp": 2,
}


def count(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def kernels_in_dict_order(tree, path=()):
  """(path, shape) of leaves with ndim > 1, walking dicts in iteration order."""
  found = []
  for key, value in tree.items():
    if isinstance(value, dict):
      found += kernels_in_dict_order(value, path + (key,))
    elif value.ndim > 1:
      found.append((path + (key,), value.shape))
  return found


def abstract_init(model, x=CIFAR):
  return jax.eval_shape(model.init, jax.random.key(0), x)


# Registry.


def test_names():
  assert models.names() == list(ALL_NAMES)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError, match="resnet99") as info:
    models.get("resnet99", num_classes=10)
  for name in ALL_NAMES:
    assert name in str(info.value)


def test_kwargs_pass_through():
  assert models.get("resnet32", 10, width=2).width == 2
  assert tuple(models.get("mlp", 10, hidden=(50,)).hidden) == (50,)
  assert models.get("vgg11", 100, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  assert models.get("lenet5", 10, act=activations.swish).act is activations.swish


# Shapes, structure, counts (abstract: no FLOPs).


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_output_shape(name, num_classes):
  model = models.get(name, num_classes)
  variables = abstract_init(model)
  logits = jax.eval_shape(model.apply, variables, CIFAR)
  assert logits.shape == (2, num_classes)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize("name", ALL_NAMES)
def test_variable_collections(name):
  variables = abstract_init(models.get(name, 10))
  expected = {"params", "batch_stats"} if name in BN_NAMES else {"params"}
  assert set(variables) == expected
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  if name in BN_NAMES:
    stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
    params = flax.traverse_util.flatten_dict(variables["params"])
    assert {path[-1] for path in stats} == {"mean", "var"}
    # One (mean, var) per BatchNorm (scale, bias), with matching shapes.
    assert {path[:-1] for path in stats} == {path[:-1] for path in params if path[-1] == "scale"}
    assert count(variables["batch_stats"]) == sum(
      2 * math.prod(v.shape) for p, v in params.items() if p[-1] == "scale"
    )


@pytest.mark.parametrize("name", ALL_NAMES)
def test_param_count(name):
  assert count(abstract_init(models.get(name, 10))["params"]) == PARAM_COUNTS[name]


def test_resnet20_param_breakdown():
  params = flax.traverse_util.flatten_dict(abstract_init(models.get("resnet20", 10))["params"])
  by_kind = {}
  for path, leaf in params.items():
    by_kind[path[-1]] = by_kind.get(path[-1], 0) + math.prod(leaf.shape)
  conv = by_kind["kernel"] - 64 * 10
  assert conv == 270_256
  assert by_kind["scale"] == by_kind["bias"] - 10 == 784


def test_param_counts_match_published_sizes():
  assert 0.26e6 < PARAM_COUNTS["resnet20"] < 0.28e6
  assert 14.6e6 < PARAM_COUNTS["vgg16"] < 14.8e6
  assert 11.1e6 < PARAM_COUNTS["resnet18"] < 11.3e6
  assert 2.2e6 < PARAM_COUNTS["mobilenetv2"] < 2.4e6
  assert 36.4e6 < PARAM_COUNTS["wrn28_10"] < 36.6e6  # "36.5M" (Zagoruyko 2016)
  assert 23.4e6 < PARAM_COUNTS["resnet50"] < 23.6e6


def test_wide_resnet_depth_and_dropout():
  with pytest.raises(ValueError, match="6n"):
    abstract_init(models.get("wrn22_2", 10, depth=20))
  model = models.get("wrn22_2", 10, depth=10, widen=1, dropout=0.3)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x)
  run = lambda key: model.apply(
    variables, x, train=True, mutable=["batch_stats"], rngs={"dropout": key}
  )[0]
  a, b = run(jax.random.key(2)), run(jax.random.key(3))
  assert a.shape == (4, 10) and not np.allclose(a, b)  # dropout is live
  np.testing.assert_array_equal(model.apply(variables, x), model.apply(variables, x))  # eval: none


def test_resnet32_width2_has_4x_params():
  wide = count(abstract_init(models.get("resnet32", 10, width=2))["params"])
  assert wide == 1_860_522
  assert 3.9 < wide / PARAM_COUNTS["resnet32"] < 4.0


@pytest.mark.parametrize("shape", [(2, 28, 28, 1), (2, 32, 32, 3), (2, 8, 8, 1)], ids=str)
@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_small_models_input_sizes(name, shape):
  model = models.get(name, 10)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  logits = jax.eval_shape(model.apply, abstract_init(model, x), x)
  assert logits.shape == (2, 10)


def test_mlp_hidden():
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  params = abstract_init(models.get("mlp", 10, hidden=(32, 16, 8)), x)["params"]
  assert [shape for _, shape in kernels_in_dict_order(params)] == [
      (784, 32), (32, 16), (16, 8), (8, 10),
  ]  # fmt: skip


# Parameter order: first kernel is the first layer, last one the classifier.

FIRST_KERNEL = {
  "resnet20": (3, 3, 3, 16),
  "resnet32": (3, 3, 3, 16),
  "resnet56": (3, 3, 3, 16),
  "resnet18": (3, 3, 3, 64),
  "resnet50": (3, 3, 3, 64),
  "wrn22_2": (3, 3, 3, 16),
  "wrn28_10": (3, 3, 3, 16),
  "vgg11": (3, 3, 3, 64),
  "vgg16": (3, 3, 3, 64),
  "vgg19": (3, 3, 3, 64),
  "mobilenetv2": (3, 3, 3, 32),
  "lenet5": (5, 5, 3, 6),
  "mlp": (3072, 300),
}
CLASSIFIER_IN = {
    "resnet18": 512, "resnet50": 2048, "wrn22_2": 128, "wrn28_10": 640,
    "vgg11": 512, "vgg16": 512, "vgg19": 512,
    "mobilenetv2": 1280, "lenet5": 84, "mlp": 100,
}  # fmt: skip


@pytest.mark.parametrize("name", ALL_NAMES)
def test_creation_order_first_and_last_kernel(name):
  kernels = [
    (path, s.shape)
    for path, s in models.params_in_creation_order(models.get(name, 100), CIFAR)
    if s.ndim > 1
  ]
  (first_path, first_shape), (last_path, last_shape) = kernels[0], kernels[-1]
  assert len(first_path) == 2 and first_shape == FIRST_KERNEL[name]
  assert len(last_path) == 2 and last_path[0].startswith("Dense_")
  assert last_shape == (CLASSIFIER_IN.get(name, 64), 100)


# Numerics: eager init order, initialisation, BatchNorm, dtype.


@pytest.fixture(scope="module")
def resnet20_variables():
  """Eagerly initialised ResNet-20 variables (shared: initialising costs ~5 s)."""
  return models.get("resnet20", 10).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_eager_init_order_and_initialisation(resnet20_variables):
  model = models.get("resnet20", 10)
  x = jnp.zeros((1, 32, 32, 3))
  variables = resnet20_variables

  # An eager init keeps creation order: stem conv first, classifier last.
  kernels = kernels_in_dict_order(variables["params"])
  assert kernels[0] == (("Conv_0", "kernel"), FIRST_KERNEL["resnet20"])
  assert kernels[-1] == (("Dense_0", "kernel"), (64, 10))
  assert [p for p, _ in kernels] == [
    p for p, s in models.params_in_creation_order(model, x) if s.ndim > 1
  ]

  # He normal kernels N(0, 2 / fan_in), zero biases, unit BN scales.
  params = flax.traverse_util.flatten_dict(variables["params"])
  for path, leaf in params.items():
    if path[-1] == "kernel":
      fan_in = math.prod(leaf.shape[:-1])
      if leaf.size >= 4096:
        np.testing.assert_allclose(np.std(leaf), math.sqrt(2.0 / fan_in), rtol=0.06)
        assert abs(np.mean(leaf)) < 0.1 * math.sqrt(2.0 / fan_in)
    elif path[-1] == "scale":
      np.testing.assert_array_equal(leaf, 1.0)
    else:
      assert path[-1] == "bias"
      np.testing.assert_array_equal(leaf, 0.0)
  stats = flax.traverse_util.flatten_dict(variables["batch_stats"])
  for path, leaf in stats.items():
    np.testing.assert_array_equal(leaf, 0.0 if path[-1] == "mean" else 1.0)


def test_init_gain_is_configurable():
  x = jnp.zeros((1, 28, 28, 1))
  model = models.get("mlp", 10, init_gain=0.5)
  kernel = jax.jit(model.init)(jax.random.key(0), x)["params"]["Dense_0"]["kernel"]
  np.testing.assert_allclose(np.std(kernel), math.sqrt(0.5 / 784), rtol=0.05)


def test_batchnorm_train_updates_stats_eval_is_immutable(resnet20_variables):
  model = models.get("resnet20", 10)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) + 1.0
  variables = resnet20_variables

  eval_logits = model.apply(variables, x)
  np.testing.assert_array_equal(eval_logits, model.apply(variables, x, train=False))

  train_logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  assert train_logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(train_logits)))
  # Running mean of the stem BN moves by (1 - momentum) * batch mean.
  stem_out = jax.lax.conv_general_dilated(
      x, variables["params"]["Conv_0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )  # fmt: skip
  np.testing.assert_allclose(
    updates["batch_stats"]["BatchNorm_0"]["mean"],
    0.1 * stem_out.mean(axis=(0, 1, 2)),
    rtol=1e-4,
    atol=1e-6,
  )
  changed = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), variables["batch_stats"], updates["batch_stats"]
  )
  assert all(jax.tree.leaves(changed))
  # Train mode uses batch statistics, eval mode the (initial) running ones.
  assert not np.allclose(train_logits, eval_logits)

  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(variables, x, train=True)


def test_bfloat16_compute_float32_params():
  model = models.get("resnet20", 10, dtype=jnp.bfloat16)
  variables = abstract_init(model)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  jaxpr = str(jax.make_jaxpr(model.apply)(variables, CIFAR))
  assert "conv_general_dilated" in jaxpr and "bf16" in jaxpr
  assert jax.eval_shape(model.apply, variables, CIFAR).dtype == jnp.float32


# Activations.


def test_activation_functions():
  x = jnp.linspace(-3.0, 3.0, 13)
  np.testing.assert_allclose(activations.relu(x, 0.7), jax.nn.relu(x))
  np.testing.assert_allclose(activations.swish(x), x * jax.nn.sigmoid(x), rtol=1e-6)
  act = activations.blend()
  np.testing.assert_allclose(act(x, None), jax.nn.relu(x))
  np.testing.assert_allclose(act(x, 0.0), jax.nn.relu(x))
  np.testing.assert_allclose(act(x, 1.0), jax.nn.swish(x), rtol=1e-6)
  np.testing.assert_allclose(
    act(x, jnp.float32(0.25)), 0.75 * jax.nn.relu(x) + 0.25 * jax.nn.swish(x), rtol=1e-6
  )
  identity_to_square = activations.blend(lambda v: v, jnp.square)
  np.testing.assert_allclose(identity_to_square(x, 0.5), 0.5 * x + 0.5 * x**2, rtol=1e-6)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_act_receives_act_coef_everywhere(name):
  seen = []
  coef = jnp.float32(0.3)

  def act(x, c):
    seen.append(c)
    return jax.nn.relu(x)

  act.reads_coef = True  # declares that it reads coef: the model takes act_coef
  model = models.get(name, 10, act=act)
  assert model.scalar_names == {"act_coef"}
  variables = abstract_init(model)
  seen.clear()
  jax.eval_shape(
    lambda v, x, c: modeling.apply_model(model, v, x, train=False, scalars={"act_coef": c})[0],
    variables,
    CIFAR,
    coef,
  )
  assert len(seen) == ACT_CALLS[name]
  assert all(isinstance(c, jax.core.Tracer) for c in seen)


@pytest.mark.parametrize("name", ["resnet20", "mlp"])
def test_traced_act_coef_does_not_retrace(name, resnet20_variables):
  model = models.get(name, 10, act=activations.blend())
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  if name == "resnet20":
    variables = resnet20_variables
  else:
    variables = jax.jit(model.init)(jax.random.key(0), x)
  traces = []

  @jax.jit
  def forward(v, x, c):
    traces.append(None)
    return modeling.apply_model(model, v, x, train=False, scalars={"act_coef": c})[0]

  swish_like = forward(variables, x, jnp.float32(1.0))
  relu_like = forward(variables, x, jnp.float32(0.0))
  assert len(traces) == 1
  assert not np.allclose(swish_like, relu_like)
  np.testing.assert_allclose(relu_like, model.apply(variables, x), rtol=1e-5, atol=1e-5)
