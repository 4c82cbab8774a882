#!/bin/sh
# Prints a command that runs Python >= 3.12 (the newest JAX needs it), or fails with a message.
# Tried in order: python3.12 / python3.13 on PATH, then pyenv-installed versions.
for cmd in python3.12 python3.13 python3.14; do
  if command -v "$cmd" >/dev/null 2>&1 && "$cmd" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
    echo "$cmd"
    exit 0
  fi
done
if command -v pyenv >/dev/null 2>&1; then
  for version in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[2-9]\.[0-9]+$' | sort -V); do
    echo "env PYENV_VERSION=$version python${version%.*}"
    exit 0
  done
fi
echo "no Python >= 3.12 found (install one, or set PYTHON_LATEST)" >&2
exit 1
