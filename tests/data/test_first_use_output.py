"""First use of a local dataset says what happens (generated here) and nothing misleading."""

import os
import subprocess
import sys


def test_first_use_prints_one_honest_line(tmp_path):
    env = {**os.environ, "EFFLAX_DATA_DIR": str(tmp_path / "data")}
    code = "import efflax; efflax.data.load('mnist1d', 'train', batch_size=128); print('loaded')"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout + out.stderr
    assert "efflax: preparing mnist1d/default" in out.stdout
    assert "nothing is downloaded" in out.stdout
    for misleading in ("Downloading", "downloaded and prepared", "WARNING:absl", "dataset_info"):
        assert misleading not in text, text
    assert "Generating" not in out.stderr  # no TFDS progress bars
    # The second use is silent.
    again = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert again.stdout.strip() == "loaded", again.stdout + again.stderr
