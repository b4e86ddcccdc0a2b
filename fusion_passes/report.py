"""What the passes did to each graph: rewrites, refusals with their reasons, graphs before and after.

Every run of the fusion pass appends a ``GraphReport`` to the collector; ``fusion_passes.explain``
returns them, and ``MOE_FUSION_LOG=1`` (or configuring the ``moe_fusion`` logger) logs them during
ordinary compiles.
"""

from __future__ import annotations

import collections
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch.fx

logger = logging.getLogger("moe_fusion")
if os.environ.get("MOE_FUSION_LOG", "") not in ("", "0"):
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("[moe_fusion] %(message)s"))
    logger.addHandler(_handler)
    logger.setLevel(logging.DEBUG if os.environ["MOE_FUSION_LOG"] == "debug" else logging.INFO)


@dataclass
class Rewrite:
    pass_name: str
    location: str
    spelling: str
    params: dict[str, Any]

    def __str__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return f"[{self.pass_name}] {self.location}\n    spelling: {self.spelling}\n    params: {params}"


@dataclass
class Refusal:
    pass_name: str
    location: str
    reason: str

    def __str__(self) -> str:
        return f"[{self.pass_name}] REFUSED at {self.location}\n    reason: {self.reason}"


def op_counts(graph: torch.fx.Graph) -> collections.Counter:
    return collections.Counter(
        str(node.target) for node in graph.nodes if node.op == "call_function"
    )


@dataclass
class GraphReport:
    index: int
    rewrites: list[Rewrite] = field(default_factory=list)
    refusals: list[Refusal] = field(default_factory=list)
    graph_before: str = ""
    graph_after: str = ""
    ops_before: collections.Counter = field(default_factory=collections.Counter)
    ops_after: collections.Counter = field(default_factory=collections.Counter)

    def summary(self) -> str:
        lines = [f"graph {self.index}: {len(self.rewrites)} rewrite(s), {len(self.refusals)} refusal(s), "
                 f"{sum(self.ops_before.values())} -> {sum(self.ops_after.values())} ops"]
        lines += [str(r) for r in self.rewrites] + [str(r) for r in self.refusals]
        return "\n".join(lines)


@dataclass
class Report:
    graphs: list[GraphReport] = field(default_factory=list)

    @property
    def rewrites(self) -> list[Rewrite]:
        return [r for g in self.graphs for r in g.rewrites]

    @property
    def refusals(self) -> list[Refusal]:
        return [r for g in self.graphs for r in g.refusals]

    def count(self, pass_name: str) -> int:
        return sum(1 for r in self.rewrites if r.pass_name == pass_name)

    def tally(self) -> str:
        """The rewrites per pass and every refusal, for a benchmark's or a script's log."""
        per_pass = collections.Counter(r.pass_name for r in self.rewrites)
        counts = ", ".join(f"{name} {count}" for name, count in per_pass.items()) or "none"
        lines = [f"{len(self.graphs)} graph(s); rewrites: {counts}; {len(self.refusals)} refusal(s)"]
        return "\n".join(lines + [f"  {r}" for r in self.refusals])

    def op_count_table(self) -> str:
        before = sum((g.ops_before for g in self.graphs), collections.Counter())
        after = sum((g.ops_after for g in self.graphs), collections.Counter())
        names = sorted(set(before) | set(after), key=lambda n: (-(before[n] + after[n]), n))
        rows = [f"{'op':<48} {'before':>7} {'after':>7}"]
        rows += [f"{n:<48} {before[n]:>7} {after[n]:>7}" for n in names if before[n] != after[n]]
        rows.append(f"{'total':<48} {sum(before.values()):>7} {sum(after.values()):>7}")
        return "\n".join(rows)

    def __str__(self) -> str:
        if not self.graphs:
            return "moe_fusion: no graph went through the fusion pass"
        return "\n\n".join(g.summary() for g in self.graphs)


class ReportCollector:
    """Receives the GraphReports of every pass run (and logs them)."""

    def __init__(self) -> None:
        self.report = Report()
        self._next_index = 0

    def next_index(self) -> int:
        """The index of the next graph in the current report."""
        self._next_index += 1
        return self._next_index - 1

    def add(self, graph_report: GraphReport) -> None:
        self.report.graphs.append(graph_report)
        if graph_report.rewrites or graph_report.refusals:
            logger.info("%s", graph_report.summary())
        logger.debug("graph %d after the fusion pass:\n%s", graph_report.index, graph_report.graph_after)

    def take(self) -> Report:
        """The report so far; the collector starts a new one."""
        report, self.report, self._next_index = self.report, Report(), 0
        return report


collector = ReportCollector()
