"""Arguments and exit codes: errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import CliError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl finetune", description="Run and follow FineTuneJobs.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a FineTuneJob manifest")
    run.add_argument("job", help="FineTuneJob YAML file")
    run.add_argument("--local", action="store_true", required=True, help="run here, with no cluster")
    run.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                     help="map pvc://CLAIM/... to the local directory DIR (repeatable)")
    for name, helptext in [("list", "list FineTuneJobs"), ("status", "show a job's status"),
                           ("watch", "follow a job's progress until it ends"), ("logs", "print the trainer's log")]:
        cmd = sub.add_parser(name, help=helptext)
        cmd.add_argument("-n", "--namespace", default=None)
        if name != "list":
            cmd.add_argument("name")
        if name == "watch":
            cmd.add_argument("--interval", type=float, default=2.0)
        if name == "logs":
            cmd.add_argument("--tail", type=int, default=200)
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "run":
        from .local import run_local

        return run_local(args)
    from . import cluster

    handler = {"list": cluster.cmd_list, "status": cluster.cmd_status,
               "watch": cluster.cmd_watch, "logs": cluster.cmd_logs}[args.command]
    return asyncio.run(handler(args))


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = _run(args)
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a cluster or network problem: still one line
        print(f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
