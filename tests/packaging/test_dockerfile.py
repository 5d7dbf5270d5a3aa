"""The container images (Dockerfile, .dockerignore), proved as far as a machine without Docker can.

The Dockerfile is read as Docker reads it (dockerfile-parse), and its stages are replayed here:
every ARG and ENV in effect, every COPY from the build context (through .dockerignore) or from
an earlier stage, and every RUN that calls uv, run by bash exactly as written, with the image's
directories (/dist, /opt, /src) moved under a temporary folder. A `uv` stub on PATH records what
bash expands (the wheel's file name, the ARGs, the variables set in front of uv); the real uv then
runs that command: `uv build` builds the wheel, `uv venv` and `uv pip install` build each image's
environment from uv's cache (seconds once it is warm). What differs from a `docker build`:

- TORCH_INDEX_URL (the CPU wheel index of torch) is not reachable from this machine: the build
  arg is set to the default index (PyPI) instead, plus pip's find-links where configured, as the
  Makefile does; torch's version and the rest of the resolution are the same, its build is not.
- How uv installs, not what: links from the cache instead of copies (UV_LINK_MODE), no bytecode
  (UV_COMPILE_BYTECODE), the machine's Python of the image's minor version and never a download
  (the GPU stage's `uv python install` is not run).
- The GPU stage's DeepSpeed build compiles CUDA ops with nvcc: here that step is resolved with
  --dry-run, without its DS_BUILD_<op>=1 variables and without --no-cache.
- apt-get, groupadd and useradd are not run; no image is built or started.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from kubetune.api import JobRef, parse_spec
from kubetune.api.spec import DEFAULT_TRAINER_IMAGE
from kubetune.operator.manifests import build_worker_pod
from kubetune.operator.settings import OperatorSettings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
UV = str(Path(sys.executable).parent / "uv")
HEAVY = ("torch", "deepspeed", "transformers", "peft", "accelerate", "triton")
IMAGE_DIRS = ("dist", "opt", "src")  # the image's own top-level folders the stages write
# What replaces https://download.pytorch.org/whl/cpu here (see the module's docstring).
DEFAULT_INDEX = (os.environ.get("UV_DEFAULT_INDEX") or os.environ.get("UV_INDEX_URL")
                 or os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple")
BUILD_ARGS = {"TORCH_INDEX_URL": DEFAULT_INDEX}
# Compiling DeepSpeed's CUDA ops needs nvcc and a CUDA toolkit, which no machine here has.
GPU_OPS = re.compile(r"DS_BUILD_(?!OPS$)\w+")
GPU_BUILD_ENV = re.compile(r"DS_BUILD_(?!OPS$)\w+|TORCH_CUDA_ARCH_LIST|MAX_JOBS")


# --- reading the Dockerfile ------------------------------------------------------------------

@dataclass
class Stage:
    name: str
    base: str  # an image, or the name of an earlier stage
    instructions: list[tuple[str, str]] = field(default_factory=list)


def _parse() -> tuple[dict[str, str], list[Stage]]:
    """Global ARGs (those before the first FROM) and the stages, in order."""
    parser = DockerfileParser(fileobj=io.BytesIO(DOCKERFILE.read_bytes()))
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        instruction, value = item["instruction"], item["value"]
        if instruction == "COMMENT":
            continue
        if instruction == "FROM":
            words = value.split()
            base = _expand(words[-3] if len(words) >= 3 and words[-2].upper() == "AS" else words[-1], global_args)
            name = words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else str(len(stages))
            stages.append(Stage(name, base))
        elif not stages:
            assert instruction == "ARG", f"only ARG may come before the first FROM, not {instruction}"
            key, _, default = value.partition("=")
            global_args[key] = _unquote(default)
        else:
            stages[-1].instructions.append((instruction, value))
    return global_args, stages


def _unquote(text: str) -> str:
    return shlex.split(text)[0] if text else ""


def _expand(text: str, env: dict[str, str], unknown: dict[str, str] | None = None) -> str:
    """Docker's $VAR and ${VAR} in ENV, ARG, FROM, LABEL. A variable the Dockerfile does not set
    (PATH: the base image's) is left as it is, or taken from ``unknown`` (this machine's)."""
    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name in env:
            return env[name]
        return match.group(0) if unknown is None else unknown.get(name, "")
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, text)


def _pairs(value: str) -> list[tuple[str, str]]:
    """KEY=VALUE pairs of ENV and LABEL (quotes as the shell reads them)."""
    words = shlex.split(value)
    if len(words) >= 2 and "=" not in words[0]:  # the legacy `ENV KEY value`
        return [(words[0], " ".join(words[1:]))]
    return [tuple(word.split("=", 1)) for word in words]  # type: ignore[misc]


def _exec_form(value: str) -> list[str]:
    form = json.loads(value)  # a shell-form ENTRYPOINT is no JSON list: fails here
    assert isinstance(form, list) and all(isinstance(word, str) for word in form), value
    return form


GLOBAL_ARGS, STAGES = _parse()
BY_NAME = {stage.name: stage for stage in STAGES}


def _references(stage: Stage) -> set[str]:
    """The stages this one is built on or copies from."""
    refs = {stage.base} if stage.base in BY_NAME else set()
    for instruction, value in stage.instructions:
        if instruction == "COPY" and (match := re.search(r"--from=(\S+)", value)):
            refs.add(match.group(1))
    return refs


FINAL = [stage.name for stage in STAGES if not any(stage.name in _references(other) for other in STAGES)]


def _last(stage: Stage, instruction: str) -> str | None:
    """The value in force at the end of the stage (inherited from a parent stage)."""
    for name, value in reversed(stage.instructions):
        if name == instruction:
            return value
    return _last(BY_NAME[stage.base], instruction) if stage.base in BY_NAME else None


def _labels(stage: Stage) -> dict[str, str]:
    parent = _labels(BY_NAME[stage.base]) if stage.base in BY_NAME else {}
    args = _stage_args(stage)
    return {**parent, **{key: _expand(value, args) for instruction, text in stage.instructions
                         if instruction == "LABEL" for key, value in _pairs(text)}}


def _stage_args(stage: Stage) -> dict[str, str]:
    args: dict[str, str] = {}
    for instruction, value in stage.instructions:
        if instruction == "ARG":
            key, sep, default = value.partition("=")
            args[key] = _unquote(default) if sep else GLOBAL_ARGS.get(key, "")
    return args


# --- replaying the stages --------------------------------------------------------------------

@dataclass
class UvRun:
    stage: str
    argv: list[str]
    mode: str  # "run", "dry-run" or "not run: <why>"
    output: str = ""


@dataclass
class Replay:
    roots: dict[str, Path]
    envs: dict[str, dict[str, str]]  # each stage's ENV at its end, in the image's paths
    runs: list[UvRun]

    def env(self, stage: str, name: str) -> str:
        """A variable of the stage's image, its paths moved under the stage's folder."""
        return _expand(_relocate(self.envs[stage][name], self.roots[stage]), {}, os.environ)

    def venv(self, stage: str) -> Path:
        return Path(self.env(stage, "VIRTUAL_ENV"))

    def which(self, stage: str, program: str) -> Path | None:
        """The program the image's PATH finds, as a file of the stage that holds it."""
        found = shutil.which(program, path=self.env(stage, "PATH"))
        return Path(found) if found else None

    def stage_runs(self, stage: str) -> list[UvRun]:
        return [run for run in self.runs if run.stage == stage]


def _dockerignore() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        for part in re.split(r"(\*\*/?|\*|\?)", pattern):
            regex += {"**/": "(?:.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(part, re.escape(part))
        rules.append((keep, re.compile(regex)))
    return rules


def _ignored(relative: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: a path is out when it or a folder above it matches, the last match wins."""
    parts = relative.split("/")
    ignored = False
    for depth in range(1, len(parts) + 1):
        prefix = "/".join(parts[:depth])
        for keep, regex in rules:
            if regex.fullmatch(prefix):
                ignored = not keep
    return ignored


def _find_links() -> str:
    """pip's find-links, read as the Makefile reads it."""
    found = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else ""


def _relocate(text: str, root: Path) -> str:
    return re.sub(r"(?<![\w.:/$-])/(" + "|".join(IMAGE_DIRS) + r")(?=/|\b)", lambda m: f"{root}/{m.group(1)}", text)


STUB = """#!/bin/bash
printf '%s\\0' "$@" > "$KUBETUNE_UV_CAPTURE.argv"
env -0 > "$KUBETUNE_UV_CAPTURE.env"
"""


def _replay(tmp: Path) -> Replay:
    rules = _dockerignore()
    stub_dir = tmp / "stub"
    stub_dir.mkdir()
    (stub_dir / "uv").write_text(STUB)
    (stub_dir / "uv").chmod(0o755)
    cache = subprocess.run([UV, "cache", "dir"], capture_output=True, text=True, check=True).stdout.strip()
    find_links = _find_links()
    roots: dict[str, Path] = {}
    envs: dict[str, dict[str, str]] = {}
    runs: list[UvRun] = []
    for number, stage in enumerate(STAGES):
        root = tmp / f"{number:02d}-{stage.name}"
        if stage.base in BY_NAME:  # FROM an earlier stage: its files and its ENV
            shutil.copytree(roots[stage.base], root, symlinks=True)
            env = dict(envs[stage.base])
        else:
            root.mkdir()
            env = {}
        roots[stage.name] = root
        args: dict[str, str] = {}
        workdir = root
        for instruction, value in stage.instructions:
            scope = {**args, **env}
            if instruction == "ARG":
                key, sep, default = value.partition("=")
                args[key] = BUILD_ARGS.get(key, _expand(_unquote(default), scope) if sep else GLOBAL_ARGS.get(key, ""))
            elif instruction == "ENV":
                env.update({key: _expand(text, scope) for key, text in _pairs(value)})
            elif instruction == "WORKDIR":
                workdir = root / _expand(value, scope).lstrip("/")
                workdir.mkdir(parents=True, exist_ok=True)
            elif instruction == "COPY":
                _copy(value, root, workdir, roots, rules)
            elif instruction == "RUN" and re.search(r"\buv\b", value):
                # ARGs and ENVs are the RUN's environment, moved under the stage's folder.
                run_env = {key: _expand(_relocate(text, root), {}, os.environ) for key, text in scope.items()}
                runs.append(_run_uv(stage.name, value, root, workdir, run_env, stub_dir, cache, find_links))
        envs[stage.name] = env
    return Replay(roots, envs, runs)


def _copy(value: str, root: Path, workdir: Path, roots: dict[str, Path],
          rules: list[tuple[bool, re.Pattern[str]]]) -> None:
    words = value.split()
    source_stage = next((word.split("=", 1)[1] for word in words if word.startswith("--from=")), None)
    *sources, dest = [word for word in words if not word.startswith("--")]
    if source_stage is not None and "astral-sh/uv" in BY_NAME[source_stage].base:
        return  # the uv binary: here the stages' `uv` is this venv's (the stub, then the real one)
    # Every path of the image lies under the stage's folder; nothing is written outside it.
    target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
    assert target.resolve().is_relative_to(root.resolve()), value
    for source in sources:
        if source_stage is not None:  # from an earlier stage: linked, not copied (a venv is GBs)
            origin = roots[source_stage] / source.strip("/")
            link = target if source.endswith("/") or len(sources) == 1 else target / origin.name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(origin, target_is_directory=origin.is_dir())
            continue
        origin = REPO / source
        files = [origin] if origin.is_file() else sorted(path for path in origin.rglob("*") if path.is_file())
        for path in files:
            relative = path.relative_to(REPO).as_posix()
            if _ignored(relative, rules):
                continue
            inside = path.name if origin.is_file() else path.relative_to(origin)
            copy_to = (target / inside) if (dest.endswith("/") or origin.is_dir()) else target
            copy_to.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, copy_to)


def _run_uv(stage: str, value: str, root: Path, workdir: Path, env: dict[str, str], stub_dir: Path,
            cache: str, find_links: str) -> UvRun:
    command = re.sub(r"^(--\S+\s+)+", "", value.strip())  # RUN --mount=...: BuildKit's, not the shell's
    bare = re.sub(r"\$\([^)]*\)", "", command)
    # One uv command per RUN, so that no step escapes this replay in a chain.
    assert re.fullmatch(r"(\w+=\S+\s+)*uv\s[^;&|]*", bare), f"RUN must be a single uv command: {value}"
    capture = stub_dir / "capture"
    for stale in (capture.with_suffix(".argv"), capture.with_suffix(".env")):
        stale.unlink(missing_ok=True)
    shell_env = {**os.environ, **env, "PATH": f"{stub_dir}:{env.get('PATH', os.environ['PATH'])}",
                 "KUBETUNE_UV_CAPTURE": str(capture)}
    subprocess.run(["bash", "-c", _relocate(command, root)], env=shell_env, cwd=workdir, check=True)
    argv = capture.with_suffix(".argv").read_bytes().decode().split("\0")[:-1]
    uv_env = dict(item.split("=", 1) for item in capture.with_suffix(".env").read_bytes().decode().split("\0")[:-1])
    uv_env.pop("KUBETUNE_UV_CAPTURE")
    uv_env["PATH"] = uv_env["PATH"].replace(f"{stub_dir}:", "", 1)
    uv_env.update({"UV_CACHE_DIR": cache, "UV_PYTHON_DOWNLOADS": "never"})
    for how_not_what in ("UV_LINK_MODE", "UV_COMPILE_BYTECODE"):
        uv_env.pop(how_not_what, None)
    if find_links:
        uv_env["UV_FIND_LINKS"] = find_links
    if argv[:2] == ["python", "install"]:
        return UvRun(stage, argv, "not run: downloads a CPython build; the machine's Python of that minor is used")
    mode = "run"
    assigned = dict(re.findall(r"(\w+)=(\S*)\s", re.match(r"(\w+=\S+\s+)*", bare).group(0)))
    if argv[:2] == ["pip", "install"] and any(GPU_OPS.fullmatch(key) and text.strip('"') != "0"
                                              for key, text in {**env, **assigned}.items()):
        mode = "dry-run"
        uv_env = {key: text for key, text in uv_env.items() if not GPU_BUILD_ENV.fullmatch(key)}
        argv = [word for word in argv if word != "--no-cache"] + ["--dry-run"]
    result = subprocess.run([UV, *argv], env=uv_env, cwd=workdir, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{stage}: uv {shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return UvRun(stage, argv, mode, result.stdout + result.stderr)


@pytest.fixture(scope="module")
def replay(tmp_path_factory: pytest.TempPathFactory) -> Replay:
    return _replay(tmp_path_factory.mktemp("dockerfile"))


def _venv_stage(final: str) -> str:
    """The stage whose /opt/venv a final stage copies."""
    for instruction, value in BY_NAME[final].instructions:
        if instruction == "COPY" and (match := re.fullmatch(r"--from=(\S+)\s+/opt/venv/?\s+/opt/venv/?", value)):
            return match.group(1)
    raise AssertionError(f"{final} copies no /opt/venv")


def _distributions(venv: Path) -> set[str]:
    (site,) = venv.glob("lib/python3.*/site-packages")
    return {path.name.split("-")[0].lower().replace("_", "-") for path in site.glob("*.dist-info")}


def _planned(run: UvRun) -> set[str]:
    """Distributions a `uv pip install` installed, or would install (--dry-run)."""
    return {match.group(1).lower() for match in re.finditer(r"^ [+~] ([\w.-]+)(?:==| @ )", run.output, re.M)}


def _command(name: str) -> list[str]:
    """ENTRYPOINT + CMD, both in exec form (a shell form is no JSON list and fails here)."""
    return _exec_form(_last(BY_NAME[name], "ENTRYPOINT") or "null") + _exec_form(_last(BY_NAME[name], "CMD") or "[]")


def _in_venv(replay: Replay, final: str, program: str) -> Path:
    """The file the final image's PATH finds for ``program``: it must be its venv's."""
    found = replay.which(final, program)
    venv_bin = replay.venv(_venv_stage(final)) / "bin"
    assert found is not None and found.parent.resolve() == venv_bin.resolve(), f"{final}: {program} -> {found}"
    return found


def _worker_command() -> list[str]:
    """The command the operator really gives a worker pod of examples/quickstart.yaml."""
    manifest = yaml.safe_load((REPO / "examples" / "quickstart.yaml").read_text())
    job = JobRef(name="quickstart", namespace="default", uid="u-1")
    pod = build_worker_pod(job, parse_spec(manifest["spec"]), 0, OperatorSettings())
    (container,) = pod["spec"]["containers"]
    return container["command"]


# --- the tests -------------------------------------------------------------------------------

def test_the_targets_are_the_documented_images() -> None:
    documented = dict(re.findall(r"docker build --target (\S+)\s+-t (\S+)", DOCKERFILE.read_text()))
    assert sorted(documented) == sorted(FINAL) == ["operator", "trainer", "trainer-cuda"]
    assert documented["operator"] == f"kubetune/operator:{VERSION}"  # the chart's default: its appVersion
    assert documented["trainer"] == DEFAULT_TRAINER_IMAGE == f"kubetune/trainer:{VERSION}"
    assert documented["trainer-cuda"].startswith(f"{DEFAULT_TRAINER_IMAGE}-")
    for name in FINAL:
        labels = _labels(BY_NAME[name])
        assert labels["org.opencontainers.image.version"] == VERSION, name
        assert labels["org.opencontainers.image.licenses"] == PYPROJECT["project"]["license"] == "Apache-2.0"
        assert labels["org.opencontainers.image.source"].startswith("https://"), name


def test_base_images_are_pinned_by_tag_and_uv_once() -> None:
    external = {stage.base for stage in STAGES if stage.base not in BY_NAME}
    for image in external:
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"unpinned base image {image}"
    uv_images = [image for image in external if "astral-sh/uv" in image]
    assert len(uv_images) == 1 and re.search(r":\d+\.\d+\.\d+$", uv_images[0]), uv_images
    minimum = re.search(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"]).group(1)
    assert re.fullmatch(rf"python:3\.{minimum}[.\d]*-slim[\w-]*", GLOBAL_ARGS["PYTHON_IMAGE"])
    assert GLOBAL_ARGS["PYTHON_VERSION"] == f"3.{minimum}"  # the GPU image's Python is the same one


@pytest.mark.parametrize("name", ["operator", "trainer", "trainer-cuda"])
def test_final_images_run_as_a_numeric_non_root_user_and_exec_a_console_script(name: str) -> None:
    user = _last(BY_NAME[name], "USER")
    assert user is not None and re.fullmatch(r"\d+:\d+", user), f"{name}: USER {user} (numeric uid:gid)"
    assert "0" not in user.split(":"), f"{name}: USER {user}"
    assert _command(name)[0] in PYPROJECT["project"]["scripts"], _command(name)


def test_the_wheel_is_built_from_the_context_with_every_source(replay: Replay) -> None:
    (wheel,) = (replay.roots["build"] / "dist").glob("*.whl")
    assert wheel.name == f"kubetune-{VERSION}-py3-none-any.whl"
    names = set(zipfile.ZipFile(wheel).namelist())
    roots = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    tracked = subprocess.run(["git", "ls-files", "--", *roots], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    expected = {"kubetune/" + path.split("/kubetune/", 1)[1] for path in tracked if path.endswith(".py")}
    assert expected and expected <= names, sorted(expected - names)
    module = PYPROJECT["project"]["scripts"]["kubetune"].partition(":")[0]
    assert module.replace(".", "/") + "/__init__.py" in names


def test_the_operator_image_has_no_training_stack_and_its_command_starts(replay: Replay) -> None:
    installed = _distributions(replay.venv(_venv_stage("operator")))
    assert {"kopf", "kubernetes", "aiohttp", "prometheus-client", "kubetune"} <= installed
    assert installed.isdisjoint(HEAVY), sorted(installed & set(HEAVY))
    # `kubetune operator`, as the chart runs it (command ["kubetune"], args ["operator", ...]).
    command = _command("operator")
    assert command == ["kubetune", "operator"]
    result = subprocess.run([str(_in_venv(replay, "operator", command[0])), *command[1:], "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "--namespace" in result.stdout, result.stderr


def test_the_trainer_image_runs_the_operators_worker_command(replay: Replay) -> None:
    command = _worker_command()
    programs = [command[0], command[command.index("--") + 1]]
    assert programs == ["python", "torchrun"], command
    for program in programs:
        _in_venv(replay, "trainer", program)
    venv = replay.venv(_venv_stage("trainer"))
    modules = [command[i + 1] for i, word in enumerate(command) if word == "-m"]
    assert modules == ["kubetune.trainer.logkeeper", "kubetune.trainer"]
    probe = "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))"
    missing = subprocess.run([str(venv / "bin" / "python"), "-c", probe, *modules], capture_output=True, text=True,
                             check=True).stdout.split()
    assert missing == []
    assert {"torch", "deepspeed", "transformers", "peft", "boto3", "kubetune"} <= _distributions(venv)
    entry = _command("trainer")
    result = subprocess.run([str(_in_venv(replay, "trainer", entry[0])), *entry[1:]], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--config" in result.stdout, result.stderr


def test_deepspeed_builds_against_the_torch_installed_first(replay: Replay) -> None:
    """The trainer's torch is installed on its own first (from TORCH_INDEX_URL in the CPU image):
    DeepSpeed, built without isolation, compiles against it, and the install of
    kubetune[trainer] must keep it rather than take PyPI's build."""
    pin = next(dep for dep in PYPROJECT["project"]["optional-dependencies"]["trainer"] if dep.startswith("torch"))
    for stage in ("trainer-venv", "cuda-build"):
        first, *rest = [run for run in replay.stage_runs(stage) if run.argv[:2] == ["pip", "install"]]
        assert pin in first.argv and "torch" in _planned(first), (pin, first.argv)
        assert rest and all("torch" not in _planned(run) for run in rest), [run.output for run in rest]
        assert "deepspeed" in _planned(rest[-1]) and "--no-build-isolation-package" in rest[-1].argv
    first = next(run for run in replay.stage_runs("trainer-venv") if run.argv[:2] == ["pip", "install"])
    assert _stage_args(BY_NAME["trainer-venv"])["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert first.argv[first.argv.index("--extra-index-url") + 1] == BUILD_ARGS["TORCH_INDEX_URL"]


def test_the_cuda_image_resolves_and_provides_the_worker_programs(replay: Replay) -> None:
    """The GPU path is never built here: its steps run or resolve, and its programs come from them."""
    runs = replay.stage_runs("cuda-build")
    assert [run.mode.split(":")[0] for run in runs] == ["not run", "run", "run", "dry-run"], [r.mode for r in runs]
    planned = set().union(*(_planned(run) for run in runs if run.argv[:2] == ["pip", "install"]))
    assert {"torch", "deepspeed", "transformers", "peft", "boto3", "kubetune"} <= planned
    # python: the venv's; torchrun: torch's console script (read from the same torch's metadata).
    assert replay.env("trainer-cuda", "PATH").split(":")[0] == str(replay.roots["trainer-cuda"] / "opt/venv/bin")
    assert _venv_stage("trainer-cuda") == "cuda-build" and (replay.venv("cuda-build") / "bin" / "python").exists()
    (torch_info,) = replay.venv("cuda-build").glob("lib/python3.*/site-packages/torch-*.dist-info")
    assert re.search(r"^torchrun\s*=", (torch_info / "entry_points.txt").read_text(), re.M)


def test_the_context_leaves_out_the_venv_and_git_but_not_the_wheels_sources() -> None:
    rules = _dockerignore()
    for excluded in (".venv/bin/python", ".git/HEAD", ".kubetune/cluster.json", ".bench/run.json",
                     "operator/kubetune/operator/__pycache__/main.cpython-311.pyc", ".pytest_cache/v", "dist/x.whl"):
        assert _ignored(excluded, rules), excluded
    roots = PYPROJECT["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    tracked = subprocess.run(["git", "ls-files", "--", "pyproject.toml", "README.md", *roots], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    assert len(tracked) > 10 and [path for path in tracked if _ignored(path, rules)] == []
