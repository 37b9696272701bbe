"""The masked optimiser: exact zeros, moment resets, no retrace (SPEC §1, §4)."""

from flax import linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsejax import budgets
from sparsejax import masks
from sparsejax import optim

OPTIMIZERS = {
  "sgd": lambda: optax.sgd(0.3),
  "momentum": lambda: optax.sgd(0.05, momentum=0.9),
  "nesterov": lambda: optax.sgd(0.05, momentum=0.9, nesterov=True),
  "adam": lambda: optax.adam(1e-2),
  "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
  "chain_wd_sgd": lambda: optax.chain(
    optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9)
  ),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(
    learning_rate=0.05, momentum=0.9
  ),
}


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(3)(x)


def _problem():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (64, 8))
  y = jnp.argmax(x[:, :3] + 0.1 * jax.random.normal(k2, (64, 3)), axis=-1)
  model = _MLP()
  params = model.init(k3, x)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, loss_fn


def _random_mask(params, sparsity=0.7, seed=1):
  scores = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape), params)
  return masks.topk_mask(scores, sparsity, budget=budgets.Uniform())


def _pruned_values(params, mask):
  return np.concatenate(
    [
      np.asarray(p)[~np.asarray(m)].ravel()
      for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask))
    ]
  )


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_pruned_entries_exactly_zero_after_100_steps(name):
  params, loss_fn = _problem()  # deliberately NOT pre-masked
  mask = _random_mask(params)
  tx = optim.sparse(OPTIMIZERS[name](), mask)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  loss0 = float(loss_fn(masks.apply(params, mask)))
  for i in range(100):
    params, opt_state, _ = step(params, opt_state)
    if i == 0:
      assert np.all(_pruned_values(params, mask) == 0.0)
  pruned = _pruned_values(params, mask)
  assert pruned.size == sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mask))
  assert pruned.size > 0 and np.all(pruned == 0.0)
  # The kept weights learned something.
  assert float(loss_fn(params)) < 0.8 * loss0
  # The mask in the state is the one we gave.
  for a, b in zip(jax.tree.leaves(optim.get_mask(opt_state)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)


def test_plain_dict_and_nnx_state_params():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc1 = nnx.Linear(4, 6, rngs=rngs)
      self.fc2 = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.relu(self.fc1(x)))

  net = Net(nnx.Rngs(0))
  graphdef, state = nnx.split(net, nnx.Param)
  x = jnp.ones((5, 4))
  plain = {"w1": jnp.ones((4, 6)) * 0.3, "w2": jnp.ones((6, 2)) * -0.2}

  def nnx_loss(s):
    return jnp.sum(nnx.merge(graphdef, s)(x) ** 2)

  def dict_loss(p):
    return jnp.sum((jnp.tanh(x @ p["w1"]) @ p["w2"] - 1.0) ** 2)

  for params, loss_fn in ((state, nnx_loss), (plain, dict_loss)):
    mask = _random_mask(params, 0.5)
    tx = optim.sparse(optax.adam(0.05), mask)
    opt_state = tx.init(params)
    loss0 = float(loss_fn(masks.apply(params, mask)))
    for _ in range(30):
      grads = jax.grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
    assert np.all(_pruned_values(params, mask) == 0.0)
    assert float(loss_fn(params)) < loss0


def test_reset_moments_zeroes_only_given_positions():
  params, loss_fn = _problem()
  mask = masks.ones_like(params)
  tx = optax.chain(optax.add_decayed_weights(1e-4), optim.sparse(optax.adam(1e-2), mask))
  opt_state = tx.init(params)
  for _ in range(3):
    updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
    params = optax.apply_updates(params, updates)
  positions = _random_mask(params, 0.5, seed=7)  # True at half the entries
  new_state = optim.reset_moments(opt_state, positions)
  adam_old = optim._masked_states(opt_state)[0].inner_state[0]
  adam_new = optim._masked_states(new_state)[0].inner_state[0]
  for moment in ("mu", "nu"):
    for old, new, pos in zip(
      jax.tree.leaves(getattr(adam_old, moment)),
      jax.tree.leaves(getattr(adam_new, moment)),
      jax.tree.leaves(positions),
    ):
      old, new, pos = map(np.asarray, (old, new, pos))
      assert np.all(new[pos] == 0.0)
      np.testing.assert_array_equal(new[~pos], old[~pos])
      assert np.all(old[pos] != 0.0)  # there was something to reset
  assert int(adam_new.count) == int(adam_old.count) == 3
  for a, b in zip(jax.tree.leaves(optim.get_mask(new_state)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)


def test_reset_moments_momentum_trace_and_inject_hyperparams():
  params, loss_fn = _problem()
  tx = optim.sparse(optax.inject_hyperparams(optax.sgd)(0.1, momentum=0.9), masks.ones_like(params))
  opt_state = tx.init(params)
  updates, opt_state = tx.update(jax.grad(loss_fn)(params), opt_state, params)
  everything = jax.tree.map(lambda p: jnp.ones(p.shape, bool), params)
  cleared = optim.reset_moments(opt_state, everything)
  trace = optim._masked_states(cleared)[0].inner_state.inner_state[0].trace
  assert all(np.all(np.asarray(t) == 0) for t in jax.tree.leaves(trace))
  hp = optim._masked_states(cleared)[0].inner_state.hyperparams
  assert float(hp["learning_rate"]) == pytest.approx(0.1)


def test_changing_the_mask_never_retraces():
  params, loss_fn = _problem()
  tx = optim.sparse(optax.sgd(0.1, momentum=0.9), _random_mask(params, 0.5, 1))
  opt_state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, opt_state, new_mask, swap):
    traces.append(1)
    opt_state = jax.lax.cond(swap, lambda s: optim.set_mask(s, new_mask), lambda s: s, opt_state)
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  mask_b = _random_mask(params, 0.8, 2)
  params, opt_state = step(params, opt_state, mask_b, False)
  params, opt_state = step(params, opt_state, mask_b, True)  # swap in-step
  assert np.all(_pruned_values(params, mask_b) == 0.0)
  opt_state = optim.set_mask(opt_state, _random_mask(params, 0.9, 3))  # outside
  params, opt_state = step(params, opt_state, mask_b, False)
  assert np.all(_pruned_values(params, _random_mask(params, 0.9, 3)) == 0.0)
  assert len(traces) == 1


def test_errors():
  params, _ = _problem()
  mask = masks.ones_like(params)
  bad = jax.tree.map(lambda m: m, mask)
  bad["Dense_1"]["kernel"] = jnp.ones((16, 4), bool)
  with pytest.raises(ValueError, match=r"'Dense_1/kernel' has shape \(16, 4\)"):
    optim.sparse(optax.sgd(0.1), bad).init(params)
  opt_state = optim.sparse(optax.sgd(0.1), mask).init(params)
  with pytest.raises(ValueError, match="'Dense_1/kernel' has shape"):
    optim.set_mask(opt_state, bad)
  with pytest.raises(ValueError, match="holds no mask"):
    optim.get_mask(optax.sgd(0.1).init(params))


def test_the_mask_may_be_a_function_of_the_params_called_by_init():
  params, _ = _problem()
  mask = _random_mask(params, 0.5, 1)
  seen = []

  def mask_fn(p):
    seen.append(jax.tree.structure(p))
    return mask

  tx = optim.sparse(optax.sgd(0.1, momentum=0.9), mask_fn)
  assert not seen  # not called before init
  state = tx.init(params)
  assert seen == [jax.tree.structure(params)]
  want = optim.sparse(optax.sgd(0.1, momentum=0.9), mask).init(params)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  assert np.all(_pruned_values(new, mask) == 0.0)
  bad = lambda p: {"w": jnp.ones(3, bool)}
  with pytest.raises(ValueError, match="structure"):
    optim.sparse(optax.sgd(0.1), bad).init(params)
