#!/usr/bin/env bash
# `make wheel-check`: builds the wheel, installs it into a clean venv under a temporary
# directory outside the repository (with constraints/py311.txt), and runs the README
# quickstart there, from that directory, so nothing can be imported from the clone.
# $1: the Python that builds the wheel (the docs venv: build, setuptools, wheel are pinned there).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
builder=${1:?usage: tools/wheel_check.sh PYTHON_WITH_BUILD}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/efflax-wheel-check.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
quiet="--quiet --disable-pip-version-check"

"$builder" -m build --wheel --no-isolation --outdir "$tmp/dist" . > "$tmp/build.log" 2>&1 ||
  { cat "$tmp/build.log"; exit 1; }
rm -rf build  # setuptools' staging directory
wheel=$(ls "$tmp"/dist/efflax-*.whl)
echo "wheel-check: built $(basename "$wheel")"
"$builder" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
need = ["efflax/py.typed", "efflax/nnx/__init__.py", "pallas_kernels/__init__.py",
        "experiments/__init__.py"]
missing = [n for n in need if n not in names]
assert not missing, f"the wheel lacks {missing}"
assert any(n.endswith("licenses/LICENSE") for n in names), "the wheel has no LICENSE"
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(sys.argv[1]).read(meta).decode()
for field in ("License-Expression: Apache-2.0", "Classifier: Typing :: Typed",
              "Provides-Extra: gpu", "Provides-Extra: tpu", "Requires-Python: >=3.11"):
    assert field in text, f"METADATA lacks {field!r}"
assert not [n for n in names if n.startswith(("tests/", "tools/", "docs/"))], "tests/tools/docs in wheel"
print(f"wheel-check: {len(names)} files, METADATA ok")
PY

${PYTHON:-python3} -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install $quiet -c "$repo/constraints/py311.txt" "$wheel"
"$tmp/venv/bin/python" - "$repo/README.md" "$tmp/quickstart.py" <<'PY'
import re, sys
readme = open(sys.argv[1]).read()
code = re.search(r"<!-- readme-test: quickstart -->\n```python\n(.*?)```", readme, re.S).group(1)
open(sys.argv[2], "w").write(code)
PY
cd "$tmp"
"$tmp/venv/bin/python" -c "import efflax, sys; assert sys.argv[1] not in efflax.__file__, efflax.__file__; print('wheel-check: efflax from', efflax.__file__)" "$repo"
"$tmp/venv/bin/efflax" list > list.txt && grep -q mnist1d_baselines list.txt
EFFLAX_DATA_DIR="$tmp/data" MPLBACKEND=Agg "$tmp/venv/bin/python" quickstart.py | tee out.txt
grep -q "'test/accuracy'" out.txt
echo "wheel-check: the installed wheel ran the quickstart"
