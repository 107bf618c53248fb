"""``structenv demo``: the shell-tasks env end to end, offline, in under a minute.

What runs, all on this machine with no GPU and no network:

* :class:`~structenv.backends.LocalBackend` sandbox hosts (bubblewrap-isolated slots);
* the scripted policy server on 127.0.0.1 (in-process): real HTTP, vLLM's ``/generate`` and
  ``/health``, replaying the tasks' reference solutions with seeded mistakes (a wrong fix, a
  malformed tool call the agent recovers from, giving up early) so scores vary;
* a tiny byte-level tokenizer, built on first use into ``~/.cache/structenv`` (or
  ``$STRUCTENV_CACHE_DIR``);
* :class:`~structenv.examples.shell_tasks.ShellTasksEnv` in atroposlib's ``process`` mode
  (programmatic: the env is constructed and ``process_manager()`` awaited), with atroposlib's
  ``ManagedServer`` tracking tokens, masks and logprobs across turns.

It writes the scored groups as JSONL plus structenv's HTML view of them (escaped, no script;
``structenv view FILE.jsonl`` renders any such file) into ``--out`` (default
``./structenv-out/``) and prints a summary::

    structenv demo                         # 6 groups of 4
    structenv demo --groups 2 --group-size 2 --out /tmp/demo
    structenv demo --example data-wrangling

It is ``structenv run MODULE:Env --offline`` (:mod:`structenv.adapters.atropos._run`) for the
shipped examples, with the demo's agent limits; every ``run`` flag works here too
(``--env.<field> VALUE`` included).

Against a real model: pass the endpoint and the model; the scripted server is then not
started. The tokenizer is the server's model's (vLLM's ``/v1/models`` says where the model
was loaded from; ``--tokenizer`` overrides it) and is checked against the server once::

    structenv demo --openai.base_url http://GPU-HOST:8000/v1 \\
        --openai.model_name NousResearch/Hermes-3-Llama-3.1-8B

What each server gives (``docs/design.md``, "Exact tokens from inference servers"): a stock
vLLM OpenAI server (``vllm serve``) has no ``/generate``, so prompts are rendered locally and
sent as token ids to ``/v1/completions``: exact tokens and logprobs. atroposlib's ``/generate``
server and SGLang go through atroposlib's ``ManagedServer``: exact tokens and logprobs. With
``--openai.server_type openai`` (any OpenAI-compatible endpoint) tokens are rebuilt from the
messages with the tokenizer's chat template and the groups carry no ``inference_logprobs``
(never placeholder values). The env's own Atropos CLI
(``python -m structenv.examples.shell_tasks serve|process ...``) takes every ``--env.*`` and
``--openai.*`` flag.

Exit status: 0 when every group was written; 1 with a one-line reason when inference keeps
failing (an endpoint that is down, a 404 on ``/generate``) or fewer groups were written.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

_EXAMPLES = ("shell-tasks", "data-wrangling", "swe", "swe-images")

#: The demo's limits (the examples' tasks are short).
_DEMO_FIELDS: dict[str, Any] = dict(
    max_token_length=16384,
    trajectory_timeout_s=120.0,
    agent_max_steps=8,
    agent_max_tokens=2048,
    backend="local",
)


def _parser() -> argparse.ArgumentParser:
    from .adapters.atropos._run import add_run_arguments

    parser = argparse.ArgumentParser(
        prog="structenv demo",
        description="Run the shell-tasks env end to end offline (sandboxes, scripted policy, "
        "atroposlib process mode) and write the scored groups.",
    )
    parser.add_argument("--example", choices=_EXAMPLES, default="shell-tasks")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="policy calls per trajectory (default 8)")  # fmt: skip
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="tokens per assistant turn (default 2048)")  # fmt: skip
    parser.add_argument(
        "--backend", choices=["local", "docker"], default=None,
        help="sandbox backend (default local)",
    )  # fmt: skip
    parser.add_argument(
        "--image",
        default=None,
        help="swe-images: the first task image (default: the sandbox image); the second is "
        "built from a Dockerfile on top of it",
    )
    add_run_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``structenv demo``; returns the exit status."""
    if importlib.util.find_spec("atroposlib") is None:
        print("structenv demo needs the atropos extra: pip install 'structenv[atropos]'")
        return 2
    from ._main import report_error
    from .adapters.atropos._run import RunOptions, apply_config_file, run_env, split_env_flags

    try:
        rest, fields = split_env_flags(list(sys.argv[1:] if argv is None else argv))
    except ValueError as exc:
        print(f"structenv demo: error: {exc}", file=sys.stderr)
        return 2
    args = _parser().parse_args(rest)
    if any(v is not None and v < 1 for v in (args.max_steps, args.max_tokens)):
        print("structenv demo: --max-steps and --max-tokens must be >= 1", file=sys.stderr)
        return 2
    env_cls: type[Any]
    # Flags given explicitly win over the --config file, which wins over the demo's defaults.
    explicit = {
        name: value
        for name, value in (
            ("agent_max_steps", args.max_steps),
            ("agent_max_tokens", args.max_tokens),
            ("backend", args.backend),
        )
        if value is not None
    }
    extra: dict[str, Any] = {}
    if args.example == "data-wrangling":
        from .examples.data_wrangling import DataWranglingEnv

        env_cls = DataWranglingEnv
    elif args.example in ("swe", "swe-images"):
        from .examples.swe_tasks import SweTasksEnv

        env_cls = SweTasksEnv
        if args.example == "swe-images":
            extra.update(_two_images(args.image, Path(args.out)))
    else:
        from .examples.shell_tasks import ShellTasksEnv

        env_cls = ShellTasksEnv
    try:
        apply_config_file(args, env_cls)
    except Exception as exc:
        return report_error(exc, prog="structenv demo", debug=args.debug)
    options = RunOptions(
        args,
        env_cls,
        offline=args.base_url is None,
        fields={**explicit, **extra, **fields},
        defaults=_DEMO_FIELDS,
        name=args.example,
        prog="structenv demo",
    )
    return run_env(options)


def _two_images(image: str | None, out: Path) -> dict[str, Any]:
    """swe-images: the sandbox image as one task image, and a second one built from a
    Dockerfile on top of it (no registry: both are local)."""
    from ._image import DEFAULT_TAG

    first = image or os.environ.get("STRUCTENV_TEST_IMAGE") or DEFAULT_TAG
    context = out.resolve() / "swe-image-b"  # a spec's paths are absolute; --out may not be
    context.mkdir(parents=True, exist_ok=True)
    dockerfile = context / "Dockerfile"
    dockerfile.write_text(f"FROM {first}\nENV SWE_IMAGE=b\nRUN echo b > /etc/swe-image\n")
    return {"images": [first], "dockerfiles": [str(dockerfile)]}


if __name__ == "__main__":
    sys.exit(main())
