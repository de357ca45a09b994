"""Packaging: licence, one version, the declared dependency ranges hold in the environment the suite runs in."""

import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement


ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_license_file_and_single_version_source():
    import trl_nft

    project = PYPROJECT["project"]
    assert "Apache License" in (ROOT / "LICENSE").read_text() and project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert "version" not in project and project["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "trl_nft.__version__"}
    assert trl_nft.__version__


def test_the_suite_runs_inside_the_declared_ranges():
    """Every dependency (and the test, quality and shapes extras) is installed at a version pyproject allows, so the
    floors are versions the suite has run against."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    requirements = [*PYPROJECT["project"]["dependencies"], *extras["shapes"], *extras["test"], *extras["quality"]]
    for line in requirements:
        req = Requirement(line)
        if req.name == "trl_nft":
            continue
        installed = version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} outside {req.specifier}"
    trl = next(Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("trl"))
    assert any(spec.operator == "<" for spec in trl.specifier)  # private trl helpers are imported


def test_trainer_imports_without_the_shapes_extra():
    """scipy and matplotlib belong to the shapes world only."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['scipy'] = None; sys.modules['matplotlib'] = None\n"
        "from trl_nft import DiffusionNFTTrainer, DiffusionNFTConfig\n"
        "import trl_nft.cli, trl_nft.hub, trl_nft.model_card\n"
        "from trl_nft.rewards import resolve_reward\n"
        "try:\n    resolve_reward('shapes')\nexcept ImportError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'pip install "trl_nft[shapes]"' in proc.stdout
