"""The state gauges are read from the scheduler when scraped, so they never lag or disagree."""

from router.core.kv_cache_manager import KVCacheManager
from router.core.request import Request, SamplingParams
from router.core.scheduler import Scheduler, SchedulerConfig
from router.metrics import Metrics


def _gauges(metrics: Metrics) -> dict[str, float]:
    lines = metrics.render().decode().splitlines()
    return {k: float(v) for k, v in (line.rsplit(" ", 1) for line in lines if line and not line.startswith("#"))}


def test_state_gauges_read_the_scheduler_when_scraped():
    scheduler = Scheduler(SchedulerConfig(8, 64), KVCacheManager(32, 16))
    metrics = Metrics(100, 200)
    metrics.watch(scheduler)
    scheduler.add(Request(0, [5, 6, 7], 4, SamplingParams()))
    before = _gauges(metrics)
    assert before["tgi_queue_size"] == 1 and before["tgi_batch_current_size"] == 0
    assert before["sluice_kv_blocks_free"] == before["sluice_kv_blocks_total"] == 32
    scheduler.schedule()
    after = _gauges(metrics)
    assert after["tgi_queue_size"] == 0 and after["tgi_batch_current_size"] == 1
    assert after["sluice_kv_blocks_free"] == 31 and after["tgi_batch_current_max_tokens"] == 3 + 4
