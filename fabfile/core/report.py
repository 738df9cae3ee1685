"""What the operator sees (rich console: progress, per-host results, a recap)
and the per-run log file with every command, its host, output and timing."""

from __future__ import annotations

import datetime as dt
import threading
from collections import Counter, defaultdict
from pathlib import Path

# rich (~0.1 s to import) is loaded when a report is made, not when the tasks
# are listed: `inv --list` stays fast.

LOG_DIR = Path(__file__).resolve().parents[2] / "logs"

STYLE = {"ok": "green", "changed": "yellow", "failed": "bold red", "skipped": "dim", "would change": "cyan"}


class Report:
    def __init__(self, title: str, mask=lambda s: s, log_dir: Path = LOG_DIR, file=None):
        from rich.console import Console  # lazy: see the top of this module

        self.title = title
        self.console = Console(highlight=False, soft_wrap=True, file=file)
        # Steps, per-host results and notes go to the log only (a task that
        # prints one table of its own, `inv status`); errors and tables still show.
        self.quiet = False
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.changes: list[tuple[str, str]] = []
        self._mask = mask
        self._lock = threading.Lock()
        self.started = dt.datetime.now()
        log_dir.mkdir(parents=True, exist_ok=True)
        stamp = self.started.strftime("%Y%m%d-%H%M%S-%f")
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in title)
        self.log_path = log_dir / f"{stamp}-{safe}.log"
        self._log = self.log_path.open("a", encoding="utf-8")
        self.log(f"# {title} started {self.started.isoformat(timespec='seconds')}")

    # --- log file -----------------------------------------------------------

    def log(self, text: str) -> None:
        with self._lock:
            self._log.write(self._mask(text).rstrip("\n") + "\n")
            self._log.flush()

    def command(self, host: str, cmd: str, result, seconds: float, *, hide_cmd: bool = False) -> None:
        shown = "<hidden: contains input>" if hide_cmd else cmd
        lines = [f"[{host}] $ {shown}", f"[{host}] exit {result.exited} in {seconds:.2f}s"]
        for stream in ("stdout", "stderr"):
            text = getattr(result, stream, "") or ""
            if text.strip():
                lines += [f"[{host}] {stream}: {line}" for line in text.rstrip().splitlines()]
        self.log("\n".join(lines))

    # --- console ------------------------------------------------------------

    def step(self, title: str, hosts: list[str]) -> None:
        if not self.quiet:
            self.console.print(f"[bold]== {title}[/] [dim]({', '.join(hosts)})[/]")
        # the run's clock in the log: which steps overlapped, where a long run waited
        self.log(f"== {title} on {', '.join(hosts)} (at +{self.elapsed():.1f}s)")

    def elapsed(self) -> float:
        return (dt.datetime.now() - self.started).total_seconds()

    def result(self, host: str, status: str, message: str) -> None:
        message = self._mask(message)
        with self._lock:
            self.counts[host][status] += 1
            if status in ("changed", "would change"):
                self.changes.append((host, message))
        if not self.quiet:
            self.console.print(f"  [{STYLE.get(status, '')}]{status:>8}[/] {host}: {_escape(message)}", markup=True)
        self.log(f"[{host}] {status}: {message}")

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"  [dim]{_escape(self._mask(message))}[/]")
        self.log(message)

    def diff(self, host: str, text: str) -> None:
        text = self._mask(text)
        for line in text.splitlines():
            style = "green" if line.startswith("+") else "red" if line.startswith("-") else "dim"
            self.console.print(f"    [{style}]{_escape(line)}[/]")
        self.log(f"[{host}] diff:\n{text}")

    def table(self, table) -> None:
        """A rich table; off a terminal (logs, CI, tests) at its full width, not 80 columns."""
        if self.console.is_terminal:
            self.console.print(table)
        else:
            from rich.console import Console  # lazy: see the top of this module

            Console(highlight=False, width=160, file=self.console.file).print(table)

    def to_stderr(self) -> None:
        """The console (progress, tables, errors) on standard error: a task whose
        standard output is data for scripts (`inv status --json`) keeps it clean."""
        import sys

        self.console.file = sys.stderr

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/] {_escape(self._mask(message))}")
        self.log(f"error: {message}")

    @property
    def failed(self) -> bool:
        return any(c["failed"] for c in self.counts.values())

    def recap(self, stopped: str | None = None) -> None:
        """The table per host and one summary line; ``stopped``: the error that
        ended the run early (the summary then says so, never "nothing to do")."""
        from rich.table import Table  # lazy: see the top of this module

        took = (dt.datetime.now() - self.started).total_seconds()
        table = Table(title=f"Recap: {self.title} ({took:.1f}s)", title_justify="left")
        for col in ("host", "ok", "changed", "failed"):
            table.add_column(col, justify="left" if col == "host" else "right")
        total = Counter()
        for host in sorted(self.counts):
            c = self.counts[host]
            changed = c["changed"] + c["would change"]
            total.update(ok=c["ok"], changed=changed, failed=c["failed"])
            table.add_row(host, str(c["ok"]), _hl(changed, "yellow"), _hl(c["failed"], "bold red"))
        self.console.print(table)
        verb = "would change" if any(c["would change"] for c in self.counts.values()) else "changed"
        summary = f"{total['ok']} ok, {total['changed']} {verb}, {total['failed']} failed on {len(self.counts)} hosts"
        if stopped:
            summary += f"; stopped early: {stopped.splitlines()[0]}"
        elif not total["changed"] and not total["failed"]:
            summary += ": nothing to do, everything already as it should be"
        self.console.print(summary)
        self.console.print(f"[dim]log: {self.log_path}[/]")
        self.log(f"# recap: {summary} in {took:.1f}s")

    def end_readonly(self) -> None:
        """The end of a read-only task (`@runbook(readonly=True)`): what it printed
        is its answer, so no recap table and no ok/changed counts; only the hosts
        that failed (when any) and where the log is."""
        took = (dt.datetime.now() - self.started).total_seconds()
        failed = sorted(host for host, c in self.counts.items() if c["failed"])
        if failed:
            self.console.print(f"[bold red]failed on {len(failed)} host(s):[/] {', '.join(failed)}")
        self.console.print(f"[dim]log: {self.log_path}[/]")
        self.log(f"# end: read-only, {len(self.counts)} hosts read"
                 + (f", failed on {', '.join(failed)}" if failed else "") + f" in {took:.1f}s")

    def close(self) -> None:
        self._log.close()


def _hl(n: int, style: str) -> str:
    return f"[{style}]{n}[/]" if n else "0"


def _escape(text: str) -> str:
    return text.replace("[", r"\[")
