#!/usr/bin/env bash
# Start the xray service (FastAPI, `python app.py`) in the foreground.
#
# The container runs this (Dockerfile CMD); on an EC2 host run it from a systemd
# unit or a shell, from any folder. Configuration comes from the environment:
#   XRAY_STORAGE_URI  s3://bucket/prefix, or a local folder. Unset: a local store
#                     in ./store, with a warning (nothing there survives the host).
#   PORT              port to listen on; app.py's default is 8000, the image sets 8080.
#   XRAY_API_TOKEN    bearer token that GET /train requires.
#   XRAY_CONFIG       config yaml, default configs/config.yaml.
#   XRAY_HOME         where relative paths in settings and configs start; default: this folder.
#   XRAY_MODEL_POLL_SECONDS  how often the app checks storage for a new production
#                     model (default 30); every XRAY_* setting is in xray/settings.py.
#   PYTHON            interpreter to use; default: the repository's .venv when there
#                     is one (an EC2 checkout after `make test`), else python (or
#                     python3) on PATH.
#   AWS_*             the usual AWS settings; on App Runner or EC2 prefer the
#                     instance role over keys.
# The app starts even when storage is down: /health (liveness) answers at once, /ready
# answers 200 once a model is loaded.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

log() {
  printf '%s start_up: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2
}

if [[ -z "${XRAY_STORAGE_URI:-}" ]]; then
  XRAY_STORAGE_URI="$root/store"
  mkdir -p "$XRAY_STORAGE_URI"
  log "WARNING: XRAY_STORAGE_URI is not set; using the local store $XRAY_STORAGE_URI." \
    "Models and data there are lost with this host or container; set XRAY_STORAGE_URI=s3://bucket/prefix in production."
fi
export XRAY_STORAGE_URI

if [[ -z "${XRAY_API_TOKEN:-}" ]]; then
  log "WARNING: XRAY_API_TOKEN is not set; GET /train cannot authenticate callers."
fi

export XRAY_CONFIG="${XRAY_CONFIG:-configs/config.yaml}"
# A relative XRAY_CONFIG is looked up under XRAY_HOME (default: here), then here (xray.config.find_config).
if [[ ! -f "$XRAY_CONFIG" && ! -f "${XRAY_HOME:-$root}/$XRAY_CONFIG" ]]; then
  log "ERROR: config file $XRAY_CONFIG not found (from ${XRAY_HOME:-$root} or $root); set XRAY_CONFIG."
  exit 1
fi

python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
  elif command -v python >/dev/null 2>&1; then
    python="python"
  else
    python="python3"
  fi
fi

log "starting app.py on port ${PORT:-8000} (python: $python, storage: $XRAY_STORAGE_URI, config: $XRAY_CONFIG)"
exec "$python" app.py
