"""``python -m structenv.sandbox``: run one sandbox server (a sandbox host).

On start-up it prints exactly one JSON line on stdout: ``{"ready": true, ...}`` once it is
listening, or ``{"error": ..., "message": ...}`` (exit status 3) if the isolation it was asked
for is unusable. With ``--watch-stdin`` it exits as soon as its stdin reaches end of file, which
is how a parent that dies (even by SIGKILL) takes its hosts with it: the kernel closes the
parent's end of the pipe.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import resource
import signal
import sys
from collections.abc import Callable

import anyio

from .._exceptions import SandboxUnavailableError
from ._bwrap import Isolation, private_mounts
from ._netns import (
    DEFAULT_CONNECTION_BURST,
    DEFAULT_CONNECTION_RATE,
    MAX_CONNECTION_BURST,
    MAX_CONNECTION_RATE,
)
from ._runtime import Limits
from ._server import SandboxServer, ServerConfig

_DEFAULTS = Limits()


def _networks(text: str) -> tuple[str, ...]:
    """``--prohibit``: comma-separated IPv4 addresses or networks, normalised."""
    try:
        return tuple(str(ipaddress.IPv4Network(a, strict=False)) for a in text.split(",") if a)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an IPv4 address or network: {exc}") from None


def _bounded(high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if not 1 <= value <= high:
            raise argparse.ArgumentTypeError(f"not an integer in 1..{high}: {text!r}")
        return value

    return parse


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m structenv.sandbox", description=__doc__)
    p.add_argument("--socket", help="listen on this unix socket path")
    p.add_argument("--host", default="127.0.0.1", help="TCP address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="TCP port (0: pick one)")
    p.add_argument(
        "--token-file", help="file holding the bearer token (or $STRUCTENV_SANDBOX_TOKEN)"
    )
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--workdir", default="/var/tmp/structenv-sandbox")
    p.add_argument("--name", help="host name (cgroup and tag prefix)")
    p.add_argument("--isolation", choices=["bwrap", "none"], default="bwrap")
    p.add_argument("--bwrap", default="bwrap", help="bubblewrap binary")
    p.add_argument("--allow-network", action="store_true")
    p.add_argument(
        "--prohibit",
        type=_networks,
        default=(),
        help="comma-separated IPv4 addresses/networks networked slots never reach",
    )
    p.add_argument(
        "--prohibit-links", action="store_true", help="slots never reach directly connected nets"
    )
    p.add_argument(
        "--connection-rate",
        type=_bounded(MAX_CONNECTION_RATE),
        default=DEFAULT_CONNECTION_RATE,
        help="new outbound flows per second a networked slot may start (nftables, its netns)",
    )
    p.add_argument(
        "--connection-burst",
        type=_bounded(MAX_CONNECTION_BURST),
        default=DEFAULT_CONNECTION_BURST,
        help="flows a networked slot may start at once beyond the rate",
    )
    p.add_argument("--cgroup", choices=["auto", "required", "off"], default="auto")
    p.add_argument(
        "--cgroup-root",
        help="make slot cgroups in DIR/<controller>/<name>/<i> (a delegated subtree) instead "
        "of /sys/fs/cgroup/<controller>/structenv/<name>/<i>",
    )
    p.add_argument("--memory", type=int, default=_DEFAULTS.memory, help="bytes per command/slot")
    p.add_argument("--pids", type=int, default=_DEFAULTS.pids, help="processes per slot")
    p.add_argument("--file-size", type=int, default=_DEFAULTS.file_size)
    p.add_argument("--cpu-seconds", type=int, default=0)
    p.add_argument("--cpus", type=float, default=_DEFAULTS.cpus, help="CPU cores per slot")
    p.add_argument("--disk", type=int, default=_DEFAULTS.disk, help="workspace bytes per slot")
    p.add_argument("--tmp-size", type=int, default=_DEFAULTS.tmp_size, help="/tmp bytes per slot")
    p.add_argument(
        "--inodes", type=int, default=_DEFAULTS.inodes, help="files per tmpfs of a slot (0: no cap)"
    )
    p.add_argument("--nofile", type=int, default=_DEFAULTS.nofile, help="open files per process")
    p.add_argument("--max-output", type=int, default=_DEFAULTS.max_output)
    p.add_argument("--max-body", type=int, default=64 << 20)
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    return p.parse_args(argv)


def _emit(value: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def _run(config: ServerConfig, watch_stdin: bool) -> None:
    server = SandboxServer(config)
    async with anyio.create_task_group() as tg:
        info = await tg.start(server.serve)
        _emit({"ready": True, **info})

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()

        tg.start_soon(on_signal)
        if watch_stdin:
            while True:
                await anyio.wait_readable(0)
                if not os.read(0, 4096):
                    break
            tg.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    """Run a sandbox server until SIGTERM/SIGINT (or stdin EOF with ``--watch-stdin``)."""
    args = _parse(argv)
    # First, while this process has one thread: a mount namespace of its own, so the
    # workspace quotas it mounts die with it, even if it is killed.
    private_mounts()
    token = os.environ.pop("STRUCTENV_SANDBOX_TOKEN", None)
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    if not args.socket and not token:
        _emit({"error": "config", "message": "a TCP sandbox server requires a bearer token"})
        return 2
    config = ServerConfig(
        slots=args.slots,
        workdir=args.workdir,
        socket_path=args.socket,
        host=args.host,
        port=args.port,
        token=token or None,
        isolation=Isolation(
            args.isolation,
            args.bwrap,
            args.allow_network,
            args.prohibit,
            args.prohibit_links,
            args.connection_rate,
            args.connection_burst,
        ),
        limits=Limits(
            memory=args.memory,
            pids=args.pids,
            file_size=args.file_size,
            cpu_seconds=args.cpu_seconds,
            max_output=args.max_output,
            cpus=args.cpus,
            disk=args.disk,
            tmp_size=args.tmp_size,
            inodes=args.inodes,
            nofile=args.nofile,
        ),
        cgroup=args.cgroup,
        cgroup_root=args.cgroup_root,
        max_body=args.max_body,
        **({"name": args.name} if args.name else {}),
    )
    # One connection per concurrent call: lift the soft descriptor limit to the hard one so
    # a burst of callers cannot make accept() fail (the default soft limit is 1024).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = 1 << 16 if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
    except (ValueError, OSError):
        pass  # keep the default; accept() errors then surface as connection failures
    status = 0
    try:
        anyio.run(_run, config, args.watch_stdin)
    except* SandboxUnavailableError as group:
        _emit({"error": "sandbox_unavailable", "message": str(group.exceptions[0])})
        status = 3
    except* KeyboardInterrupt:
        status = 130
    return status


if __name__ == "__main__":
    sys.exit(main())
