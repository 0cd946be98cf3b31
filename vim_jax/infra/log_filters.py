"""The log filter every command installs: our own progress lines and every library's warnings
stay, the libraries' INFO chatter goes (orbax alone logs several lines per checkpoint save and
restore, e.g. `Closing _NonBlockingMetadataStore`)."""

from __future__ import annotations

import logging

from absl import logging as absl_logging

CHATTY_LIBRARIES = ("/orbax/",)


class QuietLibraries(logging.Filter):
  """Drops records below WARNING whose source file lies in a chatty library."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or not any(
        part in record.pathname for part in CHATTY_LIBRARIES
    )


def install():
  """Adds the filter to absl's handler (call it first thing in a command's main)."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())
