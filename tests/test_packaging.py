"""The installed package: one import namespace (`r1kit`), a console command, and recipes that run as scripts."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = ("policy", "rollout", "rewards", "grpo", "sft", "recipes")
TOP_LEVEL_IMPORT = re.compile(rf"^\s*(from|import) ({'|'.join(PACKAGE_FOLDERS)})\b", re.MULTILINE)


def _run(*command: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip install .` would install, built from a copy of the source tree."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "outputs", "build", "*.egg-info", "__pycache__", ".venv", "tests", "benchmarks", "docs"))  # fmt: skip
    built = _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(work), str(source)
    )
    assert built.returncode == 0, built.stderr
    (path,) = work.glob("r1kit-*.whl")
    return path


def test_the_wheel_installs_one_import_package_with_every_subpackage_and_config(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == {"r1kit"}
    for folder in PACKAGE_FOLDERS:
        for init in (ROOT / folder).rglob("__init__.py"):
            assert f"r1kit/{init.relative_to(ROOT).as_posix()}" in names
    assert "r1kit/recipes/configs/grpo_math.yaml" in names and "r1kit/recipes/accelerate/ddp.yaml" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "r1kit = r1kit.cli:main" in entry_points


def test_only_r1kit_is_importable_from_the_wheel(wheel, tmp_path):
    unpacked = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(unpacked)
    probe = (
        "import importlib.util, r1kit.recipes.arguments as a; "
        f"print(a.__file__); print([n for n in {PACKAGE_FOLDERS!r} if importlib.util.find_spec(n)])"
    )
    result = _run(sys.executable, "-c", probe, cwd=tmp_path, env={"PYTHONPATH": str(unpacked), "PATH": ""})
    assert result.returncode == 0, result.stderr
    module_file, importable = result.stdout.splitlines()
    assert module_file.startswith(str(unpacked)) and importable == "[]"


def test_no_module_imports_the_folders_as_top_level_packages():
    sources = [
        p for folder in (*PACKAGE_FOLDERS, "r1kit", "tests", "benchmarks") for p in (ROOT / folder).rglob("*.py")
    ]
    offenders = [str(p.relative_to(ROOT)) for p in sources if TOP_LEVEL_IMPORT.search(p.read_text())]
    assert offenders == []


def test_the_console_command_lists_and_runs_its_subcommands():
    command = shutil.which("r1kit", path=str(Path(sys.executable).parent))
    assert command is not None, "the r1kit console script is not installed (pip install -e .)"
    listing = _run(command, "--help")
    assert listing.returncode == 0
    for name in ("grpo", "sft", "sft-then-grpo", "r1-pipeline", "eval", "serve-rollout", "fetch-model"):
        assert re.search(rf"^\s+{name}\s", listing.stdout, re.MULTILINE), name
    grpo = _run(command, "grpo", "--help")
    assert grpo.returncode == 0 and grpo.stdout.startswith("usage: r1kit grpo")
    assert "--config FILE" in grpo.stdout and "--push_to_hub" in grpo.stdout
    unknown = _run(command, "train")
    assert unknown.returncode == 1 and "unknown command 'train'" in unknown.stderr


@pytest.mark.parametrize("recipe", ["grpo_math", "sft_then_grpo", "sft", "r1_pipeline"])
def test_recipes_run_as_scripts_as_the_readme_shows(recipe):
    result = _run(sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--help", cwd=ROOT)
    assert result.returncode == 0 and "--config" in result.stdout


def test_serve_rollout_without_its_key_says_which_variable_to_set():
    command = shutil.which("r1kit", path=str(Path(sys.executable).parent))
    result = _run(command, "serve-rollout", "--model", "m", env={"PATH": "", "HOME": "/nonexistent"})
    assert result.returncode == 1 and "set R1KIT_ROLLOUT_AUTHKEY" in result.stderr
