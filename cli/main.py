"""The ``lorafleet`` command: run the services, build a tiny model, watch jobs."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from shared.http import SERVER_KEEP_ALIVE_SECONDS
from shared.settings import get_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("api", help="run the REST API server (uvicorn)")
    worker = sub.add_parser("worker", help="run a Celery training worker")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo"],
                        help="prefork (default): a job that crashes its process leaves the "
                        "worker alive")
    worker.add_argument("--hostname", default=None, help="Celery node name (default celery@host)")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("--gpus", default=None, metavar="all|0,2,3",
                        help="one worker process per GPU, each pinned to its GPU and named "
                        "gpuN@host (default: one process, on LORAFLEET_DEVICE)")
    sub.add_parser("migrate", help="upgrade the database schema to the newest version")
    sub.add_parser("sweep", help="re-queue jobs whose worker vanished (workers do this too)")
    sub.add_parser("serve", help="run the inference engine that serves the adapters (uvicorn)")
    up = sub.add_parser("up", help="API + one worker + the inference engine on this machine, "
                        "in the foreground")
    up.add_argument("--no-worker", action="store_true", help="do not start a worker")
    up.add_argument("--no-engine", action="store_true", help="do not start the engine")

    demo = sub.add_parser("demo", help="fine-tune SmolLM2-135M end to end on this machine, in a "
                          "local folder, and compare it with the base model (bundled sample "
                          "data)")
    demo.add_argument("--dir", default=".demo", help="working folder (default .demo)")
    demo.add_argument("--port", type=int, default=None,
                      help="API port (default: LORAFLEET_PORT if set, else a free port)")
    demo.add_argument("--tiny", action="store_true",
                      help="train the tiny random-init model instead (no download; gibberish "
                      "answers)")
    demo.add_argument("--max-steps", type=int, default=None,
                      help="default 24 (SmolLM2), 40 (--tiny)")
    demo.add_argument("--save-steps", type=int, default=None,
                      help="default: at the end (SmolLM2), every 10 (--tiny)")

    tiny = sub.add_parser("make-tiny-model",
                          help="write a small random-init Phi model and a tokenizer trained here")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden-size", type=int, default=128,
                      help="width; 4 heads, so at least 128 for vLLM (head size 32)")
    tiny.add_argument("--layers", type=int, default=2)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kc = keys_sub.add_parser("create", help="create a key for a project; prints it once")
    kc.add_argument("--project", default="default")
    kc.add_argument("--name", default="")
    kl = keys_sub.add_parser("list", help="list keys (never the secrets)")
    kl.add_argument("--project", default=None)
    kr = keys_sub.add_parser("revoke", help="revoke a key by its id")
    kr.add_argument("key_id")

    jobs = sub.add_parser("jobs", help="work with fine-tuning jobs")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    watch = jobs_sub.add_parser("watch", help="live progress bar until the job ends")
    watch.add_argument("job_id")
    watch.add_argument("--base-url", default=None, help="default http://HOST:PORT/v1")
    watch.add_argument("--interval", type=float, default=0.5)

    from cli.models import add_models_parser

    add_models_parser(sub)
    return parser


def cmd_api() -> int:
    import uvicorn

    s = get_settings()
    uvicorn.run("api.main:create_app", factory=True, host=s.host, port=s.port,
                log_level="info", timeout_graceful_shutdown=5)
    return 0


def cmd_serve() -> int:
    import uvicorn

    s = get_settings()
    uvicorn.run("engine.app:create_app", factory=True, host=s.engine_host,
                port=s.engine_port, log_level="info", timeout_graceful_shutdown=5,
                timeout_keep_alive=SERVER_KEEP_ALIVE_SECONDS)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from shared.migrate import upgrade
    from worker import devices

    if args.gpus is not None:
        return cmd_worker_gpus(args)
    s = get_settings()
    try:
        devices.pin(s.device)  # before anything starts CUDA
    except devices.DeviceError as e:
        print(f"lorafleet worker: {e}", file=sys.stderr)
        return 2
    if s.auto_migrate and s.effective_database_url.startswith("sqlite"):
        upgrade()
    from worker import celery_app

    app = celery_app.app
    celery_app.IN_PROCESS_POOL = args.pool == "solo"

    argv = ["worker", "-Q", s.queue, "--concurrency", "1", "--pool", args.pool,
            "--loglevel", args.loglevel, "--without-gossip", "--without-mingle"]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0


def cmd_worker_gpus(args: argparse.Namespace) -> int:
    """One worker process per GPU of ``--gpus``, each pinned to its own; Ctrl-C (or SIGTERM)
    stops them all, each checkpointing its job first."""
    from shared.migrate import upgrade
    from worker import devices

    try:
        gpus = devices.parse_gpus(args.gpus, devices.gpu_count())
    except devices.DeviceError as e:
        print(f"lorafleet worker: {e}", file=sys.stderr)
        return 2
    s = get_settings()
    if s.auto_migrate and s.effective_database_url.startswith("sqlite"):
        upgrade()  # once, before the workers race to do it
    name, _, host = (args.hostname or "celery@%h").rpartition("@")
    envs = devices.worker_envs(gpus, os.environ, metrics_port=s.worker_metrics_port)
    commands = [
        [sys.executable, "-m", "cli.main", "worker", "--pool", args.pool, "--loglevel",
         args.loglevel, "--hostname", f"{name or 'celery'}-gpu{gpu}@{host}"]
        for gpu in gpus]
    return _supervise([f"worker gpu{gpu}" for gpu in gpus], commands, envs)


def cmd_up(args: argparse.Namespace) -> int:
    """API, worker and engine as child processes; Ctrl-C (or SIGTERM) stops them cleanly."""
    from shared.migrate import upgrade

    upgrade()
    exe = [sys.executable, "-m", "cli.main"]
    names = ["api"] + ([] if args.no_worker else ["worker"]) + ([] if args.no_engine else ["serve"])
    return _supervise(names, [[*exe, name] for name in names])


def _supervise(names: list[str], commands: list[list[str]],
               envs: Sequence[dict[str, str]] | None = None) -> int:
    """Run ``commands`` as child processes until one exits or this one gets Ctrl-C/SIGTERM;
    then SIGTERM to the others (workers checkpoint their jobs), killed past the grace."""
    procs = [subprocess.Popen(cmd, env=envs[i] if envs else None)
             for i, cmd in enumerate(commands)]
    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        while not stopping:
            for p in procs:
                if p.poll() is not None:
                    print(f"lorafleet: {names[procs.index(p)]} exited with {p.returncode}",
                          file=sys.stderr)
                    stopping, code = True, p.returncode or 1
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        # A worker gives itself the grace to checkpoint, then exits: a little more here.
        deadline = time.monotonic() + get_settings().preempt_grace_seconds + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return code


def cmd_keys(args: argparse.Namespace) -> int:
    from api import auth as keys
    from shared.db import session_scope
    from shared.migrate import upgrade

    if get_settings().auto_migrate:
        upgrade()
    with session_scope() as s:
        if args.keys_command == "create":
            row, secret = keys.create_key(s, args.project, args.name)
            print(secret)
            print(f"created {row.id} for project '{row.project}' (the key is shown only once)",
                  file=sys.stderr)
        elif args.keys_command == "list":
            for k in keys.list_keys(s, args.project):
                state = "revoked" if k.revoked_at else "active"
                print(f"{k.id}\t{k.project}\t{k.prefix}...\t{state}\t{k.name}")
        else:
            keys.revoke_key(s, args.key_id)
            print(f"revoked {args.key_id}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "api":
        return cmd_api()
    if args.command == "worker":
        return cmd_worker(args)
    if args.command == "migrate":
        from shared.migrate import upgrade

        upgrade()
        print(f"database at {get_settings().effective_database_url.split('@')[-1]} is up to date")
        return 0
    if args.command == "sweep":
        from worker.sweeper import sweep

        print("\n".join(sweep()) or "nothing to re-queue")
        return 0
    if args.command == "up":
        return cmd_up(args)
    if args.command == "serve":
        return cmd_serve()
    if args.command == "demo":
        from cli.demo import DemoOptions, run_demo

        return run_demo(DemoOptions(Path(args.dir), args.port, args.max_steps, args.save_steps,
                                    tiny=args.tiny))
    if args.command == "make-tiny-model":
        from worker.tiny_model import build_tiny_model

        path = build_tiny_model(args.path, seed=args.seed, hidden_size=args.hidden_size,
                                num_hidden_layers=args.layers)
        print(path)
        return 0
    if args.command == "keys":
        return cmd_keys(args)
    if args.command == "jobs" and args.jobs_command == "watch":
        from cli.watch import cmd_watch

        return cmd_watch(args)
    if args.command == "models":
        from cli.models import cmd_models

        return cmd_models(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
