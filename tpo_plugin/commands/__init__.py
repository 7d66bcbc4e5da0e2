"""`tpo-plugin` and its subcommands. Each module defines `add_arguments(parser)` and `run(args) -> int`."""

from pathlib import Path
from typing import Optional


def file_in_the_way(folder: Path) -> Optional[Path]:
    """The file that stands where ``folder`` or one of its parents should be, if any: creating ``folder`` there
    would fail with a bare ``FileExistsError`` or ``NotADirectoryError``, after the expensive work."""
    for path in (folder, *folder.parents):
        if path.exists():
            return None if path.is_dir() else path
    return None
