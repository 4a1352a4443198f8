"""The background batch preparation of the train loop: order, errors, early stop."""

import threading
import time

import pytest

from score_sde.io import parallel


def test_prefetcher_keeps_order_and_runs_ahead():
  produced = []

  def produce(i):
    produced.append(i)
    return i * i

  with parallel.Prefetcher(produce, count=6, size=2) as items:
    it = iter(items)
    assert next(it) == 0
    deadline = time.time() + 10
    while len(produced) < 3 and time.time() < deadline:  # 1 taken + 2 queued ahead
      time.sleep(0.01)
    assert produced[:3] == [0, 1, 2]
    assert list(it) == [1, 4, 9, 16, 25]


def test_prefetcher_raises_the_producer_error_at_its_item():
  def produce(i):
    if i == 2:
      raise FileNotFoundError("batch 2 is missing")
    return i

  with parallel.Prefetcher(produce, count=5) as items:
    got = []
    with pytest.raises(FileNotFoundError, match="batch 2"):
      for x in items:
        got.append(x)
  assert got == [0, 1]


def test_prefetcher_stops_its_thread_when_closed_early():
  before = threading.active_count()
  with parallel.Prefetcher(lambda i: i, count=1000, size=1) as items:
    assert next(iter(items)) == 0
  assert threading.active_count() == before
