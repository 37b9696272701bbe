"""Optimiser and schedules from a run config; per-step scalar schedules.

* :func:`make_optimizer` and :func:`lr_schedule`: SGD with momentum
  (optionally Nesterov) and PyTorch-style weight decay on all params, with
  multistep, cosine or constant learning rates and linear warmup, from optax.
  :func:`sparsejax.train.fit` builds its optimiser with :func:`make_optimizer`
  unless it is given one.
* :func:`steps_per_epoch`: the one place that says how many optimiser steps an
  epoch has (the last partial batch is dropped).
* :func:`hold_then_ramp`: a piecewise-linear ``optax.Schedule`` (hold a value,
  then ramp linearly to another), e.g. for the per-step scalars of
  :func:`sparsejax.train.fit` (an activation-blend coefficient, a
  label-smoothing factor).

Config fields are read as attributes or keys (:func:`config_value`), so a
``dict`` and an ``ml_collections.ConfigDict`` both work.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from sparsejax import data as data_lib


def config_value(config, name: str, default: Any = None) -> Any:
  """``config.name`` or ``config[name]``; ``default`` when missing or ``None``."""
  value = config.get(name, default) if isinstance(config, Mapping) or hasattr(
      config, "get") else getattr(config, name, default)
  return default if value is None else value


def steps_per_epoch(n_train: int, batch_size: int) -> int:
  """Optimiser steps per epoch: ``n_train // batch_size`` (full batches only).

  Raises:
    ValueError: a batch size below 1 or larger than the training set.
  """
  n = data_lib.num_batches(int(n_train), int(batch_size), drop_remainder=True)
  if n == 0:
    raise ValueError(f"batch_size={batch_size} is larger than the training set "
                     f"({n_train} examples)")
  return n


def hold_then_ramp(start: float, end: float, hold_steps: int,
                   ramp_steps: int) -> optax.Schedule:
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
    raise ValueError(f"hold_steps and ramp_steps must be >= 0, got {hold_steps} "
                     f"and {ramp_steps}")
  start, end = float(start), float(end)
  if ramp_steps == 0:
    return optax.join_schedules(
        [optax.constant_schedule(start), optax.constant_schedule(end)],
        [hold_steps + 1])
  return optax.join_schedules(
      [optax.constant_schedule(start),
       optax.linear_schedule(start, end, ramp_steps)], [hold_steps])


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


def lr_schedule(config, steps_per_epoch: int) -> optax.Schedule:
  """The learning-rate schedule of ``config``, in optimiser steps.

  Config fields (attributes or keys):

  * ``learning_rate``: peak learning rate.
  * ``lr_schedule``: ``"multistep"`` (× ``lr_decay_factor`` at each of
    ``lr_decay_epochs``, see :func:`decay_boundaries`), ``"cosine"`` (to
    ``learning_rate * lr_end_factor`` at the end of training) or
    ``"constant"``.
  * ``warmup_epochs``: linear warmup from 0 over this many epochs (may be
    fractional); default 0. Decay epochs stay absolute.
  * ``num_epochs``: length of training.

  Multistep decays happen on epoch boundaries like PyTorch's ``MultiStepLR``
  stepped once per epoch (step ``t`` uses the rate of epoch ``t //
  steps_per_epoch``); warmup and cosine change the rate every step.
  """
  lr = float(config_value(config, "learning_rate"))
  kind = config_value(config, "lr_schedule", "constant")
  num_epochs = int(config_value(config, "num_epochs"))
  total = num_epochs * steps_per_epoch
  warmup = int(round(float(config_value(config, "warmup_epochs", 0.0)) * steps_per_epoch))
  if not 0 <= warmup <= total:
    raise ValueError(f"warmup_epochs gives {warmup} steps, outside [0, {total}]")

  if kind == "constant":
    main = optax.constant_schedule(lr)
  elif kind == "multistep":
    factor = float(config_value(config, "lr_decay_factor", 0.1))
    epochs = decay_boundaries(config_value(config, "lr_decay_epochs", ()), num_epochs)
    boundaries = [e * steps_per_epoch for e in epochs]
    # Decays that fall inside the warmup apply from its end on.
    start = lr * factor ** sum(b <= warmup for b in boundaries)
    main = optax.piecewise_constant_schedule(
        start, {b - warmup: factor for b in boundaries if b > warmup})
  elif kind == "cosine":
    end = lr * float(config_value(config, "lr_end_factor", 0.0))
    main = optax.cosine_decay_schedule(lr, max(total - warmup, 1),
                                       alpha=end / lr if lr else 0.0)
  else:
    raise ValueError(f"lr_schedule must be 'multistep', 'cosine' or 'constant', "
                     f"got {kind!r}")
  if warmup == 0:
    return main
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, steps_per_epoch: int,
                   schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """SGD with momentum and weight decay on every parameter, as in PyTorch.

  ``optax.chain(add_decayed_weights(weight_decay), sgd(schedule, momentum,
  nesterov))`` is PyTorch's ``SGD(weight_decay=wd, momentum=m,
  nesterov=...)`` exactly: the decay is added to the gradient before the
  momentum. With a mask (:func:`sparsejax.optim.masked`) pruned entries get
  neither gradient nor decay.

  Config fields: ``momentum`` (default 0.9), ``nesterov`` (default False),
  ``weight_decay`` (default 0) and those of :func:`lr_schedule`.

  Args:
    config: the run config.
    steps_per_epoch: optimiser steps per epoch.
    schedule: the learning rate to use instead of :func:`lr_schedule` of the
      config (e.g. Sup-tickets' cyclic rate after the DST phase,
      :meth:`sparsejax.suptickets.Plan.learning_rate`).
  """
  if schedule is None:
    schedule = lr_schedule(config, steps_per_epoch)
  momentum = float(config_value(config, "momentum", 0.9))
  parts = []
  wd = float(config_value(config, "weight_decay", 0.0))
  if wd:
    parts.append(optax.add_decayed_weights(wd))
  parts.append(optax.sgd(schedule, momentum=momentum or None,
                         nesterov=bool(config_value(config, "nesterov", False))))
  return optax.chain(*parts)


def scalar_values(scalars: Mapping[str, optax.Schedule] | None,
                  step: jax.Array) -> dict[str, jax.Array]:
  """``{name: float32 schedule(step)}``: the per-step scalars of ``step``
  (``step`` may be traced)."""
  return {name: jnp.asarray(fn(step), jnp.float32)
          for name, fn in (scalars or {}).items()}
