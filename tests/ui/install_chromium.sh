#!/usr/bin/env bash
# Install headless Chromium and chromedriver from Debian for the browser tests (tests/ui/test_browser.py)
# and the README screenshot (tests/ui/make_screenshot.py). Does nothing when both are present.
# Needs root (or sudo); Debian/Ubuntu only. Usage: tests/ui/install_chromium.sh
set -euo pipefail

if command -v chromium >/dev/null 2>&1 && [ -x /usr/bin/chromedriver ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_chromium: no apt-get here; install Chromium and chromedriver (at /usr/bin/chromedriver) yourself" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO="sudo"
    else
        echo "install_chromium: run as root (or install sudo): apt-get install chromium chromium-driver" >&2
        exit 1
    fi
fi
echo "install_chromium: installing chromium, chromium-driver and a font from Debian..."
$SUDO apt-get update -q
# Recommends pull in desktop services a headless test never uses; a font is needed for legible screenshots.
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    chromium chromium-driver fonts-dejavu-core
chromium --version
/usr/bin/chromedriver --version
