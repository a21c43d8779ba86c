#!/usr/bin/env bash
# Install what tests/test_server_browser.py needs, idempotently: Debian's chromium and the playwright Python
# package. Playwright drives /usr/bin/chromium; no browser build is downloaded (never `playwright install`).
set -euo pipefail
PYTHON="${PYTHON:-python3}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if command -v chromium >/dev/null 2>&1; then
  echo "chromium: $(chromium --version 2>/dev/null || echo present)"
else
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium
fi

if "$PYTHON" -c "import playwright.sync_api" >/dev/null 2>&1; then
  echo "playwright: $("$PYTHON" -m pip show playwright 2>/dev/null | sed -n 's/^Version: //p')"
else
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$PYTHON" -m pip install -q "playwright>=1.40"
fi
echo "browser test ready: $PYTHON -m pytest tests/test_server_browser.py"
