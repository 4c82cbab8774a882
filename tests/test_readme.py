"""Every Python snippet of the README runs as written, in a fresh process as a user would run it.

Each ```python block is preceded by a marker saying how a reader uses it:
``<!-- readme-test: quickstart -->`` runs alone; ``replaces-train-step`` is the quickstart with
its ``train_step = ...`` line replaced by the block (as the README says); ``standalone`` runs
alone. A block without a marker fails the test, so a new snippet cannot go untested.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest

README = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"(?:<!-- readme-test: ([\w-]+) -->\n)?```python\n(.*?)```", README, flags=re.S)
TRAIN_STEP_LINE = re.compile(r"^train_step = make_train_step\(cross_entropy_loss_fn\(\)\).*$", re.M)


def _quickstart() -> str:
    (code,) = [code for kind, code in BLOCKS if kind == "quickstart"]
    return code


def _scripts() -> list[tuple[str, str]]:
    scripts = []
    for i, (kind, code) in enumerate(BLOCKS):
        if kind == "replaces-train-step":
            code = TRAIN_STEP_LINE.sub(lambda _, code=code: code, _quickstart(), count=1)
        scripts.append((f"{i}-{kind}", code))
    return scripts


def _run(tmp_path, code: str) -> str:
    script = tmp_path / "snippet.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_every_block_has_a_marker():
    assert BLOCKS, "README has no python snippet"
    kinds = [kind for kind, _ in BLOCKS]
    assert all(kinds), f"a README python block has no readme-test marker: {kinds}"
    assert set(kinds) <= {"quickstart", "replaces-train-step", "standalone"}, kinds
    assert kinds.count("quickstart") == 1
    assert TRAIN_STEP_LINE.search(_quickstart())


@pytest.mark.parametrize(("name", "code"), _scripts(), ids=[name for name, _ in _scripts()])
def test_readme_snippet_runs(name, code, tmp_path):
    stdout = _run(tmp_path, code)
    if "classification_eval_fn" in code:
        accuracy = float(re.search(r"'test/accuracy': ([0-9.]+)", stdout).group(1))
        assert accuracy > 0.8, stdout
