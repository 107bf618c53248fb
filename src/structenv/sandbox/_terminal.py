"""A stateful terminal per slot: a tmux session living inside the slot's sandbox.

The tmux server is started by a command run in the slot, so it shares the slot's namespaces,
workspace and private /tmp (its socket lives there), and a reset kills it with everything
else. Actions mirror the seed's ``tmux`` tool: ``start``, ``send_keys``, ``capture``, ``stop``,
plus ``run``, which types a command into the persistent shell (so ``cd`` and exported variables
persist between calls), waits for it with ``tmux wait-for`` (no polling), and returns its
output and exit code via a marker line. Every answer carries only the output produced since
the previous call.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from .._http import HTTPError
from ._runtime import SlotRuntime

__all__ = ["ACTIONS", "terminal_action"]

ACTIONS = ("start", "send_keys", "capture", "stop", "run")
_SOCK = "/tmp/.structenv-tmux"
_T = f'tmux -S "{_SOCK}"'
#: The tmux server must not carry the exec tag of the command that started it, or cancelling
#: that command would take the terminal down with it; a reset still kills it.
_START = (
    f"{_T} has-session -t main 2>/dev/null || "
    f'env -u STRUCTENV_EXEC_TAG PS1="$ " {_T} -f /dev/null new-session -d -s main '
    '-x "$SE_W" -y "$SE_H" "exec bash --noprofile --norc -i" && '
    f"{_T} set-option -g history-limit 100000 >/dev/null"
)
_CAPTURE = f"{_T} capture-pane -p -J -t main -S - -E -"
#: kill-server only signals the server; wait (bounded) until it and its panes are gone, so
#: "stop" returning means no terminal process is left in the slot.
_STOP = (
    f"{_T} kill-server 2>/dev/null; "
    "for _ in $(seq 200); do pgrep -x tmux >/dev/null || exit 0; sleep 0.01; done; "
    "pkill -KILL -x tmux; true"
)


async def _tmux(rt: SlotRuntime, script: str, env: dict[str, str], limit: float) -> Any:
    result = await rt.terminal_call(script, env=env, limit=limit)
    if result.error is not None:
        raise HTTPError(503, "slot_broken", result.error)
    return result


async def _new_output(rt: SlotRuntime) -> str:
    result = await _tmux(rt, _CAPTURE, {}, 10.0)
    if result.exit_code != 0:
        raise HTTPError(409, "terminal_not_started", "no terminal session; use action=start")
    lines = result.stdout.decode(errors="replace").rstrip("\n ").split("\n")
    consumed = int(rt.terminal_state.get("consumed", 0))
    if consumed > len(lines):  # history was trimmed: resynchronise
        consumed = 0
    # The last line is the live prompt line; it is shown again next time it grows.
    rt.terminal_state["consumed"] = max(len(lines) - 1, 0)
    return "\n".join(lines[consumed:])


async def terminal_action(rt: SlotRuntime, args: dict[str, Any]) -> dict[str, Any]:
    """Perform one terminal action for a slot and return its JSON answer.

    Cancellation: the tmux client command is killed; the terminal itself keeps running.
    """
    action = args.get("action")
    if action not in ACTIONS:
        raise HTTPError(400, "bad_request", f"action must be one of {ACTIONS}")
    if action == "start":
        width = int(args.get("width", 200))
        height = int(args.get("height", 50))
        env = {"SE_W": str(max(20, min(width, 1000))), "SE_H": str(max(5, min(height, 500)))}
        result = await _tmux(rt, _START, env, 10.0)
        if result.exit_code != 0:
            raise HTTPError(500, "terminal_failed", result.stderr.decode(errors="replace"))
        return {"output": await _new_output(rt)}
    if action == "stop":
        await _tmux(rt, _STOP, {}, 10.0)
        rt.terminal_state.clear()
        return {"output": ""}
    if action == "capture":
        await _tmux(rt, _START, {"SE_W": "200", "SE_H": "50"}, 10.0)
        return {"output": await _new_output(rt)}
    if action == "send_keys":
        keys = args.get("keys")
        if not isinstance(keys, str) or "\0" in keys:
            raise HTTPError(400, "bad_request", "keys must be a string without NUL")
        literal = bool(args.get("literal", True))
        script = f'{_START} && {_T} send-keys -t main {"-l " if literal else ""}-- "$SE_KEYS"'
        if args.get("enter", True):
            script += f" && {_T} send-keys -t main Enter"
        env = {"SE_KEYS": keys, "SE_W": "200", "SE_H": "50"}
        result = await _tmux(rt, script, env, 10.0)
        if result.exit_code != 0:
            raise HTTPError(409, "terminal_not_started", "no terminal session; use action=start")
        return {"output": ""}
    return await _run(rt, args)


async def _run(rt: SlotRuntime, args: dict[str, Any]) -> dict[str, Any]:
    command = args.get("command")
    if not isinstance(command, str) or "\n" in command or "\0" in command:
        raise HTTPError(400, "bad_request", "command must be a single-line string without NUL")
    timeout = float(args.get("timeout", 60.0))
    if not timeout > 0:
        raise HTTPError(400, "bad_request", "timeout must be > 0")
    await _tmux(rt, _START, {"SE_W": "200", "SE_H": "50"}, 10.0)
    await _new_output(rt)  # discard what came before this command
    nonce = secrets.token_hex(6)
    marker = f"__SE_RC_{nonce}"
    # The typed line contains the printf format, not ``marker=<digits>``, so only the
    # command's real completion matches the pattern below.
    sep = " " if command.rstrip().endswith("&") else "; "
    keys = f"{command}{sep}printf '\\n{marker}=%s__\\n' \"$?\"; {_T} wait-for -S se_{nonce}"
    # tmux reads the pane's output and handles ``wait-for -S`` in whatever order its event
    # loop sees them, so after the signal we also wait (inside the sandbox, bounded by the
    # same deadline) until the marker line has been rendered: then all output before it is.
    script = (
        f'{_T} send-keys -t main -l -- "$SE_KEYS" && {_T} send-keys -t main Enter && '
        f"{_T} wait-for se_{nonce} && "
        f'until {_CAPTURE} | grep -q "{marker}=[0-9]"; do sleep 0.005; done'
    )
    result = await rt.terminal_call(script, env={"SE_KEYS": keys}, limit=timeout)
    output = await _new_output(rt)
    match = re.search(re.escape(marker) + r"=(\d+)__", output)
    exit_code = int(match.group(1)) if match else None
    lines = [ln for ln in output.split("\n") if marker not in ln]
    return {
        "output": "\n".join(lines).strip("\n"),
        "exit_code": exit_code,
        "timed_out": bool(result.timed_out) and match is None,
    }
