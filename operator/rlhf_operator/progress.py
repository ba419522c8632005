"""What a local run shows a person: one progress bar per stage, events, a summary table."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from rlhf_operator import api
from rlhf_operator.planner import Event


class RunDisplay:
    """Rich progress bars fed by the run status that the planner computes."""

    def __init__(self, run: api.RLHFRun, console: Console | None = None) -> None:
        self.run = run
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<12}"),
            BarColumn(),
            TextColumn("{task.completed:>5.0f}/{task.total:<5.0f}"),
            TextColumn("{task.fields[detail]}"),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RunDisplay:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def event(self, event: Event) -> None:
        style = "red" if event.type == "Warning" else "cyan"
        self.progress.console.print(f"[{style}]{event.reason}[/]: {event.message}")

    def status(self, status: api.RunStatus) -> None:
        for stage in status.stages:
            if stage.phase == "Pending":
                continue
            metrics = stage.metrics or api.StageMetrics()
            if stage.name not in self.tasks:
                self.tasks[stage.name] = self.progress.add_task(
                    stage.name, total=metrics.total_steps or 1, stage=stage.name, detail=""
                )
            detail: str = stage.phase
            if metrics.loss is not None:
                detail += f"  loss {metrics.loss:.4f}"
            if metrics.reward is not None:
                detail += f"  reward {metrics.reward:.3f}"
            if metrics.kl is not None:
                detail += f"  kl {metrics.kl:.4f}"
            self.progress.update(
                self.tasks[stage.name],
                total=metrics.total_steps or 1,
                completed=metrics.step or 0,
                detail=detail,
            )

    def summary(
        self, status: api.RunStatus, status_file: Path, plots: Sequence[Path] = ()
    ) -> None:
        table = Table(title=f"RLHFRun {self.run.metadata.name}: {status.phase}")
        for column in ("stage", "type", "phase", "step", "loss", "reward", "kl", "output"):
            table.add_column(column)
        for stage in status.stages:
            m = stage.metrics or api.StageMetrics()
            table.add_row(
                stage.name,
                stage.type,
                stage.phase,
                f"{m.step}/{m.total_steps}" if m.step is not None else "-",
                _number(m.loss, 4),
                _number(m.reward, 3),
                _number(m.kl, 4),
                stage.output or stage.message or "-",
            )
        self.console.print(table)
        degraded = next((c for c in status.conditions if c.type == "Degraded"), None)
        if degraded is not None and degraded.status == "True":
            self.console.print(f"[red]{degraded.reason}[/]: {degraded.message}")
        for path in plots:
            self.console.print(f"Plot: {path}")
        self.console.print(f"Status: {status_file}")


def _number(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
