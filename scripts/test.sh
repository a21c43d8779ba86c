#!/usr/bin/env bash
# Install the package with its test extras, lint, and run the default test suite (< 10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[serve,dev]"
# Headless Chromium + playwright for the page test (Debian package; no browser download).
bash scripts/setup_browser_test.sh || echo "browser test set-up failed: tests/test_server_browser.py will skip"
# Ray Serve, psycopg and Debian's PostgreSQL for the scale-out tests (they skip, saying why, without them).
PYTHON=python bash scripts/setup_scale_test.sh || echo "scale test set-up failed: tests/test_serve_ray.py will skip"
ruff check .
ruff format --check .
python -m pytest
