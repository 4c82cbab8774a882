"""The documentation's runnable parts outside the doctests (those run in `make docs`): the
multi-host example script as two processes, and the docs' links to pages that exist."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).parent.parent
DOCS = ROOT / "docs"


def test_multihost_example_runs_as_two_processes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["EFFLAX_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    script = DOCS / "examples" / "multihost_train.py"
    out = subprocess.run(
        [sys.executable, "-m", "efflax.cli", "launch", "-n", "2", "--cpu-devices", "2"]
        + ["--timeout", "500", "--", sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,  # checkpoints and metrics land here, as for a user
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "trained 155 steps on 2 processes" in out.stdout
    assert (tmp_path / "checkpoints").is_dir() and (tmp_path / "metrics.jsonl").is_file()


def test_every_method_page_is_in_the_toctree_and_has_a_doctest_and_a_measurement():
    index = (DOCS / "methods" / "index.md").read_text()
    pages = sorted(p.stem for p in (DOCS / "methods").glob("*.md") if p.stem != "index")
    assert len(pages) >= 15
    for page in pages:
        assert f"\n{page}\n" in index, f"{page} is not in methods/index.md's toctree"
        text = (DOCS / "methods" / f"{page}.md").read_text()
        assert "```{doctest}" in text, f"{page} has no runnable example"
        assert "**Paper**" in text and "**Measured**" in text, page


def test_relative_links_point_at_files():
    for path in [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *DOCS.rglob("*.md")]:
        if "_build" in path.parts:
            continue
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.relative_to(ROOT)} links {target}"
