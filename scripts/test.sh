#!/usr/bin/env bash
# Install the package with its test extras, lint, and run the default test suite (< 10 min on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[serve,dev]"
ruff check .
ruff format --check .
python -m pytest
