"""The progress bar of every long command (evaluate, extract, bench, train), on stderr.

    bar = progress_bar(len(videos), "evaluate", unit="video", enabled=not quiet)
    bar.update(1); bar.set_postfix_str("model 12s"); bar.write("evaluate: skipped a.mp4: ...")
    bar.close()

A tqdm bar when enabled, else (or where tqdm cannot be imported) a :class:`TextProgress` with the
same methods. ``write`` prints in every case: messages such as a skipped video are not progress,
and a bar that is off must not swallow them.
"""
from __future__ import annotations

import sys

__all__ = ["progress_bar", "TextProgress"]


def progress_bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0,
                 leave: bool = True):
    """A bar over ``total`` steps (``initial`` done already, as when a run resumes), named ``desc``;
    ``leave=False`` clears it when closed. Has ``update(n)``, ``set_postfix_str(s)``,
    ``write(s, file=None)`` and ``close()``."""
    if not enabled:
        return TextProgress(total, desc, initial=initial, show=False)
    try:
        from tqdm import tqdm  # a dependency, but the bar is not worth failing for
    except ImportError:
        return TextProgress(total, desc, initial=initial, show=True)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, file=sys.stderr,
                dynamic_ncols=True)


class TextProgress:
    """A bar without tqdm: with ``show``, ``\\r<desc> <done>/<total>`` rewritten on stderr at each
    update; without, silent. :meth:`write` prints either way."""

    def __init__(self, total: int, desc: str, *, initial: int = 0, show: bool = True):
        self.total, self.desc, self.n, self.show = total, desc, initial, show

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.show:
            print(f"\r{self.desc} {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def set_postfix_str(self, s: str) -> None:
        pass

    @staticmethod
    def write(s: str, file=None) -> None:
        print(s, file=file or sys.stderr)

    def close(self) -> None:
        if self.show:
            print(file=sys.stderr)
