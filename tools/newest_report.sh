#!/usr/bin/env bash
# `make test-newest` (and `make pins` with --write-pins): builds throw-away venvs from the newest
# releases the registry serves, then reports what moved against the pins in constraints/:
# versions, failing tests, and gpu-check violations (spills, shared memory). It never fails the
# caller (exit 0): it is a drift report, not a gate. With --write-pins, and only when the suite
# and gpu-check pass, it rewrites constraints/py311.txt, py312.txt and gpucheck.txt from them.
set -uo pipefail
cd "$(dirname "$0")/.."
write_pins=0
[ "${1:-}" = "--write-pins" ] && write_pins=1
PYTHON_DEFAULT=${PYTHON:-python3}
PYTHON_LATEST=${PYTHON_LATEST:-$(tools/find_python.sh)}
out=${NEWEST_DIR:-.newest}
mkdir -p "$out"
quiet="--quiet --disable-pip-version-check"
report="$out/REPORT.md"
echo "# Newest-releases drift report ($(date -u +%F))" > "$report"

diff_pins() {  # $1 pins file, $2 freeze file
  python3 - "$1" "$2" <<'PY'
import sys
def read(path):
    out = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith(("#", "-")) and "==" in line:
            name, version = line.split("==", 1)
            out[name.lower().replace("_", "-")] = version
    return out
pinned, newest = read(sys.argv[1]), read(sys.argv[2])
moved = [f"  {n}: {pinned[n]} -> {newest[n]}" for n in sorted(pinned) if n in newest and pinned[n] != newest[n]]
added = [f"  {n}: (new) {newest[n]}" for n in sorted(set(newest) - set(pinned))]
print("\n".join(moved + added) if moved or added else "  (no version moved)")
PY
}

run_set() {  # $1 name, $2 python, $3 pins file
  local name=$1 python=$2 pins=$3 venv="$out/venv-$1"
  echo "=== $name: building $venv from the newest releases"
  rm -rf "$venv"
  $python -m venv "$venv"
  "$venv/bin/python" -m pip install $quiet -e '.[dev]' jax jaxlib flax optax orbax-checkpoint --upgrade
  "$venv/bin/python" -m pip freeze --exclude-editable > "$out/$name.freeze.txt"
  {
    echo; echo "## $name ($($venv/bin/python --version 2>&1))"; echo '```'
    echo "versions moved against $pins:"; diff_pins "$pins" "$out/$name.freeze.txt"
  } >> "$report"
  MPLBACKEND=Agg "$venv/bin/python" -m pytest -q -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider \
    > "$out/$name.pytest.txt" 2>&1
  local rc=$?
  echo "tests: $(tail -n 1 "$out/$name.pytest.txt")" >> "$report"
  grep -E '^(FAILED|ERROR) ' "$out/$name.pytest.txt" | sed 's/^/  /' >> "$report"
  echo '```' >> "$report"
  return $rc
}

status=0
run_set py311 "$PYTHON_DEFAULT" constraints/py311.txt || status=1
run_set py312 "$PYTHON_LATEST" constraints/py312.txt || status=1

echo "=== gpu-check on the newest jax and CUDA plugin"
venv="$out/venv-gpucheck"
rm -rf "$venv"; $PYTHON_LATEST -m venv "$venv"
"$venv/bin/python" -m pip install $quiet --upgrade jax
version=$("$venv/bin/python" -c 'import jax; print(jax.__version__)')
{ echo; echo "## gpu-check (jax $version)"; echo '```'; } >> "$report"
if "$venv/bin/python" -m pip install $quiet --no-deps "jax-cuda13-plugin==$version" "jax-cuda13-pjrt==$version"; then
  "$venv/bin/python" -m pip freeze > "$out/gpucheck.freeze.txt"
  JAX_PLATFORMS=cpu "$venv/bin/python" tools/gpu_check.py --jobs "${GPU_CHECK_JOBS:-2}" --no-write \
    > "$out/gpucheck.txt" 2>&1 || status=1
  grep -iE 'violation|spill|fail|compiles' "$out/gpucheck.txt" | tail -n 20 >> "$report"
else
  echo "no jax-cuda13-plugin $version on the registry" >> "$report"; status=1
fi
echo '```' >> "$report"

if [ "$write_pins" = 1 ]; then
  if [ "$status" = 0 ]; then
    for name in py311 py312; do
      { head -n 2 "constraints/$name.txt"; cat "$out/$name.freeze.txt"; } > "constraints/$name.txt.new"
      mv "constraints/$name.txt.new" "constraints/$name.txt"
    done
    plugin=$(grep -iE '^jax-cuda13-(plugin|pjrt)==' "$out/gpucheck.freeze.txt")
    { head -n 2 constraints/gpucheck.txt; echo "$plugin"; } > constraints/gpucheck.txt.new
    mv constraints/gpucheck.txt.new constraints/gpucheck.txt
    echo "pins rewritten: review git diff constraints/, then run .ci/run" | tee -a "$report"
  else
    echo "pins NOT rewritten: the newest set does not pass (see above)" | tee -a "$report"
  fi
fi
echo; cat "$report"
exit 0
