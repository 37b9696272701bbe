"""The optimiser and its schedules; per-step scalar schedules.

* :func:`make_optimizer` and :func:`lr_schedule`: SGD with momentum
  (optionally Nesterov) and PyTorch-style weight decay on all params, with
  multistep, cosine or constant learning rates and linear warmup, from optax.
* :func:`steps_per_epoch`: the one place that says how many optimiser steps an
  epoch has (the last partial batch is dropped).
* :func:`hold_then_ramp`: a piecewise-linear ``optax.Schedule`` (hold a value,
  then ramp linearly to another), e.g. for the per-step scalars of
  :func:`sparsejax.train.fit` (an activation-blend coefficient, a
  label-smoothing factor).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import optax

from sparsejax import data as data_lib


def steps_per_epoch(n_train: int, batch_size: int) -> int:
  """Optimiser steps per epoch: ``n_train // batch_size`` (full batches only).

  Raises:
    ValueError: a batch size below 1 or larger than the training set.
  """
  n = data_lib.num_batches(int(n_train), int(batch_size), drop_remainder=True)
  if n == 0:
    raise ValueError(
      f"batch_size={batch_size} is larger than the training set ({n_train} examples)"
    )
  return n


def hold_then_ramp(start: float, end: float, hold_steps: int, ramp_steps: int) -> optax.Schedule:
  """``start`` for ``hold_steps`` steps, then linear to ``end`` over ``ramp_steps``.

  Step ``t`` gets ``start`` for ``t <= hold_steps``, ``start + (end - start) *
  (t - hold_steps) / ramp_steps`` while ramping and ``end`` from ``hold_steps +
  ramp_steps`` on (``ramp_steps = 0``: a jump to ``end`` after
  ``hold_steps``). Built from ``optax.join_schedules``,
  ``optax.constant_schedule`` and ``optax.linear_schedule``; ``t`` may be
  traced (one compilation for every value).

  Example: ToST's activation blend, Swish for 5 epochs then annealed to ReLU
  over 10: ``hold_then_ramp(1.0, 0.0, 5 * spe, 10 * spe)``.

  Raises:
    ValueError: a negative number of steps.
  """
  hold_steps, ramp_steps = int(hold_steps), int(ramp_steps)
  if hold_steps < 0 or ramp_steps < 0:
    raise ValueError(f"hold_steps and ramp_steps must be >= 0, got {hold_steps} and {ramp_steps}")
  start, end = float(start), float(end)
  if ramp_steps == 0:
    return optax.join_schedules(
      [optax.constant_schedule(start), optax.constant_schedule(end)], [hold_steps + 1]
    )
  return optax.join_schedules(
    [optax.constant_schedule(start), optax.linear_schedule(start, end, ramp_steps)], [hold_steps]
  )


def decay_boundaries(decay_epochs: Iterable[float], num_epochs: int) -> list[int]:
  """Epochs at which a multistep schedule decays.

  A value ``v >= 1`` is an epoch; ``0 < v < 1`` is a fraction of
  ``num_epochs``, truncated like the GraSP reference
  (``int(v * num_epochs)``). Returns sorted epochs in ``(0, num_epochs)``.

  Raises:
    ValueError: a value that is not positive.
  """
  epochs = []
  for v in decay_epochs:
    v = float(v)
    if v <= 0:
      raise ValueError(f"lr decay epochs must be positive, got {v}")
    epochs.append(int(v * num_epochs) if v < 1 else int(v))
  return sorted(e for e in set(epochs) if 0 < e < num_epochs)


def lr_schedule(
  learning_rate: float,
  *,
  num_epochs: int,
  steps_per_epoch: int,
  kind: str = "constant",
  warmup_epochs: float = 0.0,
  decay_factor: float = 0.1,
  decay_epochs: Iterable[float] = (),
  end_factor: float = 0.0,
) -> optax.Schedule:
  """A learning-rate schedule in optimiser steps.

  Multistep decays happen on epoch boundaries like PyTorch's ``MultiStepLR``
  stepped once per epoch (step ``t`` uses the rate of epoch ``t //
  steps_per_epoch``); warmup and cosine change the rate every step.

  Args:
    learning_rate: the peak learning rate.
    num_epochs: the length of training.
    steps_per_epoch: optimiser steps per epoch (:func:`steps_per_epoch`).
    kind: ``"multistep"`` (× ``decay_factor`` at each of ``decay_epochs``,
      see :func:`decay_boundaries`), ``"cosine"`` (to ``learning_rate *
      end_factor`` at the end of training) or ``"constant"`` (default).
    warmup_epochs: linear warmup from 0 over this many epochs (may be
      fractional); default 0. Decay epochs stay absolute.
    decay_factor, decay_epochs: of ``"multistep"`` (default 0.1, none).
    end_factor: of ``"cosine"`` (default 0).

  Example:

    >>> from sparsejax import schedules
    >>> lr = schedules.lr_schedule(0.1, num_epochs=4, steps_per_epoch=10,
    ...                            kind="multistep", decay_epochs=(2,))
    >>> round(float(lr(19)), 6), round(float(lr(20)), 6)
    (0.1, 0.01)

  Raises:
    ValueError: an unknown ``kind``, or a warmup longer than training.
  """
  lr = float(learning_rate)
  num_epochs = int(num_epochs)
  total = num_epochs * int(steps_per_epoch)
  warmup = int(round(float(warmup_epochs) * steps_per_epoch))
  if not 0 <= warmup <= total:
    raise ValueError(f"warmup_epochs gives {warmup} steps, outside [0, {total}]")

  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "multistep":
    factor = float(decay_factor)
    epochs = decay_boundaries(decay_epochs, num_epochs)
    boundaries = [e * steps_per_epoch for e in epochs]
    # Decays that fall inside the warmup apply from its end on.
    start = lr * factor ** sum(b <= warmup for b in boundaries)
    main = optax.piecewise_constant_schedule(
      start, {b - warmup: factor for b in boundaries if b > warmup}
    )
  elif kind == "cosine":
    end = lr * float(end_factor)
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=end / lr if lr else 0.0)
  else:
    raise ValueError(f"lr_schedule must be 'multistep', 'cosine' or 'constant', got {kind!r}")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(
  learning_rate: float | optax.Schedule,
  *,
  momentum: float = 0.9,
  nesterov: bool = False,
  weight_decay: float = 0.0,
) -> optax.GradientTransformation:
  """SGD with momentum and weight decay on every parameter, as in PyTorch.

  ``optax.chain(add_decayed_weights(weight_decay), inject_hyperparams(sgd)(
  learning_rate, momentum, nesterov))`` is PyTorch's ``SGD(weight_decay=wd,
  momentum=m, nesterov=...)`` exactly: the decay is added to the gradient
  before the momentum. With a mask (:func:`sparsejax.optim.sparse`) pruned
  entries get neither gradient nor decay. The learning rate is injected
  (``optax.inject_hyperparams``): the optimiser state holds the rate of its
  last update, which :func:`sparsejax.train.fit` logs
  (:attr:`sparsejax.state.TrainState.learning_rate`).

  Args:
    learning_rate: a float or a schedule of the optimiser step, e.g.
      :func:`lr_schedule` or Sup-tickets' cyclic rate after the DST phase
      (:meth:`sparsejax.suptickets.Plan.learning_rate`).
    momentum: default 0.9; 0 for plain SGD.
    nesterov: Nesterov momentum (default False).
    weight_decay: PyTorch-style L2 decay added to the gradient (default 0).

  Example:

    >>> import jax.numpy as jnp
    >>> from sparsejax import optim, schedules
    >>> tx = schedules.make_optimizer(0.1, weight_decay=5e-4)
    >>> lr = optim.find_hyperparam(tx.init({"w": jnp.ones(2)}), "learning_rate")
    >>> round(float(lr), 6)
    0.1
  """
  momentum = float(momentum)
  nesterov = bool(nesterov)
  parts = []
  wd = float(weight_decay)
  if wd:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(
    optax.inject_hyperparams(
      lambda learning_rate: optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov)
    )(learning_rate=learning_rate)
  )
  return optax.chain(*parts)


def scalar_values(
  scalars: Mapping[str, optax.Schedule] | None, step: jax.Array
) -> dict[str, jax.Array]:
  """``{name: float32 schedule(step)}``: the per-step scalars of ``step``
  (``step`` may be traced)."""
  return {name: jnp.asarray(fn(step), jnp.float32) for name, fn in (scalars or {}).items()}
