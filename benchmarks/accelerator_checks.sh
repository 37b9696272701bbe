#!/usr/bin/env bash
# The accelerator figures the README's Benchmarks table still lacks, in one run.
#
# Usage (from the repository root, on a machine with a GPU or TPU and sparsejax
# installed with the matching jax, e.g. `pip install -e . "jax[cuda12]"`):
#   bash benchmarks/accelerator_checks.sh [LOG_DIR]
#
# Prints the device, then runs step_overhead.py (masked / dense step),
# scoring_cost.py (SNIP, GraSP and SynFlow cost) and tost_step.py (ToST's ghost
# step / the plain one), each on JAX's default backend; every script's output
# is also written to LOG_DIR (default benchmarks/logs). Expected to take a few
# minutes on one GPU, most of it compilation (not yet measured). Stops at the
# first failure.
set -euo pipefail
logs=${1:-"$(dirname "$0")/logs"}
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python -c 'import jax; d = jax.devices()[0]; print("jax", jax.__version__, "|", d.platform, d.device_kind, "x", jax.device_count())' \
  | tee "$logs/device.log"
if python -c 'import jax, sys; sys.exit(jax.default_backend() != "cpu")'; then
  echo "accelerator_checks.sh: JAX sees no accelerator (default backend cpu)" >&2
  exit 1
fi
for script in step_overhead.py scoring_cost.py tost_step.py; do
  echo "== $script"
  python "benchmarks/$script" 2>&1 | tee "$logs/${script%.py}.log"
done
