#!/usr/bin/env bash
# Prints the path of a Python >= 3.12 interpreter, or fails with a clear message.
# Looks at $PYTHON, python3.12, python3.13, python3, then pyenv's installed versions.
set -u
ok() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' 2>/dev/null; }
candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
for name in python3.12 python3.13 python3; do
  p=$(command -v "$name" 2>/dev/null) && candidates+=("$p")
done
root=$(pyenv root 2>/dev/null || echo "${PYENV_ROOT:-$HOME/.pyenv}")
for v in $(ls -1 "$root/versions" 2>/dev/null | sort -V); do
  candidates+=("$root/versions/$v/bin/python3")
done
for c in "${candidates[@]}"; do
  if [ -x "$c" ] || command -v "$c" >/dev/null 2>&1; then
    if ok "$c"; then echo "$c"; exit 0; fi
  fi
done
echo "error: hq-jax needs Python >= 3.12 (JAX 0.11+ requires it) and none was found." >&2
echo "       Looked at \$PYTHON, python3.12, python3.13, python3 and $root/versions/*." >&2
echo "       Install one (e.g. 'pyenv install 3.12') or run: make PYTHON=/path/to/python3.12 test" >&2
exit 1
