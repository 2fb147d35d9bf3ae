"""Progress for long jobs: a tqdm bar on a terminal, log lines in a log file.

One helper for every command (evaluation, IJB, the static-set writer, the
benchmark, converters, ahead-of-time compiles):

  bar = progress.create(total=n, desc="lfw: embedding", unit="img")
  for batch in batches:
    ...
    bar.update(len(batch))
  bar.close()                       # or `with progress.create(...) as bar:`

  for batch in progress.count_batches(batches, total=n, desc="lfw: embedding"):
    ...                             # counts len(batch) after each batch

  with progress.phases("aot tinyfar_a", ("lowering", "compiling",
                                         "analysis")) as phase:
    with phase("lowering"):
      lowered = jitted.lower(*args)
    with phase("compiling"):
      compiled = lowered.compile()
    with phase("analysis"):
      cost = compiled.cost_analysis()
  phase.seconds                     # {'lowering': 3.1, 'compiling': 84.2, ...}

What appears depends on where the output goes (`mode`):

* 'bar': stderr is a terminal and this is the primary process
  (`jax.process_index() == 0`): tqdm's bar with count, rate and ETA.
* 'log': stderr is a file or a pipe: a plain line such as
  `lfw: embedding: 3000/12000 (25%) [00:30<01:30, 100.00img/s]` every
  `log_every_s` seconds (default: every 10 s in the first minute, then every
  minute) and, for a job that printed any, one when it ends (and, for
  phases, one per finished phase); never a bar fragment. A job shorter than
  one interval, or one that fails, prints no closing line, so an error
  message stays the last (often the only) line.
* 'off': `enabled=False` (the `--progress=false` flag, the config's
  `progress_bar`) or a process other than the primary: nothing at all.

Phases (no count to report, e.g. an XLA compile) tick on their own: the
clock keeps moving on a terminal and the log gets a line per interval.
"""

import contextlib
import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import tqdm

# Lines in 'log' mode: every 10 s during the first minute, then every minute;
# a fixed interval (seconds) from this environment variable if it is set.
_FIRST_MINUTE_EVERY_S = 10.0
_LATER_EVERY_S = 60.0
EVERY_S_ENV = "SYNTHDISTILL_PROGRESS_EVERY_S"


def log_interval(elapsed: float) -> float:
  """Seconds between log lines after `elapsed` seconds (see above)."""
  fixed = os.environ.get(EVERY_S_ENV)
  if fixed:
    return float(fixed)
  return _FIRST_MINUTE_EVERY_S if elapsed < 60.0 else _LATER_EVERY_S


# The format of a log line (tqdm's fields, no bar).
LOG_FORMAT = (
    "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%)"
    " [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
)
LOG_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"
FLAG_HELP = (
    "Progress bars with rate and ETA on a terminal, periodic log lines when"
    " output goes to a file; --progress=false for none."
)


def is_primary() -> bool:
  """Whether this is the process that reports progress (process 0)."""
  import jax  # pylint: disable=g-import-not-at-top

  return jax.process_index() == 0


def mode(enabled: bool = True, stream=None) -> str:
  """How progress is shown here: 'bar', 'log' or 'off'.

  Args:
    enabled: the user's switch (`--progress`, `config.progress_bar`).
    stream: where it would go (default `sys.stderr`).

  Returns:
    'off' when disabled or not the primary process, 'bar' on a terminal,
    'log' otherwise.
  """
  if not enabled or not is_primary():
    return "off"
  stream = sys.stderr if stream is None else stream
  isatty = getattr(stream, "isatty", None)
  return "bar" if isatty is not None and isatty() else "log"


class _NullFile:
  """A sink for tqdm's own writes in 'log' mode (we print whole lines)."""

  def write(self, text: str) -> int:
    return len(text)

  def flush(self) -> None:
    pass


class LogBar(tqdm.tqdm):
  """A tqdm that prints whole lines at an interval instead of a bar.

  Counting, rates, ETA, postfix and iteration are tqdm's; only `display`
  differs. Lines go to `stream` (default: `sys.stderr` at call time).
  """

  def __init__(
      self, *args, log_every_s: float | None = None, stream=None, **kw
  ):
    self._log_every_s = log_every_s
    self._stream = stream
    self._last_line_t = None
    self._quiet = False
    super().__init__(*args, file=_NullFile(), **kw)

  def _interval(self, elapsed: float) -> float:
    if self._log_every_s is not None:
      return self._log_every_s
    return log_interval(elapsed)

  def display(self, msg=None, pos=None):
    """Prints a line when due: every interval, and at a successful close."""
    del msg, pos  # One line per report; tqdm's cursor moves do not apply.
    start = getattr(self, "start_t", None)
    if start is None or self._quiet:
      return True  # tqdm's first display, from `__init__`: nothing done yet.
    now = time.time()
    if (
        self.disable
        and self._last_line_t is None
        and now - start < self._interval(0.0)
    ):
      # A job done within its first interval says nothing in a log: short
      # checks stay silent, so an error after them is the only line.
      return True
    if not self.disable:  # `close()` sets `disable` before its last display.
      if self.total is not None and self.n >= self.total:
        return True  # The closing line reports the end.
      since = now - (self._last_line_t or start)
      if since < self._interval(now - start):
        return True
    self._last_line_t = now
    fields = self.format_dict
    # tqdm knows the total only now when it comes from `len(iterable)`.
    fields["bar_format"] = (
        LOG_FORMAT if self.total is not None else LOG_FORMAT_NO_TOTAL
    )
    line = self.format_meter(**fields)
    print(line, file=self._stream or sys.stderr, flush=True)
    return True

  def __exit__(self, exc_type, exc_value, traceback):
    # A failed job ends with its error message alone, not a progress line.
    self._quiet = self._quiet or exc_type is not None
    return super().__exit__(exc_type, exc_value, traceback)


class _Ticker:
  """Refreshes a bar from a daemon thread, so a stalled count still ticks."""

  def __init__(self, bar: tqdm.tqdm, every_s: float):
    self._bar = bar
    self._every_s = every_s
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.wait(self._every_s):
      self._bar.refresh()

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def create(
    iterable: Iterable[Any] | None = None,
    *,
    total: float | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    initial: float = 0,
    unit_scale: bool = False,
    log_every_s: float | None = None,
    tick: bool = False,
    stream=None,
) -> tqdm.tqdm:
  """A progress bar for the current `mode`: tqdm, log lines, or silent.

  Args:
    iterable: optional iterable to wrap (as `tqdm(iterable)`).
    total: expected count (None: unknown, no ETA).
    desc: what is counted, e.g. 'lfw images'.
    unit: unit name ('img', 'pair', 'B', ...).
    enabled: the user's switch; False means nothing is shown.
    initial: count already done (a resumed job).
    unit_scale: scale units with SI prefixes (bytes, large counts).
    log_every_s: fixed seconds between log lines (default: 10 s in the
      first minute, then 60 s).
    tick: refresh from a background thread (once a second on a terminal,
      once per log interval in a log) so that the elapsed time moves while
      the count stalls, e.g. during a compile.
    stream: where lines go (default `sys.stderr`); decides the mode too.

  Returns:
    A `tqdm.tqdm` (a `LogBar` in 'log' mode, a disabled tqdm when 'off'):
    use `update`, `set_postfix_str`, `close`, or iterate over it.
  """
  how = mode(enabled, stream)
  kw = dict(
      iterable=iterable,
      total=total,
      desc=desc,
      unit=unit,
      initial=initial,
      unit_scale=unit_scale,
  )
  if how == "off":
    return tqdm.tqdm(disable=True, **kw)
  if how == "bar":
    bar = tqdm.tqdm(dynamic_ncols=True, file=stream or sys.stderr, **kw)
  else:
    # tqdm checks the clock at most every `mininterval`; lines are rarer.
    check_s = 0.5 if log_every_s is None else min(0.5, log_every_s)
    bar = LogBar(
        log_every_s=log_every_s, stream=stream, mininterval=check_s, **kw
    )
  if tick:
    every = 1.0 if how == "bar" else min(log_every_s or 5.0, 5.0)
    ticker = _Ticker(bar, every)
    close = bar.close

    def close_and_stop():
      ticker.stop()
      close()

    bar.close = close_and_stop
  return bar


def count_batches(
    batches: Iterable[Any],
    *,
    total: int | None,
    desc: str,
    unit: str = "img",
    enabled: bool = True,
    size: Callable[[Any], int] = len,
    tick: bool = False,
    stream=None,
) -> Iterator[Any]:
  """Yields `batches` unchanged, counting `size(batch)` after each one.

  The bar closes (its last line printed) when the stream ends.

  Args:
    batches: any iterable of sized batches (arrays, lists).
    total: items in all batches.
    desc: what is counted.
    unit: unit name.
    enabled: the user's switch.
    size: items in a batch (default `len`; e.g. `lambda b: len(b["w"])`
      for a dict of arrays).
    tick: keep the clock moving while a batch takes long (see `create`).
    stream: where lines go (default `sys.stderr`).

  Yields:
    The batches.
  """
  bar = create(
      total=total,
      desc=desc,
      unit=unit,
      enabled=enabled,
      tick=tick,
      stream=stream,
  )
  with bar:
    for batch in batches:
      yield batch
      bar.update(size(batch))


class Phases:
  """Named phases of one job, one bar step per phase (see the module doc).

  Call the object with a phase name to get a context manager for it.

  Attributes:
    seconds: wall seconds per finished phase, in order.
  """

  def __init__(
      self,
      desc: str,
      names: Sequence[str],
      *,
      enabled: bool = True,
      log_every_s: float | None = None,
      unit: str = "phase",
      stream=None,
  ):
    self.seconds: dict[str, float] = {}
    self._line_after_s = (
        log_interval(0.0) if log_every_s is None else log_every_s
    )
    self._desc = desc
    self._how = mode(enabled, stream)
    self._stream = stream
    self._bar = create(
        total=len(names),
        desc=desc,
        unit=unit,
        enabled=enabled,
        log_every_s=log_every_s,
        tick=True,
        stream=stream,
    )

  @contextlib.contextmanager
  def __call__(self, name: str) -> Iterator[None]:
    self._bar.set_postfix_str(name, refresh=self._how == "bar")
    start = time.perf_counter()
    yield
    self.seconds[name] = time.perf_counter() - start
    if self._how == "log" and self.seconds[name] >= self._line_after_s:
      # The end of a long phase is worth a line whatever the interval; a
      # phase quicker than one interval says nothing (as a short job).
      print(
          f"{self._desc}: {name} done in {self.seconds[name]:.1f} s",
          file=self._stream or sys.stderr,
          flush=True,
      )
    self._bar.update(1)

  def close(self) -> None:
    """Stops the ticker and prints the last line."""
    self._bar.set_postfix_str("done", refresh=False)
    self._bar.close()

  def __enter__(self) -> "Phases":
    return self

  def __exit__(self, exc_type, exc_value, traceback) -> None:
    self._bar.set_postfix_str("done", refresh=False)
    self._bar.__exit__(exc_type, exc_value, traceback)


def phases(
    desc: str,
    names: Sequence[str],
    *,
    enabled: bool = True,
    log_every_s: float | None = None,
    unit: str = "phase",
    stream=None,
) -> Phases:
  """Progress over named phases, e.g. lowering, compiling, analysis.

  Args:
    desc: the job, e.g. 'aot tinyfar_a v5e:2x2'.
    names: the phases in order (the bar's total).
    enabled: the user's switch.
    log_every_s: fixed seconds between log lines (see `create`).
    unit: what a phase is called in the rate ('phase', 'stage').
    stream: where lines go (default `sys.stderr`).

  Returns:
    A `Phases`; use it as a context manager and call it per phase.
  """
  return Phases(
      desc,
      names,
      enabled=enabled,
      log_every_s=log_every_s,
      unit=unit,
      stream=stream,
  )


def each_phase(
    desc: str,
    items: Iterable[Any],
    *,
    name: Callable[[Any], str] = str,
    enabled: bool = True,
    unit: str = "phase",
    log_every_s: float | None = None,
    stream=None,
) -> Iterator[Any]:
  """Yields `items`, each inside its own phase (the loop body is timed).

    for stage in progress.each_phase("benchmark", stages, name=lambda s: s[0]):
      ...  # runs inside phase `stage[0]`

  Args:
    desc: the job.
    items: one item per phase.
    name: the phase name of an item.
    enabled: the user's switch.
    unit: what a phase is called in the rate.
    log_every_s: fixed seconds between log lines (see `create`).
    stream: where lines go (default `sys.stderr`).

  Yields:
    The items.
  """
  items = list(items)
  names = [name(item) for item in items]
  with phases(
      desc,
      names,
      enabled=enabled,
      log_every_s=log_every_s,
      unit=unit,
      stream=stream,
  ) as phase:
    for item, label in zip(items, names):
      with phase(label):
        yield item


def define_flag():
  """Defines the absl `--progress` flag (once per process).

  Returns:
    Its `flags.FlagHolder`.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  if "progress" in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS["progress"])
  return flags.DEFINE_bool("progress", True, FLAG_HELP)


def parse_bool(text: str) -> bool:
  """argparse type for `--progress=false` (true/false, 1/0, yes/no, on/off)."""
  value = text.strip().lower()
  if value in ("1", "true", "yes", "on"):
    return True
  if value in ("0", "false", "no", "off"):
    return False
  raise ValueError(f"--progress={text!r}: expected true or false")


def add_argument(parser) -> None:
  """Adds `--progress[=true|false]` to an argparse parser."""
  parser.add_argument(
      "--progress",
      type=parse_bool,
      nargs="?",
      const=True,
      default=True,
      help=FLAG_HELP,
  )
