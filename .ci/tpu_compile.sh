#!/usr/bin/env bash
# Compiles the Pallas TPU kernels ahead of time for TPU topologies (v5e, v5p) on a CPU host.
# Usage: .ci/tpu_compile.sh [VENV_DIR]   (default /tmp/venv-tpu; reused when already built)
# A separate venv because jax[tpu] pulls libtpu (~1.5 GB); the main test venv stays CPU-only.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/venv-tpu}"
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
JAX_VERSION="0.10.2"
start=$(date +%s)

if ! "$VENV/bin/python" -c "import jax, libtpu, flax, pytest; assert jax.__version__ == '$JAX_VERSION'" \
    2>/dev/null; then
  echo "== building $VENV (jax[tpu]==$JAX_VERSION)"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q "jax[tpu]==$JAX_VERSION" flax optax chex ml-collections \
    numpy pytest
else
  echo "== reusing $VENV"
fi
# The notebook executor, for colabs/pod_planning.ipynb (tests/tpu_compile/test_pod_planning_notebook.py).
"$VENV/bin/python" -m pip install -q nbclient nbformat ipykernel matplotlib
# The repo itself, without its (CPU, data) dependencies: the kernels and models need only jax+flax.
"$VENV/bin/python" -m pip install -q --no-deps -e .
ready=$(date +%s)
echo "== environment ready in $((ready - start)) s"

export VITJAX_TPU_COMPILE_JSON="${VITJAX_TPU_COMPILE_JSON:-$VENV/tpu_compile.json}"
# -s shows one TPU-COMPILE line per compile (seconds, memory_analysis bytes); libtpu's warnings
# about TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES are expected on a CPU host.
set +e
"$VENV/bin/python" -m pytest -q -s -p no:cacheprovider --durations=0 tests/tpu_compile 2>&1 \
  | grep -v -e "TPU_ACCELERATOR_TYPE\|TPU_WORKER_HOSTNAMES\|TPU_SKIP_MDS_QUERY\|libtpu_init_utils" \
            -e "Source Location Trace\|^E0000\|^W0000\|^$"
status=${PIPESTATUS[0]}
set -e
end=$(date +%s)
echo "== tests ran in $((end - ready)) s; total $((end - start)) s; results in $VITJAX_TPU_COMPILE_JSON"
exit "$status"
