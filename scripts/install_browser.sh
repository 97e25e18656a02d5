#!/usr/bin/env bash
# Install headless Chromium and its chromedriver for the browser test (tests/test_web_page.py).
# Idempotent: does nothing when both are already on PATH. Installs with apt-get when run as root;
# otherwise says how to install and exits 0, and the browser test skips itself.
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "install_browser: installing chromium and chromium-driver with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    exit 0
fi

cat >&2 <<'MESSAGE'
install_browser: chromium and chromedriver are not on PATH, and this is not root with apt-get,
so nothing was installed and the browser test (tests/test_web_page.py) will be skipped.
To run it, install both, e.g. on Debian/Ubuntu:
    sudo apt-get install -y chromium chromium-driver
or on macOS:
    brew install --cask chromium && brew install --cask chromedriver
MESSAGE
exit 0
