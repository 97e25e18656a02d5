#!/usr/bin/env bash
# Install headless Chromium and its chromedriver for the browser test (tests/test_web_page.py).
# Idempotent: does nothing when a browser and chromedriver are found. Installs with apt-get when run as
# root; otherwise says how to install and exits 0, and the browser test skips itself (a failure under
# XRAY_REQUIRE_ALL_TESTS=1, as in CI).
set -euo pipefail

# A browser named by CHROME_BIN or found on PATH under any usual name (GitHub's runner ships google-chrome),
# and chromedriver named by CHROMEDRIVER or found on PATH: the same lookup as tests/test_web_page.py.
browser="${CHROME_BIN:-}"
for name in chromium chromium-browser google-chrome google-chrome-stable; do
    [ -n "$browser" ] && break
    browser="$(command -v "$name" || true)"
done
driver="${CHROMEDRIVER:-$(command -v chromedriver || true)}"
if [ -n "$browser" ] && [ -n "$driver" ]; then
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
install_browser: no Chromium/Chrome and chromedriver found (CHROME_BIN, CHROMEDRIVER or PATH), and this
is not root with apt-get, so nothing was installed and the browser test (tests/test_web_page.py) will
be skipped (or fail, with XRAY_REQUIRE_ALL_TESTS=1).
To run it, install both, e.g. on Debian/Ubuntu:
    sudo apt-get install -y chromium chromium-driver
or on macOS:
    brew install --cask chromium && brew install --cask chromedriver
MESSAGE
exit 0
