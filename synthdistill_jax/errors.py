"""Errors that mean "the user asked for something that cannot run".

Entry points print their message as one line and exit non-zero; anything
else that escapes is a bug and keeps its traceback. Ctrl-C is the user's,
not a bug: `exit_on_ctrl_c` makes it one line and exit status 130.
"""

import _thread
import argparse
import functools
import signal
import sys
import threading

# The shell's status for a process ended by SIGINT (128 + 2).
INTERRUPTED_STATUS = 130


class ConfigError(ValueError):
  """A config that cannot run; the message is one line for the user."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse for the tools: a usage mistake is one line, exit status 2.

  argparse prints its usage block (3-4 lines) above the message; the
  message already names the argument, and `--help` has the rest.
  """

  def error(self, message: str):
    self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


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


def _is_orbax_closed_loop_callback(unraisable) -> bool:
  """Whether an unraisable is a write callback that outlived orbax's loop.

  orbax runs each checkpoint write on an asyncio loop of its own and closes
  it when a write fails (a full disk); tensorstore's callbacks for the
  writes still in flight then land on the closed loop: one 5-line
  traceback each, 56 to 152 for the demo's state. The failed write itself
  is reported (`train.WriteFailed`).
  """
  return (
      unraisable.object is None
      and unraisable.exc_type is RuntimeError
      and str(unraisable.exc_value) == "Event loop is closed"
  )


def _unraisable_hook(unraisable) -> None:
  """`sys.unraisablehook`: a swallowed Ctrl-C delivered again; less noise.

  Python raises Ctrl-C's `KeyboardInterrupt` wherever the main thread is;
  inside a weakref callback or a `__del__` (a garbage collection at that
  moment) it cannot propagate: Python prints "Exception ignored in ...",
  a traceback, and goes on as if no key was pressed. Delivered again, it
  is raised at the next Python line of the main thread instead: from a
  timer thread once this hook has returned (raised in the hook it would be
  swallowed again; landing in a finaliser again, it comes back here).
  Other unraisables go to the previous hook, but for
  `_is_orbax_closed_loop_callback`.
  """
  if issubclass(unraisable.exc_type, KeyboardInterrupt):
    timer = threading.Timer(_REDELIVERY_DELAY_S, _thread.interrupt_main)
    timer.daemon = True
    timer.start()
    return
  if _is_orbax_closed_loop_callback(unraisable):
    return
  _previous_unraisablehook(unraisable)


_previous_unraisablehook = sys.unraisablehook
# Long enough for the main thread to leave the finaliser and this hook.
_REDELIVERY_DELAY_S = 0.05


def install_unraisable_hook() -> None:
  """Installs `_unraisable_hook` (once; it passes others to the previous)."""
  global _previous_unraisablehook
  if sys.unraisablehook is not _unraisable_hook:
    _previous_unraisablehook = sys.unraisablehook
    sys.unraisablehook = _unraisable_hook


def ignore_further_ctrl_c() -> None:
  """Ignores Ctrl-C from now on: for a command that is stopping for one.

  Another Ctrl-C (or one delivered again) could only interrupt the exit
  itself, into a traceback or a death by SIGINT instead of status 130.
  Python is also made to forget the one just caught: when a Ctrl-C lands
  in code run from a string (`exec` and `eval` of text: dataclasses and
  Flax build their `__init__` that way while the networks are built),
  CPython marks it unhandled even once caught, and `python -m` then
  ends in a death by SIGINT (status -2) instead of the status asked for
  (seen once in CI). Each string evaluation resets that mark first.
  """
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
  exec("pass")  # pylint: disable=exec-used


def exit_on_ctrl_c(main):
  """Wraps a command's `main`: Ctrl-C is one line on stderr and exit 130.

  Args:
    main: the entry point.

  Returns:
    `main`, with `KeyboardInterrupt` turned into `SystemExit(130)` (also
    one that Python raised in a finaliser: `install_unraisable_hook`),
    after which SIGINT is ignored.
  """

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    install_unraisable_hook()
    try:
      return main(*args, **kwargs)
    except KeyboardInterrupt:
      ignore_further_ctrl_c()
      print("\ninterrupted (Ctrl-C)", file=sys.stderr, flush=True)
      sys.exit(INTERRUPTED_STATUS)

  return wrapped
