"""Errors that mean "the user asked for something that cannot run".

Entry points print their message as one line and exit non-zero; anything
else that escapes is a bug and keeps its traceback. Ctrl-C is the user's,
not a bug: `exit_on_ctrl_c` makes it one line and exit status 130.
"""

import functools
import sys

# The shell's status for a process ended by SIGINT (128 + 2).
INTERRUPTED_STATUS = 130


class ConfigError(ValueError):
  """A config that cannot run; the message is one line for the user."""


def check_choice(value: str, choices, field: str, note: str = "") -> str:
  """Returns `value` if it is one of `choices`.

  The one validator of every setting that picks among named choices (a
  method, a mode): the message names the field and every choice.

  Args:
    value: the setting.
    choices: the known values.
    field: the argument, attribute or config field to name.
    note: appended to the message, e.g. what 'auto' means.

  Returns:
    `value`.

  Raises:
    ValueError: `"<field> must be one of <choices>, got <value>"`.
  """
  if value not in choices:
    raise ValueError(
        f"{field} must be one of {', '.join(choices)}, got {value!r}{note}"
    )
  return value


def exit_on_ctrl_c(main):
  """Wraps a command's `main`: Ctrl-C is one line on stderr and exit 130.

  Args:
    main: the entry point.

  Returns:
    `main`, with `KeyboardInterrupt` turned into `SystemExit(130)`.
  """

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    try:
      return main(*args, **kwargs)
    except KeyboardInterrupt:
      print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_STATUS)

  return wrapped
