"""Task data of the shell-tasks env: small deterministic repos, their tests, reference solutions.

Each task is a tiny workspace (source files plus ``tests/test_*.py`` written in plain-assert
pytest style) and an instruction. A reference solution is the list of assistant turns that
solves it; steps that call tools carry a plausible *wrong* alternative (a buggy fix that
passes only some tests) which the scripted policy plays when it draws a mistake.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from ..testing import ReplayStep

__all__ = ["SHELL_TASKS", "ShellTask", "shell_task_solutions", "tool_call"]


def tool_call(name: str, **arguments: Any) -> str:
    """A Hermes ``<tool_call>`` block (the format the agent loop parses)."""
    return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"


@dataclasses.dataclass(frozen=True, slots=True)
class ShellTask:
    """One task of the shell-tasks env.

    Attributes:
        id: Stable identifier (also the scripted policy's task marker).
        instruction: What the agent is asked to do.
        files: Workspace files written before the agent starts (path -> text).
        solution: Reference assistant turns (the last one is the final answer).
    """

    id: str
    instruction: str
    files: Mapping[str, str]
    solution: tuple[ReplayStep, ...]

    @property
    def test_files(self) -> dict[str, str]:
        """The test files, restored before verification so edits to them do not count."""
        return {p: t for p, t in self.files.items() if p.startswith("tests/")}


_RUN_TESTS = ReplayStep(tool_call("terminal", command="sh run_tests.sh"))


def _fix(path: str, good: str, bad: str) -> ReplayStep:
    return ReplayStep(
        tool_call("write_file", path=path, content=good),
        wrong=tool_call("write_file", path=path, content=bad),
    )


SHELL_TASKS: tuple[ShellTask, ...] = (
    ShellTask(
        id="fix-add",
        instruction="The tests in tests/test_calc.py fail. Fix calc.py so that they pass.",
        files={
            "calc.py": "def add(a, b):\n    return a - b\n",
            "tests/test_calc.py": (
                "from calc import add\n\n\n"
                "def test_small():\n    assert add(2, 3) == 5\n\n\n"
                "def test_zero():\n    assert add(0, 0) == 0\n\n\n"
                "def test_negative():\n    assert add(-4, 1) == -3\n"
            ),
        },
        solution=(
            _fix(
                "calc.py",
                "def add(a, b):\n    return a + b\n",
                "def add(a, b):\n    return a * b\n",
            ),
            _RUN_TESTS,
            ReplayStep("Fixed add() in calc.py; all tests pass."),
        ),
    ),
    ShellTask(
        id="fix-fizzbuzz",
        instruction="fizzbuzz.py is buggy and tests/test_fizzbuzz.py fails. Fix fizzbuzz.py.",
        files={
            "fizzbuzz.py": (
                "def fizzbuzz(n):\n"
                "    if n % 3 == 0:\n        return 'Fizz'\n"
                "    if n % 5 == 0:\n        return 'Buzz'\n"
                "    if n % 15 == 0:\n        return 'FizzBuzz'\n"
                "    return str(n)\n"
            ),
            "tests/test_fizzbuzz.py": (
                "from fizzbuzz import fizzbuzz\n\n\n"
                "def test_number():\n    assert fizzbuzz(7) == '7'\n\n\n"
                "def test_fizz():\n    assert fizzbuzz(9) == 'Fizz'\n\n\n"
                "def test_buzz():\n    assert fizzbuzz(10) == 'Buzz'\n\n\n"
                "def test_fizzbuzz():\n    assert fizzbuzz(30) == 'FizzBuzz'\n"
            ),
        },
        solution=(
            _fix(
                "fizzbuzz.py",
                "def fizzbuzz(n):\n"
                "    if n % 15 == 0:\n        return 'FizzBuzz'\n"
                "    if n % 3 == 0:\n        return 'Fizz'\n"
                "    if n % 5 == 0:\n        return 'Buzz'\n"
                "    return str(n)\n",
                "def fizzbuzz(n):\n"
                "    if n % 15 == 0:\n        return 'FizzBuzz'\n"
                "    if n % 3 == 0:\n        return 'Fizz'\n"
                "    return str(n)\n",
            ),
            _RUN_TESTS,
            ReplayStep("The FizzBuzz case is now checked first; the tests pass."),
        ),
    ),
    ShellTask(
        id="make-greeting",
        instruction="Create the file greeting.txt containing exactly the line: Hello, structenv!",
        files={
            "tests/test_greeting.py": (
                "from pathlib import Path\n\n\n"
                "def test_exists():\n    assert Path('greeting.txt').is_file()\n\n\n"
                "def test_content():\n"
                "    assert Path('greeting.txt').read_text() == 'Hello, structenv!\\n'\n"
            ),
        },
        solution=(
            ReplayStep(
                tool_call("terminal", command="echo 'Hello, structenv!' > greeting.txt"),
                wrong=tool_call("terminal", command="echo 'Hello structenv' > greeting.txt"),
            ),
            _RUN_TESTS,
            ReplayStep("Created greeting.txt."),
        ),
    ),
    ShellTask(
        id="count-lines",
        instruction=(
            "Write the number of lines of data.txt, as a bare number followed by a newline, "
            "to count.txt."
        ),
        files={
            "data.txt": "".join(f"row {i}\n" for i in range(1, 18)),
            "tests/test_count.py": (
                "from pathlib import Path\n\n\n"
                "def test_exists():\n    assert Path('count.txt').is_file()\n\n\n"
                "def test_value():\n    assert Path('count.txt').read_text().strip() == '17'\n\n\n"
                "def test_format():\n    assert Path('count.txt').read_text() == '17\\n'\n"
            ),
        },
        solution=(
            ReplayStep(
                tool_call("terminal", command="wc -l < data.txt | tr -d ' ' > count.txt"),
                wrong=tool_call("terminal", command="wc -l data.txt > count.txt"),
            ),
            _RUN_TESTS,
            ReplayStep("count.txt holds the line count of data.txt."),
        ),
    ),
    ShellTask(
        id="fix-slugify",
        instruction="Make slug.py's slugify() pass tests/test_slug.py.",
        files={
            "slug.py": "def slugify(text):\n    return text.replace(' ', '-')\n",
            "tests/test_slug.py": (
                "from slug import slugify\n\n\n"
                "def test_spaces():\n    assert slugify('a b') == 'a-b'\n\n\n"
                "def test_lower():\n    assert slugify('Hello World') == 'hello-world'\n\n\n"
                "def test_strip():\n    assert slugify('  Padded Title ') == 'padded-title'\n\n\n"
                "def test_collapse():\n    assert slugify('a   b') == 'a-b'\n"
            ),
        },
        solution=(
            _fix(
                "slug.py",
                "def slugify(text):\n    return '-'.join(text.lower().split())\n",
                "def slugify(text):\n    return text.strip().lower().replace(' ', '-')\n",
            ),
            _RUN_TESTS,
            ReplayStep("slugify() lowercases, strips and joins words with dashes."),
        ),
    ),
    ShellTask(
        id="fix-parse-kv",
        instruction="parse_kv() in kv.py mishandles whitespace; make tests/test_kv.py pass.",
        files={
            "kv.py": (
                "def parse_kv(text):\n"
                "    out = {}\n"
                "    for part in text.split(';'):\n"
                "        key, value = part.split('=')\n"
                "        out[key] = value\n"
                "    return out\n"
            ),
            "tests/test_kv.py": (
                "from kv import parse_kv\n\n\n"
                "def test_plain():\n    assert parse_kv('a=1;b=2') == {'a': '1', 'b': '2'}\n\n\n"
                "def test_spaces():\n"
                "    assert parse_kv(' a = 1 ; b=2') == {'a': '1', 'b': '2'}\n\n\n"
                "def test_trailing():\n    assert parse_kv('a=1;') == {'a': '1'}\n"
            ),
        },
        solution=(
            _fix(
                "kv.py",
                "def parse_kv(text):\n"
                "    out = {}\n"
                "    for part in text.split(';'):\n"
                "        if not part.strip():\n            continue\n"
                "        key, value = part.split('=', 1)\n"
                "        out[key.strip()] = value.strip()\n"
                "    return out\n",
                "def parse_kv(text):\n"
                "    out = {}\n"
                "    for part in text.split(';'):\n"
                "        key, value = part.split('=', 1)\n"
                "        out[key.strip()] = value.strip()\n"
                "    return out\n",
            ),
            _RUN_TESTS,
            ReplayStep("parse_kv() strips whitespace and skips empty parts."),
        ),
    ),
)


def shell_task_solutions() -> dict[str, list[ReplayStep]]:
    """Task id -> reference solution, for :class:`~structenv.testing.ReplayScript`."""
    return {task.id: list(task.solution) for task in SHELL_TASKS}
