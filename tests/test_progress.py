"""`synthdistill_jax.progress`: a bar on a terminal, lines in a log, or nothing."""

import argparse
import io
import re

import jax
import pytest

from synthdistill_jax import progress

# A log line: count, percentage, elapsed<remaining, rate.
LOG_LINE = re.compile(
    r"^lfw: embedding: (\d+)/40 \(\d+%\) \[\d\d:\d\d<\d\d:\d\d, .*img/s\]$"
)


class _Terminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self) -> bool:
    return True


def _count(stream, enabled=True, log_every_s=0.0):
  bar = progress.create(
      total=40,
      desc="lfw: embedding",
      unit="img",
      enabled=enabled,
      log_every_s=log_every_s,
      stream=stream,
  )
  with bar:
    for _ in range(4):
      bar.update(10)
  return stream.getvalue()


def test_log_mode_prints_whole_lines_with_rate_and_eta():
  out = _count(io.StringIO())
  assert "\r" not in out and "\x1b" not in out
  lines = out.splitlines()
  counts = [int(LOG_LINE.match(line).group(1)) for line in lines]
  # Every update is due at a zero interval; the end is reported once.
  assert counts == [10, 20, 30, 40], out


def test_log_mode_interval_spaces_the_lines():
  # A job shorter than its interval says nothing in a log (so an error
  # after a quick check stays the only line).
  assert _count(io.StringIO(), log_every_s=3600.0) == ""


def test_terminal_gets_a_tqdm_bar():
  out = _count(_Terminal())
  assert "\r" in out  # Redrawn in place.
  last = out.split("\r")[-1]
  assert "40/40" in last and "img/s" in last and "100%|" in last
  assert re.search(r"\[\d\d:\d\d<\d\d:\d\d", last)  # Elapsed < ETA.


def test_disabled_or_secondary_process_prints_nothing(monkeypatch):
  assert _count(_Terminal(), enabled=False) == ""
  assert _count(io.StringIO(), enabled=False) == ""
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  assert progress.mode(True, _Terminal()) == "off"
  assert _count(_Terminal()) == ""


def test_count_batches_counts_items_not_batches():
  stream = io.StringIO()
  batches = [{"w": [0] * 16}, {"w": [0] * 16}, {"w": [0] * 8}]
  seen = list(
      progress.count_batches(
          iter(batches),
          total=40,
          desc="lfw: embedding",
          size=lambda b: len(b["w"]),
          stream=stream,
      )
  )
  assert seen == batches
  # Quicker than the first interval: no line in a log; the bar counts items.
  assert stream.getvalue() == ""
  terminal = _Terminal()
  list(
      progress.count_batches(
          iter(batches),
          total=40,
          desc="lfw: embedding",
          size=lambda b: len(b["w"]),
          stream=terminal,
      )
  )
  assert "40/40" in terminal.getvalue().split("\r")[-1]


def test_phases_time_each_phase_and_log_its_end():
  stream = io.StringIO()
  names = ("lowering", "compiling", "analysis")
  with progress.phases(
      "aot tiny", names, stream=stream, log_every_s=0.0
  ) as phase:
    for name in names:
      with phase(name):
        pass
  assert list(phase.seconds) == list(names)
  lines = stream.getvalue().splitlines()
  done = [l.split(" done in ")[0] for l in lines if " done in " in l]
  assert done == [f"aot tiny: {n}" for n in names]
  assert lines[-1].startswith("aot tiny: 3/3 (100%)")
  # At the default interval, instant phases print nothing in a log.
  quiet = io.StringIO()
  with progress.phases("aot tiny", names, stream=quiet) as phase:
    for name in names:
      with phase(name):
        pass
  assert quiet.getvalue() == ""


def test_a_failed_job_leaves_its_error_as_the_last_line():
  stream = io.StringIO()
  with pytest.raises(ValueError):
    with progress.phases(
        "convert x", ("reading", "saving"), stream=stream
    ) as p:
      with p("reading"):
        raise ValueError("bad file")
  with pytest.raises(ValueError):
    with progress.create(total=3, desc="y", stream=stream) as bar:
      bar.update(1)
      raise ValueError("bad image")
  assert stream.getvalue() == ""


def test_each_phase_yields_every_item_inside_its_phase():
  stream = io.StringIO()
  items = [("generate", 1), ("crop", 2)]
  got = list(
      progress.each_phase(
          "bench", items, name=lambda s: s[0], stream=stream, log_every_s=0.0
      )
  )
  assert got == items
  text = stream.getvalue()
  assert "bench: generate done in" in text and "bench: crop done in" in text
  assert "2/2 (100%)" in text


def test_a_wrapped_iterable_gives_the_total():
  stream = io.StringIO()
  bar = progress.create(range(5), desc="t", stream=stream, log_every_s=0.0)
  assert list(bar) == list(range(5))
  assert stream.getvalue().splitlines()[-1].startswith("t: 5/5 (100%) [")


def test_flags():
  parser = argparse.ArgumentParser()
  progress.add_argument(parser)
  assert parser.parse_args([]).progress is True
  assert parser.parse_args(["--progress=false"]).progress is False
  assert parser.parse_args(["--progress"]).progress is True
  with pytest.raises(SystemExit):
    parser.parse_args(["--progress=maybe"])
  holder = progress.define_flag()
  assert progress.define_flag().name == holder.name == "progress"
