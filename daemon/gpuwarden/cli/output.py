"""Output helpers shared by every control command: JSON or rich tables, money, durations and
local times, confirmation prompts, and the mapping from errors to exit codes.

rich is imported only when something is drawn with it: on a terminal (colour, or tables that
fit its width). Written to a pipe or a file, text and tables are laid out here, and cells
carry their colour as `Styled` (which rich draws as its own Text when it does draw): rich's
import alone was a third of a `gpuwarden status` piped to a script.

A command body is `async def body(client: ControlClient, out: Out) -> int`; `run_command`
opens the client, runs it and turns Unreachable / RemoteError into the documented exit codes:
0 ok, 1 a domain error (message on stderr), 2 usage, 69 daemon unreachable (with a hint).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from gpuwarden.cli.client import (
    ControlClient,
    RemoteError,
    Unreachable,
    resolve_socket,
)

EX_OK = 0
EX_DOMAIN = 1
EX_USAGE = 2
EX_UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE
INVALID_PARAMS = -32602
METHOD_NOT_FOUND = -32601
PIPE_WIDTH = 250  # columns for tables written to a pipe or file

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

Body = Callable[[ControlClient, "Out"], Awaitable[int]]


EXIT_CODES = (
    "exit codes: 0 done, 1 the daemon refused (the reason is on stderr), 2 usage, "
    "69 the daemon is unreachable"
)


def command(
    sub: Any,
    name: str,
    help_text: str,
    func: Callable[[argparse.Namespace], int],
    *,
    epilog: str | None = None,
) -> argparse.ArgumentParser:
    """A control command's parser: its help, the exit codes, --json/--socket/--config."""
    p: argparse.ArgumentParser = sub.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"{epilog} {EXIT_CODES}." if epilog else f"{EXIT_CODES}.",
    )
    add_common(p)
    p.set_defaults(func=func)
    return p


def positive(kind: type[float] | type[int]) -> Callable[[str], float | int]:
    """An argparse type: a number greater than 0."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be greater than 0")
        return value

    return parse


def add_common(p: argparse.ArgumentParser) -> None:
    """--json, --socket and --config: every control command takes them."""
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="control socket (default: $GPUWARDEN_SOCKET, the config's daemon.socket, "
        "or /run/gpuwarden/control.sock)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="config file to read the socket path from (default: $GPUWARDEN_CONFIG)",
    )


PLAIN_ROWS = 500  # longer tables are laid out without rich (see Out._plain_table)


class Styled:
    """Text in parts, each with a rich style name ("red", "bold red", "" for none): what a
    cell or a message carries without importing rich. rich draws it as a Text with the same
    parts (`__rich__`); the plain layout writes `plain`."""

    __slots__ = ("parts",)

    def __init__(self, text: str = "", style: str = "") -> None:
        self.parts = [(text, style)]

    def append(self, text: str, style: str = "") -> Styled:
        self.parts.append((text, style))
        return self

    @property
    def plain(self) -> str:
        return "".join(text for text, _ in self.parts)

    @property
    def style(self) -> str:
        """The style of the first part (the whole, unless parts were appended)."""
        return self.parts[0][1]

    def __str__(self) -> str:
        return self.plain

    def __rich__(self) -> Text:
        from rich.text import Text

        (first, base), *rest = self.parts
        text = Text(first, style=base)
        for part, style in rest:
            text.append(part, style=style or None)
        return text


class Out:
    """Where a command writes. Colour only when the stream is a terminal (rich decides,
    and honours NO_COLOR); JSON always goes out plain; a pipe or a file gets plain text
    laid out here, without importing rich."""

    def __init__(
        self,
        json_mode: bool = False,
        *,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
        width: int | None = None,
    ) -> None:
        self.json_mode = json_mode
        self._stdout = stdout or sys.stdout
        self._stderr = stderr or sys.stderr
        # As rich decides it: then rich draws; otherwise colour is off and we write plainly.
        self.is_terminal = _terminal(self._stdout)
        # Off a terminal rich would assume 80 columns and cut cells; a pipe gets whole rows.
        if width is None and not self.is_terminal:
            width = PIPE_WIDTH
        self._width = width
        self._console: Console | None = None
        self._err: Console | None = None

    @property
    def console(self) -> Console:
        """rich on stdout, made (and rich imported) on first use."""
        if self._console is None:
            # soft_wrap: messages are not broken into lines by rich; tables still fit the
            # width. markup=False: text from the daemon (details, labels) may hold
            # [brackets]; styling is done with Styled and rich's Text only.
            self._console = _console(self._stdout, self._width)
        return self._console

    @property
    def err(self) -> Console:
        """rich on stderr (errors, hints, prompts), made on first use."""
        if self._err is None:
            self._err = _console(self._stderr, None)
        return self._err

    @property
    def width(self) -> int:
        """Columns to lay a table out in: the terminal's, or the width given or PIPE_WIDTH."""
        if self.is_terminal:
            return self.console.width
        return self._width or PIPE_WIDTH

    @property
    def interactive(self) -> bool:
        """May we ask a question? Both stdin and the terminal we would ask on are ttys."""
        return _isatty(sys.stdin) and (_isatty(self._stdout) or _isatty(sys.stderr))

    def json(self, data: Any) -> None:
        self._stdout.write(json.dumps(data, indent=2, default=str) + "\n")
        self._stdout.flush()

    def print(self, *items: Any, style: str | None = None) -> None:
        if self.is_terminal:
            self.console.print(*items, style=style)
        else:  # what rich writes off a terminal: the text, no style, nothing wrapped
            self._stdout.write(" ".join(str(item) for item in items) + "\n")
            self._stdout.flush()

    def error(self, message: str) -> None:
        self._say(Styled(f"gpuwarden: {message}", style="red"))

    def warn(self, message: str) -> None:
        self._say(Styled(f"gpuwarden: warning: {message}", style="yellow"))

    def hint(self, message: str) -> None:
        self._say(Styled(f"hint: {message}", style="yellow"))

    def _say(self, line: Styled) -> None:
        """A line on stderr: styled by rich on a terminal; plain off one, as `print` does on
        stdout, so that a script's `status --json` imports no rich for its hint either."""
        if _terminal(self._stderr):
            self.err.print(line)
        else:
            self._stderr.write(line.plain + "\n")
            self._stderr.flush()

    def table(
        self,
        columns: Sequence[str],
        rows: Iterable[Sequence[Any]],
        *,
        totals: Sequence[Any] | None = None,
        title: str | None = None,
        right: Iterable[str] = (),
    ) -> None:
        """A table; cells may be str or Styled (for colour). `right` names right-aligned
        columns (numbers); `totals` is a last row set apart by a line."""
        align = set(right)
        rows = list(rows)
        if len(rows) > PLAIN_ROWS or not self.is_terminal:
            self._plain_table(columns, rows, totals, title, align)
            return
        from rich.table import Table

        t = Table(title=title, show_footer=totals is not None, box=None, pad_edge=False)
        for i, col in enumerate(columns):
            footer = totals[i] if totals is not None else ""
            t.add_column(
                col,
                justify="right" if col in align else "left",
                footer=footer if isinstance(footer, Styled) else str(footer),
                no_wrap=True,
            )
        for row in rows:
            t.add_row(*(c if isinstance(c, Styled) else str(c) for c in row))
        self.console.print(t)

    def _plain_table(
        self,
        columns: Sequence[str],
        rows: list[Sequence[Any]],
        totals: Sequence[Any] | None,
        title: str | None,
        align: set[str],
    ) -> None:
        """The same table without colour, laid out here: rich measures every cell of every
        row, which took seconds of CPU at 10,000 rows."""
        lines = [[str(c) for c in columns]]
        lines += [[str(c) for c in row] for row in rows]
        if totals is not None:
            lines.append([str(t) for t in totals])
        widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
        right = [col in align for col in columns]

        def render(cells: list[str]) -> str:
            return " ".join(
                c.rjust(w) if r else c.ljust(w)
                for c, w, r in zip(cells, widths, right, strict=True)
            ).rstrip()

        text = [title] if title else []
        text += [render(line) for line in lines]
        if totals is not None:  # the totals set apart by a line, as rich draws its footer
            text.insert(len(text) - 1, " ".join("-" * w for w in widths))
        self._stdout.write("\n".join(text) + "\n")
        self._stdout.flush()

    def confirm(self, question: str) -> bool:
        """Ask on the terminal; False when the answer is not yes, or on EOF (Ctrl-D).
        Ctrl-C raises KeyboardInterrupt at once, so the command stops before acting.

        The prompt runs inside asyncio.run, whose SIGINT handler only cancels the main task
        and lets the blocking read carry on: Ctrl-C would hang until Enter and the answer
        would still be read. Python's own handler, in force while we ask, interrupts the
        read itself."""
        with _interrupt_at_once():
            try:
                self.err.print(f"{question} [y/N] ", end="")
                answer = _read_answer(sys.stdin)
            except EOFError:
                self.err.print()  # the cursor is still on the prompt's line
                return False
            except KeyboardInterrupt:
                self.err.print()
                raise
        return answer.strip().lower() in ("y", "yes")


def _read_answer(stream: TextIO) -> str:
    """One line typed at the terminal; EOFError on Ctrl-D.

    input() blocks in read() and hears Ctrl-C only when the read fails with EINTR. A Ctrl-C
    typed just after the prompt appears can land before that read starts (Python only sets a
    flag then), and the answer would wait for Enter: seen under load, a prompt that ignored
    Ctrl-C. Waiting in short select() calls returns to Python between them, so the pending
    KeyboardInterrupt is raised within a tenth of a second either way."""
    fd = stream.fileno()
    while not select.select([fd], [], [], 0.1)[0]:
        pass
    # The terminal is in line mode: one read is one typed line, or b"" for Ctrl-D.
    data = os.read(fd, 4096)
    if not data:
        raise EOFError
    return data.decode(errors="replace")


@contextlib.contextmanager
def _interrupt_at_once() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in the main thread for the duration of the block."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread; no asyncio handler here either
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _console(stream: TextIO, width: int | None) -> Console:
    from rich.console import Console

    return Console(file=stream, highlight=False, soft_wrap=True, width=width, markup=False)


def _terminal(stream: Any) -> bool:
    """Whether rich would treat the stream as a terminal (and colour it): TTY_COMPATIBLE
    and FORCE_COLOR say so first, as rich reads them; else whether it is a tty."""
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    return _isatty(stream)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# --- formatting -----------------------------------------------------------------------------


def money(value: float | None) -> str:
    if value is None:
        return "-"
    if 0 < abs(value) < 0.01:
        return f"${value:.4f}"
    return f"${value:,.2f}"


def gigabytes(value: float | None) -> str:
    return "-" if value is None else f"{round(float(value), 1):g} GB"


def rate(value: float | None) -> str:
    return "-" if value is None else f"${value:,.3f}/h"


def duration(seconds: float | None) -> str:
    """1d 02h, 3h 05m, 12m 30s, 45s; '-' for None."""
    if seconds is None:
        return "-"
    secs = int(max(0.0, seconds))
    days, rem = divmod(secs, 86400)
    hours, rem = divmod(rem, 3600)
    mins, s = divmod(rem, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {mins:02d}m"
    if mins:
        return f"{mins}m {s:02d}s"
    return f"{s}s"


def parse_time(value: Any) -> datetime | None:
    """An ISO 8601 string (as the daemon sends) or a datetime, as aware UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def local_time(value: Any, *, with_date: bool = True) -> str:
    """A time in the user's local zone, for humans."""
    dt = parse_time(value)
    if dt is None:
        return "-"
    fmt = "%Y-%m-%d %H:%M:%S %Z" if with_date else "%H:%M:%S"
    return dt.astimezone().strftime(fmt)


def iso_utc(value: Any) -> str | None:
    """A time as ISO 8601 UTC, for JSON."""
    dt = parse_time(value)
    return None if dt is None else dt.astimezone(UTC).isoformat().replace("+00:00", "Z")


# --- running a command ------------------------------------------------------------------


def run_command(args: argparse.Namespace, body: Body, *, interrupted: int = 130) -> int:
    """Open a client on the resolved socket, run `body`, map errors to exit codes.
    Ctrl-C exits with `interrupted` (0 for a command that runs until stopped)."""
    out = Out(getattr(args, "json", False))
    path = resolve_socket(getattr(args, "socket", None), getattr(args, "config", None))

    async def go() -> int:
        async with ControlClient(path) as client:
            return await body(client, out)

    try:
        return asyncio.run(go())
    except Unreachable as exc:
        return unreachable(out, exc)
    except RemoteError as exc:
        return remote_error(out, exc)
    except KeyboardInterrupt:
        return interrupted


def unreachable(out: Out, exc: Unreachable) -> int:
    out.error(str(exc))
    out.hint(
        f"is the daemon running? Try 'systemctl status gpuwarden'. The socket path is "
        f"{exc.path}; pass --socket PATH or set GPUWARDEN_SOCKET if it lives elsewhere"
        + (
            " (or run as a member of the socket's group)"
            if exc.reason == "permission denied"
            else ""
        )
    )
    return EX_UNAVAILABLE


# What to do next, by the stable code of a refusal (error.data.code). The message says what
# went wrong; the hint says where to look or what to change.
HINTS = {
    "not_found": "'gpuwarden status' lists the live instances, 'gpuwarden jobs' the jobs",
    "ambiguous": "give more characters of the id; 'gpuwarden status' shows the full ids",
    "no_offer": "'gpuwarden offers' shows what is available; a higher --max-price or another "
    "--gpu may find one",
    "budget_exceeded": "'gpuwarden costs' shows the spend; the limits are budget.daily_limit "
    "and budget.monthly_limit in the config",
    "price_too_high": "the limit is budget.max_hourly_price in the config",
    "lease_max_exceeded": "a lease totals at most policy.lease_max; for longer work, launch "
    "a new instance when this one ends",
    "queue_paused": "fix the cause ('gpuwarden events' says what it was), then run "
    "'gpuwarden resume'",
    "provider_error": "the daemon's log has the provider's answer: journalctl -u gpuwarden",
    "timeout": "the daemon or a provider is slow; see journalctl -u gpuwarden",
    "invalid_spec": "'gpuwarden submit --help' lists what a job may ask for",
    "request_too_large": "a request may be at most 64 KiB; shorten the prompt",
}


def remote_error(out: Out, exc: RemoteError) -> int:
    if out.json_mode:
        out.json({"error": {"code": exc.code, "message": exc.message, "data": exc.data}})
    out.error(exc.message)
    hint = HINTS.get(exc.domain_code or "")
    if hint:
        out.hint(hint)
    if exc.code == INVALID_PARAMS:
        return EX_USAGE
    if exc.code == METHOD_NOT_FOUND:
        out.hint("the daemon does not know this command; is it older than this client?")
    return EX_DOMAIN
