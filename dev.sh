#!/usr/bin/env bash
# Set up a development environment from a fresh clone and run something in it.
#
#   ./dev.sh example [args]       train the flagship example (examples/train_digits.py)
#   ./dev.sh test [pytest args]   run the whole test suite
#   ./dev.sh lint                 ruff: lint (ruff check) and formatting (ruff format --check)
#   ./dev.sh typecheck            pyright over metoryx/ and examples/ (config: pyproject.toml)
#   ./dev.sh hooks                install the git hooks of .pre-commit-config.yaml (ruff, pyright)
#
# Needs only Python >= 3.11 with pip. The interpreter is $PYTHON (default: python3); its venv
# lives in .venv-pythonX.Y in the repository and is created on first use. Re-running is quick:
# pip skips what is already installed.
set -euo pipefail

usage() {
    echo "usage: ./dev.sh example [args] | test [pytest args] | lint | typecheck | hooks" >&2
    exit 2
}

[[ $# -ge 1 ]] || usage
command="$1"
shift
case "$command" in
    example) extra="examples" ;;
    test | lint | typecheck) extra="test" ;; # the test extra carries the pinned ruff and pyright
    hooks) extra="dev" ;;
    *) usage ;;
esac

cd "$(dirname "${BASH_SOURCE[0]}")"

python="${PYTHON:-python3}"
if ! version="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"; then
    echo "dev.sh: cannot run '$python'; set PYTHON to a Python >= 3.11 interpreter." >&2
    exit 1
fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "dev.sh: '$python' is Python $version; metoryx needs Python >= 3.11." >&2
    exit 1
fi

venv=".venv-python$version"
if [[ ! -x "$venv/bin/python" ]]; then
    echo "dev.sh: creating $venv with $python"
    "$python" -m venv "$venv"
fi
"$venv/bin/python" -m pip install -qq --disable-pip-version-check -e ".[$extra]"

"$venv/bin/python" -c 'import sys, jax; print(f"dev.sh: Python {sys.version.split()[0]} ({sys.executable}), JAX {jax.__version__}")'

case "$command" in
    example) exec "$venv/bin/python" examples/train_digits.py --out out/digits "$@" ;;
    test) exec "$venv/bin/python" -m pytest -n 2 "$@" ;;
    lint)
        # Both run, so that one report shows every problem; the fix is `ruff check --fix` and
        # `ruff format` on the files named.
        status=0
        "$venv/bin/ruff" check . || status=1
        "$venv/bin/ruff" format --check . || status=1
        exit "$status"
        ;;
    # The venv's bin/ first on PATH, and its Python named: pyright resolves JAX's types there.
    typecheck) PATH="$PWD/$venv/bin:$PATH" exec "$venv/bin/pyright" --pythonpath "$venv/bin/python" ;;
    hooks) exec "$venv/bin/pre-commit" install ;;
esac
