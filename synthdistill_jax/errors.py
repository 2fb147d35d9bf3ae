"""Errors that mean "the user asked for something that cannot run".

Entry points print their message as one line and exit non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
  """A config that cannot run; the message is one line for the user."""
