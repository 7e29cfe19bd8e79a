"""Soak without loss: a long mixed load at bounded concurrency, where every request ends in exactly
one outcome, nothing hangs, and afterwards the server is idle again (every KV block free, nothing
queued or running) with the router's memory grown by less than RSS_GROWTH_MIB.

Reduced (make test): 120 requests after a 32-request warm-up. Full (SLUICE_SOAK=full, make soak): 2,000.
"""

import asyncio
import datetime

import pytest

from tests.reliability.conftest import FULL, child_pids, rss_mib, scaled, wait_idle
from tests.reliability.loadgen import make_jobs, run_load

NUM_REQUESTS = scaled(120, 2000)
WARMUP = scaled(32, 200)
CONCURRENCY = 16
PER_REQUEST_TIMEOUT_S = 180
RSS_GROWTH_MIB = 150  # router memory growth allowed between the end of the warm-up and the end of the run


@pytest.mark.timeout(scaled(600, 3600))
def test_soak_loses_nothing(rel_server):
    url = rel_server.url
    router = child_pids(rel_server)["router"]
    wait_idle(url)
    warmup = asyncio.run(run_load(url, make_jobs(WARMUP, seed=1), CONCURRENCY, PER_REQUEST_TIMEOUT_S))
    assert not warmup.failures(), warmup.failures()[:5]
    before = wait_idle(url)
    rss_before = rss_mib(router)

    report = asyncio.run(run_load(url, make_jobs(NUM_REQUESTS, seed=2), CONCURRENCY, PER_REQUEST_TIMEOUT_S))
    after = wait_idle(url, timeout_s=10)
    rss_after = rss_mib(router)
    counts = report.counts()
    by_kind: dict[str, int] = {}
    for o in report.outcomes:
        by_kind[o.kind] = by_kind.get(o.kind, 0) + 1
    slowest = max(o.seconds for o in report.outcomes)
    dropped = after['tgi_request_failure{err="dropped"}'] - before.get('tgi_request_failure{err="dropped"}', 0)
    summary = (
        f"soak ({'full' if FULL else 'reduced'}, {datetime.date.today()}): {NUM_REQUESTS} requests, "
        f"concurrency {CONCURRENCY}, outcomes {counts}, kinds {dict(sorted(by_kind.items()))}, "
        f"dropped by the server {dropped:g}, preemptions {after['sluice_preemptions']:g}, "
        f"slowest {slowest:.1f}s, router RSS {rss_before:.0f} -> {rss_after:.0f} MiB "
        f"(+{rss_after - rss_before:.1f}), duration {report.seconds:.1f}s "
        f"({NUM_REQUESTS / report.seconds:.1f} req/s)"
    )
    print("\n" + summary)

    assert len(report.outcomes) == NUM_REQUESTS  # exactly one terminal outcome each
    # The server's count of sequences it finished agrees with what the clients received (a client
    # that hung up may have done so just after its last token).
    finished = after["tgi_request_success"] - before["tgi_request_success"]
    completed = sum(o.sequences for o in report.outcomes if o.outcome == "complete")
    cancelled = sum(o.sequences for o in report.outcomes if o.outcome == "cancelled")
    assert completed <= finished <= completed + cancelled, (finished, completed, cancelled)
    assert not report.failures(), report.failures()[:10]
    assert counts.get("cancelled", 0) > 0 and counts.get("rejected", 0) > 0 and counts["complete"] > NUM_REQUESTS / 2
    assert dropped <= counts["cancelled"]  # only requests whose client hung up were aborted
    assert after["sluice_kv_blocks_free"] == after["sluice_kv_blocks_total"], "KV blocks leaked"
    assert after["tgi_queue_size"] == 0 and after["tgi_batch_current_size"] == 0
    generation_failures = 'tgi_request_failure{err="generation"}'
    assert after.get(generation_failures, 0) == before.get(generation_failures, 0)
    assert rss_after - rss_before < RSS_GROWTH_MIB, summary
