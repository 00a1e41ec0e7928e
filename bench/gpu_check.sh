#!/usr/bin/env bash
# The GPU check (issue 22, item 7): a ~1B Llama-3 and a ~1B Gemma-2 built here in bf16, through prefopt's own
# generation backend, reward scorer, pair strategies, batching layouts, DPO / SimPO losses and PPO steps, against
# TRL's DPOTrainer; per stage tokens/s, peak GPU memory and log-prob parity between layouts. bench/gpu_check.py
# says what each section does. Under 8 minutes on one H100/H200 (its own budget: 420 s, then a hard stop at 470 s).
#
#   bash bench/gpu_check.sh           # one CUDA GPU; JSON to $OUT/gpu_check.json (else runs/gpu_check.json)
#   bash bench/gpu_check.sh --tiny    # CPU, hidden 64, 2 layers, a few pairs, fp32 (tests/test_gpu_check.py)
#
# TRL is not on the GPU machine (nor datasets, which TRL needs, nor datasets' dill and multiprocess). They travel as
# wheels in .whl/ (git-ignored), fetched HERE, in the repo root, for Python 3.12 manylinux (about 1.8 MB):
#
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#
# (TRL's other needs, accelerate, jinja2, pandas, psutil, pyarrow, pyyaml, huggingface_hub, and datasets' fsspec,
# xxhash, tqdm are on that machine already; the script prints the versions it found.) Then one call of the device
# tool `run`, with carry [".whl"] and timeout_s 600, runs the device README's install line and this script:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu_check.sh
#
# This script also runs that install line itself when .whl/ holds wheels and trl does not import, so
# `bash bench/gpu_check.sh` alone is enough. Without wheels the TRL comparison is skipped with a printed line.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
TINY=0
for arg in "$@"; do [ "$arg" = "--tiny" ] && TINY=1; done

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ "$TINY" = 1 ]; then export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"; fi

# TRL and its missing needs from the carried wheels (the device README's install line).
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import trl" >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "gpu_check: installing .whl/*.whl failed; the TRL comparison will be skipped"
fi

# prefopt is src/ installed as `prefopt`; where it is not installed (the GPU machine), a link makes it importable.
if ! "$PY" -c "import prefopt" >/dev/null 2>&1; then
  LINKS="$(mktemp -d)"
  ln -s "$REPO/src" "$LINKS/prefopt"
  export PYTHONPATH="$LINKS${PYTHONPATH:+:$PYTHONPATH}"
fi

LIMIT=470
[ "$TINY" = 1 ] && LIMIT=170
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  timeout --signal=INT --kill-after=10 "$LIMIT" "$PY" bench/gpu_check.py "$@" 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
exec timeout --signal=INT --kill-after=10 "$LIMIT" "$PY" bench/gpu_check.py "$@"
