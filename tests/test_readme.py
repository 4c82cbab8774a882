"""The README's quickstart runs as written, in a fresh process as a user would run it."""

import os
import pathlib
import re
import subprocess
import sys


def test_readme_quickstart_runs(tmp_path):
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python quickstart"
    script = tmp_path / "quickstart.py"
    script.write_text(blocks[0])
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    accuracy = float(re.search(r"'test/accuracy': ([0-9.]+)", out.stdout).group(1))
    assert accuracy > 0.8
