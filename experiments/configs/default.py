"""Default configuration of ``experiments.train`` (every field documented).

Run::

  python -m experiments.train --config experiments/configs/default.py \
      --workdir runs/resnet20_c10 --config.pruner=magnitude --config.sparsity=0.9

``--config.<field>=None`` resets an optional field (e.g. ``data.train_subset``
of a preset) from the command line.

Layout: ``config.data`` (the dataset), ``config.model`` (the network),
``config.optimizer`` (SGD and its learning-rate schedule), ``config.train``
(the loop: epochs, batch, seed, evaluation, checkpoints, output), and the
method fields at the top level (pruning, DST, Sup-tickets, ToST).

Presets built on this file: ``synflow_cifar.py`` and ``grasp_cifar.py`` (the
SPEC §8 reference protocols), ``digits.py`` (offline, CPU-sized),
``prune_at_init.py`` (``experiments.prune_at_init``) and the grids of
``experiments.sweep``, ``sweep_synflow_paper.py`` and ``sweep_cpu_small.py``.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  """Returns the default training configuration."""
  config = ml_collections.ConfigDict()

  # --- Data -----------------------------------------------------------------
  # One of sparsejax.data.DATASET_NAMES: cifar10, cifar100, tiny_imagenet, digits.
  config.data = ml_collections.ConfigDict()
  config.data.name = "cifar10"
  # Directory holding the dataset (see sparsejax.data.load); None searches
  # tensorflow-datasets, $SPARSEJAX_DATA_DIR, ~/.sparsejax/data.
  config.data.dir = config_dict.placeholder(str)
  # Keep only this many (class-balanced) training examples; None = all.
  config.data.train_subset = config_dict.placeholder(int)
  # Random crop (pad 4) + horizontal flip; None = the dataset's standard.
  config.data.augment = config_dict.placeholder(bool)

  # --- Model ----------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  # Any name of sparsejax.models.names().
  config.model.name = "resnet20"
  # Extra constructor fields, e.g. width=2 for ResNets, hidden=(300, 100) for
  # the MLP (set them in a config file: the dict is locked on the command line).
  config.model.kwargs = ml_collections.ConfigDict()
  # The model's computation dtype: "float32", or "bfloat16" for mixed
  # precision (convolutions, matrix products and activations in bfloat16;
  # params, optimiser state, batch-norm statistics, logits and loss float32;
  # masks are scored in it too). For accelerators: on CPU bfloat16 is slower,
  # and one ResNet-20 training gradient (batch 128, He init) was 14-19% off
  # the float32 one in global norm, cosine 0.98-0.99, on a 2-core AMD EPYC
  # (README "Mixed precision"; benchmarks/bf16_gradient.py). Not
  # config.model.kwargs.dtype.
  config.model.dtype = "float32"

  # --- Pruning (static mask chosen at initialisation) -------------------------
  # "dense", or a method of sparsejax.scores.prune_at_init: "random",
  # "magnitude", "snip", "grasp", "synflow" or "iterative_<method>"; or
  # "ticket": the mask of a lottery ticket (the "LTH mask") in mask_path.
  config.pruner = "dense"
  # With pruner="ticket": a ticket directory written by experiments.lottery
  # (WORKDIR/ticket), read with sparsejax.lottery.load_ticket.
  config.mask_path = config_dict.placeholder(str)
  # Fraction of the prunable weights set to zero (0.9 keeps 10%). With
  # pruner="ticket" the ticket's sparsity: None takes it, another value (more
  # than 1e-3 away) is an error; config.json records the ticket's.
  config.sparsity = 0.9
  # "global", "uniform", "erk", "er" or an N:M pattern such as "2:4" (N kept
  # in every M consecutive weights along the input dimension; set sparsity to
  # 1 - N/M and keep layers whose input dimension M does not divide dense,
  # e.g. prunable="keep_first" for the RGB stem), or "cfi" / "cfi-erk" (constant
  # fan-in: every output unit keeps the same number of inputs, layer sparsities
  # uniform / ERK; sparsejax.budgets.ConstantFanIn). See sparsejax.budgets.
  config.budget = "global"
  # Which weights are prunable: "kernels" (all conv/dense kernels), "keep_first",
  # "keep_classifier" or "keep_first_and_classifier" (those stay dense).
  config.prunable = "kernels"
  # SNIP and GraSP score on this many training examples per class (class
  # balanced, drawn with the run's seed; the reference is 10).
  config.score_samples_per_class = 10
  # Pruning rounds, each to density d^(k/n); None = the method's default
  # (100 for SynFlow and iterative_*, one-shot otherwise).
  config.pruning_rounds = config_dict.placeholder(int)
  # Batch-norm mode while scoring, "train" or "eval"; None = the SPEC §2
  # default of the method (SNIP eval, GraSP train, SynFlow eval).
  config.score_bn_mode = config_dict.placeholder(str)
  # GraSP divides the logits by this temperature.
  config.grasp_temperature = 200.0
  # SynFlow's computation dtype: "float32" or "float64" (deep networks can
  # underflow in float32).
  config.synflow_dtype = "float32"

  # --- Dynamic sparse training (SPEC §4) --------------------------------------
  # "none" (the pruner's mask stays fixed), "set", "rigl", "gmp" (gradual
  # magnitude pruning) or "granet". SET and RigL start from the pruner's mask
  # at `sparsity` (the reference: pruner="random", budget="erk"); GMP and
  # GraNet need pruner="dense" and prune from dst_initial_sparsity (0: dense;
  # else a random mask under `budget`) to `sparsity`.
  config.dst = "none"
  # Mask update every this many steps (ΔT).
  config.dst_update_every = 100
  # Drop fraction α in [0, 1] (RigL/SET 0.3; GraNet's regrowth 0.5), "cosine"
  # (α/2)(1 + cos(π t / T_end)) or "constant".
  config.dst_alpha = 0.3
  config.dst_drop_schedule = "cosine"
  # T_end: no drop-and-regrow after this fraction of training (RigL: 0.75).
  config.dst_end = 0.75
  # Skip the weight update on mask-update steps (the reference RigL code).
  config.dst_skip_update = True
  # GMP/GraNet: starting sparsity and the (start, end) of the cubic schedule,
  # in epochs (>= 1) or fractions of training (< 1), 0 <= start < end <=
  # num_epochs.
  config.dst_initial_sparsity = 0.0
  config.dst_prune_epochs = (0.0, 0.5)

  # --- Sup-tickets (SPEC §6; experiments.suptickets) ---------------------------
  # With a DST method (config.dst): the method trains with its normal
  # schedules (learning rate and mask updates) compressed into the first
  # num_epochs - sup_cycles * sup_cycle_epochs epochs; then sup_cycles cycles
  # of sup_cycle_epochs epochs, periodic mask updates off, one drop-and-regrow
  # of sup_fraction of each layer at each cycle start (magnitude drop, gradient
  # growth) and a cyclic learning rate sup_lr1 -> sup_lr2 -> sup_lr1 per
  # iteration ("triangular" or "cosine"). At each cycle end the weights are
  # superposed (cumulative mean, or an EMA with factor sup_ema), re-pruned
  # globally to the target count, given recomputed batch-norm statistics
  # (sup_bn_variance "pooled" or "average"; batches of sup_bn_batch_size,
  # None = batch_size) and evaluated.
  config.suptickets = False
  config.sup_cycles = 3
  config.sup_cycle_epochs = 8
  config.sup_lr1 = 0.001
  config.sup_lr2 = 0.005
  config.sup_lr_shape = "triangular"
  config.sup_fraction = 0.5
  config.sup_ema = config_dict.placeholder(float)
  config.sup_bn_variance = "pooled"
  config.sup_bn_batch_size = config_dict.placeholder(int)

  # --- Optimisation (config.optimizer; schedules.make_optimizer, lr_schedule) --
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  # PyTorch-style decay on every parameter; None = the SPEC §8 value for the
  # model family: 5e-4 for VGG, 1e-4 otherwise.
  config.optimizer.weight_decay = config_dict.placeholder(float)
  # "multistep", "cosine" or "constant".
  config.optimizer.schedule = "multistep"
  # Multistep decay points: values >= 1 are epochs, values in (0, 1) fractions
  # of num_epochs. Pass on the command line as e.g.
  # --config.optimizer.decay_epochs="(60,120)".
  config.optimizer.decay_epochs = (0.5, 0.75)
  config.optimizer.decay_factor = 0.1
  # Cosine schedule: final lr = learning_rate * end_factor.
  config.optimizer.end_factor = 0.0
  # Linear warmup from 0 (may be fractional).
  config.optimizer.warmup_epochs = 0.0
  # Label smoothing of the cross-entropy loss (optax's a/C formula).
  config.optimizer.label_smoothing = 0.0
  # Activation blend (ToST's ghost soft neurons): None keeps the model's ReLU;
  # (start, end, hold_epochs, ramp_epochs) uses activations.blend() (ReLU at 0,
  # Swish at 1) with act_coef = start for hold_epochs, then linear to end over
  # ramp_epochs, e.g. --config.act_coef_schedule="(1.0, 0.0, 5, 10)".
  config.act_coef_schedule = config_dict.placeholder(tuple)

  # --- ToST (SPEC §7, sparsejax.tost) ----------------------------------------
  # A preset of sparsejax.tost.PRESETS: "none" (the baseline), "ghost" (soft
  # neurons, ghost skips and label smoothing annealed away, LRsI), "always_on"
  # (the released code: on for the whole run, LRsI), or one technique alone:
  # "soft_neurons", "ghost_skips", "label_smoothing", "lrsi". The mask is
  # scored on the plain model; ghost params are never pruned.
  config.tost = "none"
  # Schedules (start, end, hold, stop) in fractions of training (tost.Ramp:
  # start until hold, linear to end at stop); None = the preset's. Setting one
  # switches its technique on. beta of the ReLU/Swish blend, gamma of the ghost
  # skips, alpha of the label smoothing (target 1 - a, a / (C - 1) elsewhere).
  config.tost_soft_neurons = config_dict.placeholder(tuple)
  config.tost_ghost_skips = config_dict.placeholder(tuple)
  config.tost_label_smoothing = config_dict.placeholder(tuple)
  # LRsI settings (fields of sparsejax.tost.LRsI: steps, learning_rate, eta,
  # grad_norm_bound, normalize_step, grad_clip, weight_floor, bias_floor,
  # batch_size) overriding the released recipe's, when the preset has LRsI.
  config.tost_lrsi = ml_collections.ConfigDict()

  # --- Training loop (config.train; train.fit's arguments and FitOptions) ------
  config.train = ml_collections.ConfigDict()
  config.train.num_epochs = 160
  config.train.batch_size = 128
  config.train.seed = 0
  config.train.eval_batch_size = 500
  config.train.eval_every_epochs = 1
  # Checkpoints in WORKDIR/checkpoints: every checkpoint_every_epochs epochs
  # (the last epoch and SIGTERM always save), the last max_to_keep kept; a
  # rerun resumes from the latest readable one.
  config.train.max_to_keep = 3
  config.train.checkpoint_every_epochs = 1
  config.train.async_checkpointing = True
  # When training finishes, write WORKDIR/model.sparse: the trained params as
  # kept values + bit-packed mask and the batch-norm statistics as they are
  # (sparsejax.sparse_io), and print its size against the dense arrays and the
  # last checkpoint (results.json "sparse_file"); experiments.lottery writes
  # WORKDIR/level_L/model.sparse per level. "zlib" also deflates the file.
  config.train.save_sparse = False
  config.train.save_sparse_compression = "none"
  # tqdm progress bar (only shown on a terminal).
  config.train.progress_bar = True
  # Every this many steps: update the bar's running loss and check the loss is
  # finite (one host sync).
  config.train.log_every_steps = 50
  config.train.tensorboard = True
  # Devices of the data-parallel mesh; None = all.
  config.train.num_devices = config_dict.placeholder(int)
  # Call jax.distributed.initialize() first (multi-host runs).
  config.train.distributed = False
  return config


def sgd_protocol(
  config: ml_collections.ConfigDict, *, nesterov: bool, lr_decay_epochs: tuple
) -> ml_collections.ConfigDict:
  """Sets the SPEC §8 CIFAR protocol on ``config`` (for ``config.model.name``).

  SGD with momentum 0.9 (Nesterov if ``nesterov``), lr 0.1, batch 128, 160
  epochs, lr x0.1 at ``lr_decay_epochs`` (epochs, or fractions of training),
  weight decay 5e-4 for VGG and 1e-4 otherwise; global budget.
  """
  config.train.num_epochs = 160
  config.train.batch_size = 128
  config.optimizer.learning_rate = 0.1
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = nesterov
  config.optimizer.schedule = "multistep"
  config.optimizer.decay_epochs = tuple(lr_decay_epochs)
  config.optimizer.decay_factor = 0.1
  config.optimizer.weight_decay = 5e-4 if config.model.name.startswith("vgg") else 1e-4
  config.budget = "global"
  return config
