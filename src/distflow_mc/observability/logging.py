"""One rank-aware logger. Rank 0 logs at the configured level; other ranks log errors only,
unless `trainer.log_all_ranks=true`. Every record carries its rank."""

from __future__ import annotations

import logging
import os

_state = {"all_ranks": False}


def current_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def log_all_ranks(enabled: bool) -> None:
    _state["all_ranks"] = enabled


class RankFilter(logging.Filter):
    """Tags records with `rank`; as a console filter also drops non-zero ranks' chatter.
    Installed by Hydra's job logging config (conf/hydra/job_logging/distflow.yaml)."""

    def __init__(self, console: bool = True) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = current_rank()
        if not self.console:
            return True
        if not getattr(record, "console", True):  # extra={"console": False}: files only
            return False
        return _state["all_ranks"] or record.rank == 0 or record.levelno >= logging.ERROR
