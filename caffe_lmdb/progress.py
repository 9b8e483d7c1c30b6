"""Progress bars: tqdm on stderr, shown only on a terminal unless the caller says otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int, desc: str, progress: bool | None, unit: str = "rec"):
    """A tqdm bar on stderr, shown only on a terminal unless `progress` says otherwise."""
    return tqdm(total=total, unit=unit, file=sys.stderr, desc=desc,
                disable=not (sys.stderr.isatty() if progress is None else progress))
