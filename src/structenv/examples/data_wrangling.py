"""DataWranglingEnv: transform an input file into an output file; scored by comparing outputs.

A different kind of task than :mod:`~structenv.examples.shell_tasks`: nothing is executed for
scoring. Each task ships an input file (CSV or text) and asks for a JSON output. After the
agent finishes, :meth:`DataWranglingEnv.verify_and_score_trajectory` reads the produced file
out of the same slot and compares it with the expected result computed on the host from the
same input: the score is the fraction of expected entries that match (0.0 for a missing or
unparsable file), so partial solutions get partial credit.

Run it like the shell-tasks env (``python -m structenv.examples.data_wrangling process ...``);
:func:`data_wrangling_solutions` holds reference solutions for the scripted policy server.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import io
import itertools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

from .. import ConfigError
from ..adapters import ExecTool
from ..adapters.atropos import AgentEnv, AgentEnvConfig, APIServerConfig
from ..agent import AgentResult, AgentTask
from ..testing import ReplayStep, task_marker
from ._shell_data import tool_call

__all__ = [
    "DATA_TASKS",
    "DataTask",
    "DataWranglingEnv",
    "data_wrangling_solutions",
    "main",
    "score_output",
]

log = logging.getLogger("structenv.examples.data_wrangling")

SYSTEM_PROMPT = (
    "You are a data engineer working in a sandboxed Linux workspace. Use the tools to read "
    "the input, write and run a script (python3 is available), and produce the requested "
    "output file. When the file is written, reply with a short summary and no tool call."
)

_PEOPLE = (
    "name,age,city\nAda,36,London\nBo,17,Oslo\nCy,18,Lima\nDee,52,Oslo\nEd,9,Rome\n"
    "Flo,18,Rome\nGus,71,Lima\n"
)
_SALES = (
    "category,amount\nbooks,12.50\ntoys,7.25\nbooks,3.00\nfood,4.75\ntoys,2.75\n"
    "food,10.00\nbooks,1.50\n"
)
_TEXT = "the cat sat on the mat\nthe dog sat\non the log the end\n"


def _adults(data: str) -> Any:
    rows = csv.DictReader(io.StringIO(data))
    return sorted(r["name"] for r in rows if int(r["age"]) >= 18)


def _totals(data: str) -> Any:
    totals: dict[str, float] = collections.defaultdict(float)
    for row in csv.DictReader(io.StringIO(data)):
        totals[row["category"]] += float(row["amount"])
    return {k: round(v, 2) for k, v in sorted(totals.items())}


def _word_counts(data: str) -> Any:
    return dict(collections.Counter(data.split()).most_common(3))


@dataclasses.dataclass(frozen=True, slots=True)
class DataTask:
    """One transformation task.

    Attributes:
        id: Stable identifier (also the scripted policy's task marker).
        instruction: What to produce.
        input_path: Input file in the workspace.
        input_data: Its contents.
        output_path: The JSON file the agent must write.
        expected: Computes the expected JSON value from the input on the host.
        solution: Reference assistant turns for the scripted policy.
    """

    id: str
    instruction: str
    input_path: str
    input_data: str
    output_path: str
    expected: Callable[[str], Any]
    solution: tuple[ReplayStep, ...]


def _script_steps(good: str, bad: str, done: str) -> tuple[ReplayStep, ...]:
    return (
        ReplayStep(
            tool_call("write_file", path="solve.py", content=good),
            wrong=tool_call("write_file", path="solve.py", content=bad),
        ),
        ReplayStep(tool_call("terminal", command="python3 solve.py")),
        ReplayStep(done),
    )


DATA_TASKS: tuple[DataTask, ...] = (
    DataTask(
        id="adults",
        instruction=(
            "people.csv lists people with their age. Write adults.json: a JSON list of the "
            "names of everyone aged 18 or more, sorted alphabetically."
        ),
        input_path="people.csv",
        input_data=_PEOPLE,
        output_path="adults.json",
        expected=_adults,
        solution=_script_steps(
            "import csv, json\nrows = csv.DictReader(open('people.csv'))\n"
            "names = sorted(r['name'] for r in rows if int(r['age']) >= 18)\n"
            "json.dump(names, open('adults.json', 'w'))\n",
            "import csv, json\nrows = csv.DictReader(open('people.csv'))\n"
            "names = sorted(r['name'] for r in rows if int(r['age']) > 18)\n"
            "json.dump(names, open('adults.json', 'w'))\n",
            "Wrote adults.json.",
        ),
    ),
    DataTask(
        id="sales-totals",
        instruction=(
            "sales.csv has one sale per line. Write totals.json: a JSON object mapping each "
            "category to the sum of its amounts, rounded to 2 decimals."
        ),
        input_path="sales.csv",
        input_data=_SALES,
        output_path="totals.json",
        expected=_totals,
        solution=_script_steps(
            "import csv, json, collections\nt = collections.defaultdict(float)\n"
            "for r in csv.DictReader(open('sales.csv')):\n"
            "    t[r['category']] += float(r['amount'])\n"
            "json.dump({k: round(v, 2) for k, v in t.items()}, open('totals.json', 'w'))\n",
            "import csv, json\nt = {}\n"
            "for r in csv.DictReader(open('sales.csv')):\n"
            "    t[r['category']] = float(r['amount'])\n"
            "json.dump(t, open('totals.json', 'w'))\n",
            "Wrote totals.json.",
        ),
    ),
    DataTask(
        id="top-words",
        instruction=(
            "Write top_words.json: a JSON object with the 3 most frequent words of text.txt "
            "(split on whitespace) mapped to their counts."
        ),
        input_path="text.txt",
        input_data=_TEXT,
        output_path="top_words.json",
        expected=_word_counts,
        solution=_script_steps(
            "import collections, json\nwords = open('text.txt').read().split()\n"
            "json.dump(dict(collections.Counter(words).most_common(3)), "
            "open('top_words.json', 'w'))\n",
            "import collections, json\nwords = open('text.txt').readline().split()\n"
            "json.dump(dict(collections.Counter(words).most_common(3)), "
            "open('top_words.json', 'w'))\n",
            "Wrote top_words.json.",
        ),
    ),
)


def data_wrangling_solutions() -> dict[str, list[ReplayStep]]:
    """Task id -> reference solution, for :class:`~structenv.testing.ReplayScript`."""
    return {task.id: list(task.solution) for task in DATA_TASKS}


def score_output(expected: Any, produced: bytes) -> float:
    """Fraction of expected entries matched by the produced JSON (0.0 if not JSON).

    Lists are compared position by position, objects key by key (numbers with a 1e-6
    tolerance); an output with extra entries loses the share they displace.
    """
    try:
        got = json.loads(produced)
    except ValueError:
        return 0.0

    def same(a: Any, b: Any) -> bool:
        if isinstance(a, int | float) and isinstance(b, int | float):
            return abs(float(a) - float(b)) <= 1e-6
        return bool(a == b)

    if isinstance(expected, dict):
        if not isinstance(got, dict) or not expected:
            return 0.0
        hits = sum(k in got and same(v, got[k]) for k, v in expected.items())
        return hits / max(len(expected), len(got))
    if isinstance(expected, list):
        if not isinstance(got, list) or not expected:
            return 0.0
        hits = sum(same(a, b) for a, b in zip(expected, got, strict=False))
        return hits / max(len(expected), len(got))
    return 1.0 if same(expected, got) else 0.0


class DataWranglingEnv(AgentEnv):
    """File transformations scored by comparing the produced JSON with the expected one."""

    name = "structenv_data_wrangling"
    env_config_cls = AgentEnvConfig

    def __init__(
        self,
        config: AgentEnvConfig,
        server_configs: list[APIServerConfig],
        slurm: bool = False,
        testing: bool = False,
    ) -> None:
        if not DATA_TASKS:  # pragma: no cover - data is static
            raise ConfigError("no tasks")
        self.tasks = {t.id: t for t in DATA_TASKS}
        super().__init__(config, server_configs, slurm=slurm, testing=testing)
        self._items = itertools.cycle(list(self.tasks))

    @classmethod
    def offline_solutions(cls, config: AgentEnvConfig) -> dict[str, list[ReplayStep]]:
        """The reference solutions (``structenv run ...:DataWranglingEnv --offline``)."""
        del config
        return data_wrangling_solutions()

    async def get_next_item(self) -> str:
        """The next task id (cycling in order).

        Cancellation: nothing to undo.
        """
        return next(self._items)

    def build_task(self, item: Any) -> AgentTask:
        task = self.tasks[str(item)]
        prompt = f"{task.instruction}\n\n{task_marker(task.id)}"
        return AgentTask(prompt=prompt, system=SYSTEM_PROMPT, id=task.id)

    async def setup_trajectory_workspace(
        self, item: Any, *, trajectory_id: str, exec_tool: ExecTool
    ) -> None:
        """Write the task's input file into the slot.

        Cancellation: the slot is released and not reused.
        """
        task = self.tasks[str(item)]
        await exec_tool.write_file(task.input_path, task.input_data)

    async def verify_and_score_trajectory(
        self, item: Any, result: AgentResult, *, trajectory_id: str, exec_tool: ExecTool
    ) -> float:
        """Read the produced file from the slot and compare it with the expected output.

        Cancellation: the slot is released and not reused.
        """
        task = self.tasks[str(item)]
        try:
            produced = await exec_tool.read_file(task.output_path, max_bytes=1 << 20)
        except (OSError, ValueError):
            return 0.0
        return score_output(task.expected(task.input_data), produced)


def main(argv: list[str] | None = None) -> int:
    """Atropos CLI of this env (``serve`` / ``process`` / ``evaluate``)."""
    return DataWranglingEnv.cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
