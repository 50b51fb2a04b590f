"""``model-server``: one sub-command per process role, and ``serve`` for the whole stack.

``serve`` does not supervise anything itself: it fills the values
supervisord.conf expands (run dir, process counts, stop wait) from the
settings and replaces itself with supervisord, which runs the coordinator,
the workers and the frontends.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from . import __version__, exitcodes
from .rundir import RunDirError, prepare_run_dir
from .settings import Settings, get_settings

ROOT = Path(__file__).resolve().parent.parent
SUPERVISOR_LEVELS = {
    "DEBUG": "debug",
    "INFO": "info",
    "WARNING": "warn",
    "ERROR": "error",
    "CRITICAL": "critical",
}


def supervisord_conf() -> Path:
    """The repository's supervisord.conf, or a copy installed beside the package."""
    for candidate in (
        ROOT / "supervisord.conf",
        Path(sys.prefix) / "share" / "model-server" / "supervisord.conf",
    ):
        if candidate.is_file():
            return candidate
    raise SystemExit("supervisord.conf not found next to the package")


def supervisor_env(settings: Settings) -> dict[str, str]:
    """Environment for supervisord: settings as MODEL_SERVER_* plus what the conf expands."""
    exe = shutil.which("model-server") or str(Path(sys.executable).with_name("model-server"))
    env = dict(os.environ)
    env.update(
        {
            "MODEL_SERVER_RUN_DIR": str(settings.run_dir.resolve()),
            "MODEL_SERVER_WORKERS": str(settings.workers),
            "MODEL_SERVER_SPARE_WORKERS": str(settings.spare_workers),
            "MODEL_SERVER_FRONTEND_PROCESSES": str(settings.frontend_processes),
            "MODEL_SERVER_BIN": exe,
            # Longer than the drain, so supervisord never SIGKILLs a draining process.
            "MODEL_SERVER_STOPWAIT": str(int(settings.drain_seconds) + 10),
            "MODEL_SERVER_SUPERVISOR_LOG_LEVEL": SUPERVISOR_LEVELS.get(settings.log_level, "info"),
            "MODEL_SERVER_MODEL_REPOSITORY": str(settings.model_repository.resolve()),
            "PYTHONUNBUFFERED": "1",
            # prometheus-client's multiprocess mode: every process writes here, /metrics sums it.
            "PROMETHEUS_MULTIPROC_DIR": str(settings.run_dir.resolve() / "metrics"),
        }
    )
    if settings.models_file:
        env["MODEL_SERVER_MODELS_FILE"] = str(Path(settings.models_file).resolve())
    return env


def cmd_serve(args: argparse.Namespace) -> int:
    if args.workers:
        os.environ["MODEL_SERVER_WORKERS"] = str(args.workers)
    if args.port is not None:
        os.environ["MODEL_SERVER_PORT"] = str(args.port)
    if args.host:
        os.environ["MODEL_SERVER_HOST"] = args.host
    settings = Settings()
    from frontend.auth import TokenConfigError, is_loopback, load_tokens

    try:
        admin_tokens, _ = load_tokens(settings)  # fail here, once, rather than in every frontend
    except TokenConfigError as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return exitcodes.BOOT_ERROR
    if not admin_tokens and not is_loopback(settings.host) and not settings.allow_unauthenticated_admin:
        print(
            "model-server: admin routes (model load/unload, client shared memory) answer 403 on "
            f"{settings.host}: set MODEL_SERVER_ADMIN_TOKENS or MODEL_SERVER_ADMIN_TOKENS_FILE",
            file=sys.stderr,
        )
    try:
        prepare_run_dir(settings.run_dir)
    except RunDirError as exc:
        print(f"model-server: {exc}", file=sys.stderr)
        return exitcodes.BOOT_ERROR
    if args.demo:
        from . import demo

        path = demo.write(settings.model_repository)
        print(f"demo model {demo.MODEL_ID} {demo.VERSION} at {path}", file=sys.stderr)
        if not settings.models_file:
            settings.models_file = demo.models_file(settings.run_dir / "demo-models.yaml")
    env = supervisor_env(settings)
    metrics_dir = Path(env["PROMETHEUS_MULTIPROC_DIR"])
    shutil.rmtree(metrics_dir, ignore_errors=True)  # values of an earlier run must not add up
    metrics_dir.mkdir(parents=True)
    supervisord = shutil.which("supervisord") or str(Path(sys.executable).with_name("supervisord"))
    print(
        f"starting coordinator, {settings.workers} worker(s) and {settings.frontend_processes} frontend(s) "
        f"on http://{settings.host}:{settings.port} (run dir {settings.run_dir})",
        file=sys.stderr,
    )
    os.execve(supervisord, [supervisord, "-n", "-c", str(supervisord_conf())], env)
    return 1  # not reached


def cmd_ctl(args: argparse.Namespace) -> int:
    settings = get_settings()
    ctl = shutil.which("supervisorctl") or str(Path(sys.executable).with_name("supervisorctl"))
    env = supervisor_env(settings)
    os.execve(ctl, [ctl, "-c", str(supervisord_conf()), *args.rest], env)
    return 1


def cmd_role(args: argparse.Namespace) -> int:
    if args.command == "frontend":
        from frontend.process import main
    elif args.command == "worker":
        from workers.process import main
    else:
        from coordinator.process import main
    return main()


def cmd_demo_model(args: argparse.Namespace) -> int:
    from . import demo

    print(demo.write(Path(args.repository)))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    print(settings_table())
    return 0


def settings_table() -> str:
    """The README's settings table, generated from the settings class."""
    rows = ["| Variable | Default | Meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        if alias is not None and hasattr(alias, "choices"):
            env = str(alias.choices[0])
        else:
            env = f"MODEL_SERVER_{name.upper()}"
        default = field.get_default(call_default_factory=True)
        if name == "run_dir":
            default = "$TMPDIR/model-server"
        elif name == "cache_dir":
            default = "~/.cache/model-server"
        shown = "" if default is None or default == [] else f"`{default}`"
        rows.append(f"| `{env}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="model-server", description="ONNX model server")
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start coordinator, workers and frontends under supervisord")
    serve.add_argument(
        "--demo", action="store_true", help="generate and preload the fraud_detection demo model"
    )
    serve.add_argument("--workers", type=int, help="override MODEL_SERVER_WORKERS")
    serve.add_argument("--port", type=int, help="override MODEL_SERVER_PORT")
    serve.add_argument("--host", help="override MODEL_SERVER_HOST")
    serve.set_defaults(func=cmd_serve)
    for role in ("frontend", "worker", "coordinator"):
        sub.add_parser(role, help=f"run one {role} process (supervisord does this)").set_defaults(
            func=cmd_role
        )
    ctl = sub.add_parser("ctl", help="supervisorctl for this server (e.g. `ctl status`)")
    ctl.add_argument("rest", nargs=argparse.REMAINDER)
    ctl.set_defaults(func=cmd_ctl)
    demo = sub.add_parser("demo-model", help="write the demo model into a repository")
    demo.add_argument("--repository", default="model_repository")
    demo.set_defaults(func=cmd_demo_model)
    sub.add_parser("settings", help="print the settings table (Markdown)").set_defaults(func=cmd_settings)
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
