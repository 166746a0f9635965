"""What the three wheels carry: every file of their source package (py.typed, data files such as the
chat page), consistent versions and pins between our packages, and declared lower bounds.

Builds each package's sdist, then its wheel from that sdist, as a release does (without build
isolation, to stay fast; `nox -s wheels` builds isolated and installs the result).
"""

from __future__ import annotations

import ast
import email.parser
import io
import os
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from contextlib import redirect_stdout
from dataclasses import dataclass
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import package -> the folder under packages/ that builds it
PACKAGES = {"chat_core": "chat_core", "chat_distributed": "chat_distributed", "chat_cli": "chat_cli"}
OUR_DISTRIBUTIONS = {"chat-core", "chat-distributed", "chat-core-cli"}


@dataclass(frozen=True)
class Built:
    import_name: str
    source_dir: str  # packages/<name>/src/<import_name>
    wheel_files: frozenset[str]
    sdist_files: frozenset[str]  # paths inside the sdist, without its top folder
    metadata: email.message.Message  # the wheel's METADATA
    entry_points: str


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    out = tmp_path_factory.mktemp("dist")
    packages: dict[str, Built] = {}
    for import_name, folder in PACKAGES.items():
        package_dir = os.path.join(ROOT, "packages", folder)
        before = set(os.listdir(out))
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), package_dir],
            check=True,
            capture_output=True,
        )
        made = set(os.listdir(out)) - before
        (wheel_name,) = [name for name in made if name.endswith(".whl")]
        (sdist_name,) = [name for name in made if name.endswith(".tar.gz")]
        with zipfile.ZipFile(out / wheel_name) as wheel:
            wheel_files = frozenset(wheel.namelist())
            dist_info = next(name.split("/")[0] for name in wheel_files if name.endswith(".dist-info/METADATA"))
            meta = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
            entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode() if f"{dist_info}/entry_points.txt" in wheel_files else ""
        with tarfile.open(out / sdist_name) as sdist:
            sdist_files = frozenset(name.split("/", 1)[1] for name in sdist.getnames() if "/" in name)
        packages[import_name] = Built(
            import_name, os.path.join(package_dir, "src", import_name), wheel_files, sdist_files, meta, entry_points
        )
    return packages


def source_files(source_dir: str) -> list[str]:
    """Every file of an import package's source folder, relative to src/ (bytecode caches aside)."""
    src = os.path.dirname(source_dir)
    found = []
    for directory, subdirs, files in os.walk(source_dir):
        subdirs[:] = [d for d in subdirs if d != "__pycache__"]
        found += [os.path.relpath(os.path.join(directory, f), src).replace(os.sep, "/") for f in files if not f.endswith(".pyc")]
    return sorted(found)


@pytest.mark.parametrize("import_name", list(PACKAGES))
def test_wheel_and_sdist_carry_every_source_file(built: dict[str, Built], import_name: str) -> None:
    package = built[import_name]
    files = source_files(package.source_dir)
    assert f"{import_name}/py.typed" in files, "the package declares its type hints with a py.typed marker"
    data_files = [f for f in files if not f.endswith(".py")]  # what the code may open at run time
    missing_from_wheel = [f for f in files if f not in package.wheel_files]
    assert not missing_from_wheel, f"{import_name}'s wheel lacks {missing_from_wheel} (data files: {data_files})"
    missing_from_sdist = [f for f in files if f"src/{f}" not in package.sdist_files]
    assert not missing_from_sdist, f"{import_name}'s sdist lacks {missing_from_sdist}"


def declared_version(import_name: str) -> str:
    """`__version__` as written in the package's __init__.py (read, not imported)."""
    path = os.path.join(ROOT, "packages", PACKAGES[import_name], "src", import_name, "__init__.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__version__"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"{path} has no __version__ = '...' line")


def test_versions_come_from_the_packages_and_pins_between_them_match(built: dict[str, Built]) -> None:
    versions = {}
    for import_name, package in built.items():
        assert package.metadata["Version"] == declared_version(import_name), f"{import_name}'s wheel version"
        versions[str(canonicalize_name(package.metadata["Name"]))] = package.metadata["Version"]
    assert set(versions) == OUR_DISTRIBUTIONS
    for package in built.values():
        for line in package.metadata.get_all("Requires-Dist") or []:
            requirement = Requirement(line)
            name = str(canonicalize_name(requirement.name))
            if name in OUR_DISTRIBUTIONS:
                assert str(requirement.specifier) == f"=={versions[name]}", f"{package.metadata['Name']} requires {line}"


def test_the_cli_distribution_name_and_command(built: dict[str, Built]) -> None:
    cli = built["chat_cli"]
    # PyPI's `chat-cli` is another project's; ours keeps the import package and the command name.
    assert cli.metadata["Name"] == "chat-core-cli"
    assert "chat-cli = chat_cli.main:main" in cli.entry_points
    extras = {
        str(canonicalize_name(Requirement(line).name)): line
        for line in built["chat_core"].metadata.get_all("Requires-Dist") or []
        if "extra ==" in line
    }
    assert set(extras) == {"chat-core-cli", "chat-distributed"}, extras
    assert 'extra == "cli"' in extras["chat-core-cli"] and 'extra == "distributed"' in extras["chat-distributed"]


def test_every_third_party_dependency_has_a_lower_bound() -> None:
    """nox -s wheels (deps=lowest) installs each declared lower bound: one without a bound goes untested."""
    for folder in PACKAGES.values():
        with open(os.path.join(ROOT, "packages", folder, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        assert project["requires-python"] == ">=3.11", "CI tests Python 3.11 only"
        for requirement in map(Requirement, project["dependencies"]):
            if canonicalize_name(requirement.name) in OUR_DISTRIBUTIONS:
                continue
            operators = {spec.operator for spec in requirement.specifier}
            assert ">=" in operators, f"packages/{folder}: {requirement} has no lower bound"


def test_version_flag_prints_the_three_packages_and_torch() -> None:
    from chat_cli.main import main

    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code in (0, None)
    lines = out.getvalue().splitlines()
    assert lines[0] == f"chat-cli {declared_version('chat_cli')} (pip install chat-core-cli)"
    assert f"chat-core {metadata.version('chat-core')}" in lines
    assert f"chat-distributed {metadata.version('chat-distributed')}" in lines
    assert f"torch {metadata.version('torch')}" in lines


def test_readme_states_the_declared_lower_bounds() -> None:
    """The README's "Install from PyPI" section lists each lower bound that CI installs; keep them one."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    for folder in PACKAGES.values():
        with open(os.path.join(ROOT, "packages", folder, "pyproject.toml"), "rb") as f:
            dependencies = tomllib.load(f)["project"]["dependencies"]
        for requirement in map(Requirement, dependencies):
            for spec in requirement.specifier:
                if spec.operator == ">=" and requirement.name != "torch":
                    assert f"{requirement.name} {spec.version}" in readme, f"README.md does not state {requirement}"
