"""The `--config` flags of every command, and their mistakes as one line.

Every command that takes an experiment config (`main`, `benchmark`, `aot`,
`tools/make_static_dataset.py`, `tools/compare_dtypes.py`) defines it with
`define_config` and parses its command line with `flags_parser`, so that
the same mistakes get the same answer everywhere: one line on stderr
naming the flag and the fix, exit status 1, before anything is built.

New keys are accepted only in the constructor-argument dicts
(`defaults.OPEN_FIELDS`: `--config.student.kwargs.remat=True` passes an
argument the config file does not mention); anywhere else a key the config
file does not have is a typo, refused with the closest existing name,
instead of being added to the config and ignored.
"""

import difflib
import os
import re
import sys
from typing import Callable

from absl import flags
import ml_collections
from ml_collections import config_flags

from synthdistill_jax import defaults

FLAGS = flags.FLAGS


def define_config(name: str, help_string: str):
  """Defines `--<name>=FILE[:ARG]` with `--<name>.a.b=value` overrides.

  Args:
    name: the flag's name ('config', or 'compare' for a second config).
    help_string: the flag's help.

  Returns:
    The flag holder; its value is `None` when the flag is not given.
  """
  # Unlocked while parsing so that the open dicts can gain keys; the other
  # new keys are refused by `flags_parser`, which then locks the config.
  return config_flags.DEFINE_config_file(
      name,
      None,
      help_string,
      lock_config=False,
      accept_new_attributes=True,
  )


def _unquoted(line: str) -> str:
  """A line of a repr'd message without the quote the repr left at an end.

  absl quotes a config file's traceback whole (`'...\\n...'`): its first
  and last lines keep a stray quote. A quote that closes one in the line
  (`... base 10: '3.5'`) is the message's own and stays.
  """
  line = line.strip().strip("\\").strip()
  for quote in "'\"":
    if line.count(quote) % 2:
      line = line[1:] if line.startswith(quote) else line.removesuffix(quote)
  return line


def one_line(error: BaseException) -> str:
  """An exception's message on one line (config files raise multi-line)."""
  text = str(error).replace("\\n", "\n")
  lines = [_unquoted(l) for l in text.splitlines() if l.strip()]
  if any(l.startswith("Traceback") for l in lines):
    # A config file raised: its own message is the last line.
    return re.sub(r"^\w+(Error|Exception): ", "", lines[-1])
  return "; ".join(lines) or type(error).__name__


def _unknown_field(error: BaseException, argv: list[str]) -> str | None:
  """`--config.a.b=...` under no existing field: which flag, and the hint."""
  text = str(error).replace("\\n", "\n")
  match = re.search(r"(\w+)\W*Did you mean \W*(\w+)", text)
  names = re.search(r"'(\w+)'", text)
  field = match.group(1) if match else (names.group(1) if names else None)
  if not field:
    return None
  flag = next((a.split("=", 1)[0] for a in argv if f".{field}" in a), None)
  if flag is None:
    return None
  hint = f" (did you mean {match.group(2)}?)" if match else ""
  return f"{flag}: no such config field{hint}"


def _message(error: BaseException) -> str:
  """A parsing error as one line that names its flag."""
  text = one_line(error)
  if isinstance(error, flags.Error) and "Traceback" not in str(error):
    return text  # absl's own message names the flag and the value.
  # A config file that raised (absl quotes its traceback), or an override
  # that failed inside ml_collections.
  named = re.match(r"flag --(\w+)[=.]", str(error))
  return f"--{named.group(1) if named else 'config'}: {text}"


def _config_flag_names() -> list[str]:
  """The names of the config-file flags this program defines."""
  file_parser = config_flags.config_flags.ConfigFileFlagParser
  return [
      name
      for name in FLAGS
      if FLAGS[name].name == name
      and isinstance(FLAGS[name].parser, file_parser)
  ]


def _given_path(name: str, argv: list[str]) -> str | None:
  """The config file named by `--<name>=FILE[:ARG]` (or `--<name> FILE`)."""
  path = None
  for i, arg in enumerate(argv):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      path = argv[i + 1]
    elif arg.startswith((f"--{name}=", f"-{name}=")):
      path = arg.split("=", 1)[1]
  return None if path is None else path.split(":", 1)[0]


def _new_field(
    base: ml_collections.ConfigDict, path: str
) -> tuple[str, str] | None:
  """`(field, hint)` when `path` adds a key outside the open dicts."""
  node, parts = base, path.split(".")
  for i, part in enumerate(parts):
    prefix = ".".join(parts[:i])
    if prefix in defaults.OPEN_FIELDS:
      return None  # Constructor arguments: any name.
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = list(node.keys()) if hasattr(node, "keys") else []
      close = difflib.get_close_matches(part, known, n=1)
      return path, f" (did you mean {close[0]}?)" if close else ""
    node = node[part]
  return None


def _check_config_flag(flag, fail: Callable[[str], None]) -> None:
  """Checks a config flag that was given; then locks its config."""
  try:
    config = flag.value
    # The file as written, without the overrides: which keys it has.
    base = flag.parser.parse(flag.config_filename)
  except Exception as e:  # pylint: disable=broad-except
    # A config file that raises, or returns something else than a config.
    fail(f"--{flag.name}: {one_line(e)}")
  if not isinstance(config, ml_collections.ConfigDict):
    return  # Checked by the command (`experiment.check_config`).
  for path in config_flags.get_override_values(flag):
    if found := _new_field(base, path):
      field, hint = found
      fail(f"--{flag.name}.{field}: no such config field{hint}")
  config.lock()  # A key added by mistake in code is an error too.


def flags_parser(command: str = "") -> Callable[[list[str]], list[str]]:
  """absl's `flags_parser` for `app.run`, with one-line mistakes.

  Args:
    command: the name the messages start with ("benchmark" prints
      `benchmark: error: ...`); empty for `error: ...`.

  Returns:
    A function of the command line that parses the flags and returns the
    arguments absl leaves over; on a mistake it prints one line and exits
    with status 1.
  """
  prefix = f"{command}: error: " if command else "error: "

  def fail(message: str) -> None:
    print(f"{prefix}{message}", file=sys.stderr)
    sys.exit(1)

  def parse(argv: list[str]) -> list[str]:
    config_names = _config_flag_names()
    # Before parsing: a missing file would surface as an error about the
    # first override, or as "Configuration is not available" later.
    for name in config_names:
      path = _given_path(name, argv)
      if path is not None and not os.path.isfile(path):
        fail(
            f"--{name}={path}: no such config file (e.g."
            " --config=configs/demo.py)"
        )
    try:
      rest = FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      fail(_unknown_field(e, argv) or _message(e))
    for name in config_names:
      if FLAGS[name].present:
        _check_config_flag(FLAGS[name], fail)
    return rest

  return parse
