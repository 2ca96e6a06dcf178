#!/usr/bin/env bash
# saelib's two entry points, for a fresh machine or an existing environment:
#   bash run.sh all    run every notebook in order (default profile) -> executed/, reports/, results/
#   bash run.sh test   pytest + every notebook through nbmake with SAELIB_PROFILE=smoke, then the
#                      model notebooks again on a random-weight GPT-2 checkpoint folder, then the
#                      test suite and notebook 00 again under TransformerLens 4 (./.venv-tl4)
#   bash run.sh all --model NAME_OR_FOLDER   every notebook on another model
# With a conda or virtual environment active that already has saelib, that one is used;
# otherwise ./.venv is created (torch==2.13.0 first, so pip does not pull a CUDA build
# where a local CPU wheel exists) and the package is installed into it with its dev extras
# and TransformerLens 3.9, the line SAELens 6 (used by the interop tests) still needs.
# saelib itself runs on TransformerLens 3.9 and 4.x (pyproject admits both).
set -euo pipefail
cd "$(dirname "$0")"

# SAELens is used by the tests only (interop with its folders and its evaluation). It pins
# TransformerLens and torch in ways a CPU install cannot follow, so it goes in without its
# dependencies; the two small ones it imports at load time are named here.
SAELENS_PKGS=("sae-lens==6.54.12" "simple-parsing==0.1.9" "docstring-parser==0.18.0")
TL3="transformer-lens>=3.9,<4"
TL4="transformer-lens>=4,<5"

# make_venv DIR TRANSFORMER_LENS_SPEC: a virtual environment with saelib (editable, dev extras)
make_venv() {
  python3 -m venv "$1"
  "$1/bin/python" -m pip install -q --upgrade pip
  "$1/bin/python" -m pip install -q "torch==2.13.0"
  "$1/bin/python" -m pip install -q -e ".[dev]" "$2"
}

ensure_env() {
  if [ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ] && python -c "import saelib, pytest, nbmake" 2>/dev/null; then
    PY=python
  else
    if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import saelib, pytest, nbmake" 2>/dev/null; then
      echo "[saelib] creating .venv (one-off, a few minutes)"
      make_venv .venv "$TL3"
    fi
    PY=.venv/bin/python
  fi
  if [ "${1:-}" = with-saelens ] && ! "$PY" -c "import sae_lens" 2>/dev/null; then
    echo "[saelib] installing ${SAELENS_PKGS[*]} (no dependencies) for the interop tests"
    "$PY" -m pip install -q --no-deps "${SAELENS_PKGS[@]}"
  fi
}

cmd="${1:-}"
shift || true
case "$cmd" in
  all)
    ensure_env
    exec "$PY" -m saelib run-notebooks "$@"
    ;;
  test)
    ensure_env with-saelens
    export SAELIB_PROFILE=smoke
    # No front end will answer widgets here: interactive views render their static form
    # (nbclient can stall on output drawn into ipywidgets.Output while a cell runs).
    export SAELIB_HEADLESS=1
    # Generous per-cell limit: a notebook cell that takes 30 s alone can take minutes on a
    # machine shared with other jobs (small-op torch code slows down sharply there).
    # --durations: the log then says what each smoke notebook and the slowest tests take.
    "$PY" -m pytest tests --nbmake --nbmake-timeout=1800 --durations=25 notebooks "$@"
    # The real-model path, offline: the model notebooks again on a random-weight GPT-2
    # checkpoint folder (written by transformers, loaded as a download is), selected by the
    # one switch every notebook reads. Its artifacts live apart from the embedded model's.
    stand_in=build/stand_in
    rm -rf "$stand_in"
    "$PY" -m saelib zoo checkpoint "$stand_in/gpt2" --architecture gpt2 >/dev/null
    SAELIB_MODEL="$PWD/$stand_in/gpt2" SAELIB_ARTIFACTS="$PWD/$stand_in/artifacts" SAELIB_RESULTS="$PWD/$stand_in/results" \
      "$PY" -m pytest --nbmake --nbmake-timeout=1800 -q \
      notebooks/00_quickstart.ipynb notebooks/02_harvest_activations.ipynb notebooks/03_train_saes.ipynb \
      notebooks/04_evaluate_saes.ipynb notebooks/05_feature_dashboards.ipynb notebooks/07_ioi_feature_replacement.ipynb
    # TransformerLens 4 (no HookedTransformer; saelib loads every model as a TransformerBridge):
    # the test suite and the quickstart again in a second environment. SAELens needs
    # TransformerLens <4, so its interop tests are left out there.
    if [ ! -x .venv-tl4/bin/python ] || ! .venv-tl4/bin/python -c "import saelib, pytest, nbmake, importlib.metadata as m, sys
sys.exit(int(m.version('transformer-lens').split('.')[0]) < 4)" 2>/dev/null; then
      echo "[saelib] creating .venv-tl4 with $TL4 (one-off, a few minutes)"
      make_venv .venv-tl4 "$TL4"
    fi
    tl4=build/tl4
    rm -rf "$tl4"
    SAELIB_ALLOW_NO_SAELENS=1 SAELIB_ARTIFACTS="$PWD/$tl4/artifacts" SAELIB_RESULTS="$PWD/$tl4/results" \
      .venv-tl4/bin/python -m pytest --nbmake --nbmake-timeout=1800 -q -p no:cacheprovider \
      --deselect tests/test_browser.py tests notebooks/00_quickstart.ipynb
    ;;
  *)
    echo "usage: bash run.sh all|test [extra args]" >&2
    exit 2
    ;;
esac
