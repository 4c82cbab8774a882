"""Sphinx configuration: MyST Markdown pages, an API reference from the docstrings (autodoc +
napoleon), and every ```{doctest}``` example run by ``sphinx-build -b doctest`` (make docs)."""

import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")
# One CPU device: with forced host devices (--xla_force_host_platform_device_count), XLA's CPU
# all-reduce rendezvous hung inside sphinx's doctest runner (not in a plain process); the
# multi-device cases run in the test suite (tests/nnx, tests/test_sharding.py) instead.
sys.path.insert(0, os.path.abspath(".."))

project = "efflax"
author = "The efflax authors"
copyright = "2026, The efflax authors"
release = version = "0.1.0"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
exclude_patterns = ["_build"]
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3

# The API reference: members as the public modules re-export them, signatures without
# type-hint noise, Google-style "Args:" sections.
autodoc_default_options = {"members": True, "imported-members": True, "undoc-members": False}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields: a dataclass field is not described twice
autosummary_generate = False

# Only the examples written as ```{doctest}``` blocks run: a ">>>" inside a docstring is
# sometimes a sketch of a call inside a larger program (a training loop), shown, not run.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import os
os.environ.setdefault("MPLBACKEND", "Agg")
"""

html_theme = "alabaster"
html_title = "efflax"
html_theme_options = {"description": "2022's efficient-training methods for JAX, Flax and optax"}
# No network at build time: nothing from intersphinx.
nitpicky = False
suppress_warnings = ["myst.header"]


def _rst_safe(app, what, name, obj, options, lines):
    """Docstrings are written for reading in code; two plain-text idioms in them are RST
    markup: ``*args, **kwargs:`` as one "Args:" entry and ``|a / b|`` (an absolute value)."""
    import re

    for i, line in enumerate(lines):
        line = re.sub(r"^(\s*\*\w+, )\*\*(\w+:)", r"\1\\*\\*\2", line)
        lines[i] = re.sub(r"(?<![`\\])\|(\w+ / \w+)\|", r"``|\1|``", line)


def setup(app):
    app.connect("autodoc-process-docstring", _rst_safe, priority=400)
