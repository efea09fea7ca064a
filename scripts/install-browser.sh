#!/usr/bin/env sh
# Install Debian's Chromium for the headless browser test (tests/serving/test_e2e_browser.py).
# Playwright drives it with executable_path=/usr/bin/chromium; `playwright install` is not used.
# Exit codes: 0 installed (or already present), 3 cannot install here (not root, or no apt-get).
set -eu

if [ -x /usr/bin/chromium ]; then
    echo "chromium already installed: /usr/bin/chromium"
    exit 0
fi
if [ "$(id -u)" != "0" ]; then
    echo "cannot install chromium: not root (run: sudo apt-get install -y chromium)" >&2
    exit 3
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "cannot install chromium: apt-get not found (install Chromium at /usr/bin/chromium by hand)" >&2
    exit 3
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium fonts-liberation
test -x /usr/bin/chromium
echo "installed $(/usr/bin/chromium --version 2>/dev/null || echo chromium)"
