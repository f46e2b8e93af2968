"""How every `vlm-steer` command reports a bad input: one line on stderr and one exit code per kind.

Library errors name fields; a command passes `flags` (field -> its option) so the line names the
option the user typed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import typer
from rich.console import Console

from sae_modules.errors import ErrorKind, VlmSteerError

EXIT_CODES = {ErrorKind.INVALID: 2, ErrorKind.NOT_FOUND: 2, ErrorKind.UNAVAILABLE: 1}
IO_EXIT_CODE = 1
"""A file that could not be read or written although the input was valid."""


def fail(message: str, code: int, where: str | None = None) -> typer.Exit:
    """Print `error: where: message` on stderr and return the Exit to raise."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {f'{where}: ' if where else ''}{message}",
                                               highlight=False)
    return typer.Exit(code)


@contextmanager
def reported_errors(flags: Mapping[str, str] | None = None, io_action: str | None = None) -> Iterator[None]:
    """Turn a `VlmSteerError` (exit by kind) or an `OSError` (exit 1) into one line and an exit code.

    `io_action` says what the command was doing when a file operation failed ("could not write X")."""
    try:
        yield
    except VlmSteerError as err:
        where = (flags or {}).get(err.field or "", err.field)
        raise fail(str(err), EXIT_CODES[err.kind], where) from None
    except OSError as err:
        raise fail(str(err), IO_EXIT_CODE, io_action) from None
