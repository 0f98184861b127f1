# Sourced by the deploy/ scripts: the project's venv first on PATH (the SuperLink and
# SuperNodes start flower-superexec, flwr-serverapp and flwr-clientapp by name), and the
# app's dependencies are never installed at run time (they come from this environment).
DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$DEPLOY_DIR")"
if [[ -x "$REPO_DIR/.venv/bin/flower-superlink" ]]; then
    export PATH="$REPO_DIR/.venv/bin:$PATH"
fi
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
