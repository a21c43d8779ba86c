#!/usr/bin/env bash
# Install what tests/test_serve_ray.py and tests/test_voice_storage.py need, idempotently: Ray Serve and
# psycopg 3 (the package's ray extra), boto3 and moto for the S3 store, all with torch held at its pin, and
# Debian's PostgreSQL server binaries. The tests start their own PostgreSQL and Ray in temporary
# directories; any cluster Debian's package starts on installation is stopped again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

if "$PYTHON" -c "import ray.serve, psycopg, boto3, moto" >/dev/null 2>&1; then
  echo "ray: $("$PYTHON" -c 'import ray; print(ray.__version__)'), psycopg: present"
else
  "$PYTHON" -m pip install -q -e ".[ray,s3]" "moto[s3]>=5" "torch==2.13.0"
fi

if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "postgresql: $(ls -d /usr/lib/postgresql/*/ | head -1)"
else
  $SUDO apt-get update
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends postgresql
  $SUDO service postgresql stop >/dev/null 2>&1 || true
fi
echo "scale tests ready: $PYTHON -m pytest tests/test_voice_storage.py tests/test_serve_ray.py"
