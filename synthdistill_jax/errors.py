"""Errors that mean "the user asked for something that cannot run".

Entry points print their message as one line and exit non-zero; anything
else that escapes is a bug and keeps its traceback.
"""


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
