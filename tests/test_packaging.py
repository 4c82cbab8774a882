"""The wheel's metadata: the accelerator extras pin the plugin versions the checks ran."""

import pathlib
import re
import tomllib

ROOT = pathlib.Path(__file__).parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / name).read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            package, version = line.split("==", 1)
            pins[package.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _extra(name: str) -> list[tuple[str, str, str]]:
    """(package, version, marker) of every `pkg[extra]==version; marker` entry."""
    out = []
    for requirement in PYPROJECT["project"]["optional-dependencies"][name]:
        m = re.fullmatch(r"([\w-]+)(?:\[[\w,]+\])?==([\w.]+)(?:; (.*))?", requirement)
        assert m, f"{name} extra: {requirement!r} is not pinned with =="
        out.append((m.group(1).lower(), m.group(2), m.group(3) or ""))
    return out


def test_gpu_extra_matches_gpu_check_and_the_py311_pins():
    gpucheck, py311, py312 = _pins("gpucheck.txt"), _pins("py311.txt"), _pins("py312.txt")
    pinned = {marker: version for package, version, marker in _extra("gpu")}
    # .venv-gpucheck is py312.txt's jax with the CUDA plugin of the same version.
    assert pinned["python_version >= '3.12'"] == gpucheck["jax-cuda13-plugin"] == py312["jax"]
    assert pinned["python_version < '3.12'"] == py311["jax"]


def test_tpu_extra_matches_the_xla_venv():
    xla = _pins("xla.txt")
    for package, version, _ in _extra("tpu"):
        assert xla[package] == version, (package, version, xla.get(package))


def test_metadata_and_typing_marker():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file()
    assert "Typing :: Typed" in project["classifiers"]
    assert (ROOT / "efflax" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["efflax"]
    # `efflax list` / `efflax reproduce` import the experiments package: it ships.
    assert "experiments*" in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
