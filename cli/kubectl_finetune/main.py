"""Arguments and exit codes: errors are one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import sys

from . import CliError

CLUSTER_COMMANDS = {
    "list": "list FineTuneJobs",
    "status": "show a job's phase, progress, conditions and Model",
    "watch": "follow a job's progress until it ends (exit 0 if it Succeeded)",
    "logs": "print a trainer pod's log",
    "suspend": "suspend a job: its trainer checkpoints and its nodes are released",
    "resume": "resume a suspended job from its latest checkpoint",
    "delete": "delete a job (its children go with it; its Model stays unless the job said otherwise)",
}


def _cluster_options() -> argparse.ArgumentParser:
    """Options every cluster command takes, after the command as kubectl's own do."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
    options.add_argument("--context", default=None, help="kubeconfig context (default: its current context)")
    options.add_argument("-n", "--namespace", default=None, help="namespace (default: the context's namespace)")
    return options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubectl finetune", description="Run and follow FineTuneJobs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = sub.add_parser("run", help="run a FineTuneJob manifest", description="Run a FineTuneJob manifest here, "
                         "with no cluster: the same spec rules as the API server, the trainer in a subprocess.")
    run.add_argument("job", help="FineTuneJob YAML file")
    run.add_argument("--local", action="store_true", required=True, help="run here, with no cluster (required)")
    run.add_argument("--volume", action="append", default=[], metavar="CLAIM=DIR",
                     help="map pvc://CLAIM/... to the local directory DIR (repeatable)")
    options = _cluster_options()
    for name, helptext in CLUSTER_COMMANDS.items():
        cmd = sub.add_parser(name, help=helptext, description=helptext[0].upper() + helptext[1:] + ".", parents=[options])
        if name == "list":
            cmd.add_argument("-A", "--all-namespaces", action="store_true", help="list jobs in every namespace")
            continue
        cmd.add_argument("name", help="FineTuneJob name")
        if name == "watch":
            cmd.add_argument("--interval", type=float, default=2.0, help="seconds between two reads (default 2)")
        if name == "logs":
            cmd.add_argument("--tail", type=int, default=200, help="lines from the end (default 200; -1: all)")
            cmd.add_argument("-f", "--follow", action="store_true", help="stream the log until the container ends")
            cmd.add_argument("-p", "--previous", action="store_true",
                             help="the log of the previous attempt's pod (after a retry or a restart)")
            cmd.add_argument("--index", type=int, default=0,
                             help="the pod of this node index on a multi-node job (default 0: rank 0)")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "run":
        from .local import run_local

        return run_local(args)
    from . import cluster

    return asyncio.run(cluster.run(args))


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
