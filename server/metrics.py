"""Prometheus figures: what each process records, and how `/metrics` puts them together.

Several processes serve one box (API processes, one worker per GPU), so the figures use
prometheus_client's multiprocess mode: every process writes its own samples to files in one
directory (`PROMETHEUS_MULTIPROC_DIR`, `<data-dir>/run/metrics`), and a scrape sums them.
The variable must be set before prometheus_client is first imported: `flux-server serve`
puts it into its children's environment (emptying the directory at start), `flux-server api`
and `flux-server worker` set it themselves (server/supervisor/cli.py). Without it (a test that runs the
app in-process) the figures stay in the process's own registry.

What the queue knows is read at scrape time instead (`QueueCollector`): queue size by
priority, requests running, workers by state, and the usage counters per tenant and endpoint
(`fluxserver_tenant_*_total`, summed from the queue's usage table: server/queue/usage.py).
Those are true for every process and every box sharing the queue, and cannot drift. Their
`tenant` label is a key's name ("default" for jobs of no named key) and their `endpoint` the
app id, so both stay as few as the configured keys and served apps.

The figures are recorded where a request's lifecycle events happen (server/lifecycle.py).
Every name has the `fluxserver_` prefix and base units (seconds, bytes); counters end in
`_total`. Labels: `endpoint` is the path a request was submitted on (`fal-ai/flux/dev`,
`bfl/flux-dev`, `openai/images/generations`...), so endpoints added later (LoRA) appear
without code changes; `outcome` is `success` or the error type of a failed request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from server.queue.base import JobQueue
from server.queue.usage import UsageRow, tenant_label

MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"
PREFIX = "fluxserver_"
CONTENT_TYPE = CONTENT_TYPE_LATEST
WORKER_STATES = ("loading", "warming", "ready", "failed", "stopped")

# Seconds, from a fast tiny-model job to a long 2-megapixel generation on a small card.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)

queue_wait_seconds = Histogram(
    PREFIX + "queue_wait_seconds",
    "Time from submit until a worker started the request",
    ["endpoint"],
    buckets=DURATION_BUCKETS,
)
inference_seconds = Histogram(
    PREFIX + "inference_seconds",
    "Time a worker spent generating (text encoding, denoising, decoding)",
    ["endpoint"],
    buckets=DURATION_BUCKETS,
)
request_duration_seconds = Histogram(
    PREFIX + "request_duration_seconds",
    "End-to-end time from submit until the result was stored",
    ["endpoint"],
    buckets=DURATION_BUCKETS,
)
denoising_step_seconds = Histogram(
    PREFIX + "denoising_step_seconds",
    "Seconds per denoising step (a request's inference time divided by its steps)",
    ["endpoint"],
    buckets=STEP_BUCKETS,
)
# The device's idle gap between two queued jobs: milliseconds at best (the target is 20 ms).
IDLE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
device_idle_seconds = Histogram(
    PREFIX + "device_idle_seconds",
    "Seconds a worker's device sat idle between a job and the next one, when that one was "
    "already waiting (the loop's own cost: claiming, mapping, LoRAs)",
    buckets=IDLE_BUCKETS,
)
requests_total = Counter(
    PREFIX + "requests",
    "Finished requests by endpoint and outcome (success, or the error type)",
    ["endpoint", "outcome"],
)
images_generated_total = Counter(PREFIX + "images_generated", "Images generated and stored", ["endpoint"])
# API side: a submit refused over one of its key's quotas (server/api/tenancy.py); the tenant
# is the key's name, so the label stays as few as the keys with quotas.
quota_refusals_total = Counter(
    PREFIX + "quota_refusals",
    "Submits refused over a tenant's quota, by tenant and quota (queued, per_minute, images_per_day)",
    ["tenant", "quota"],
)
webhook_deliveries_total = Counter(
    PREFIX + "webhook_deliveries",
    "Webhook delivery attempts by outcome (delivered, retry, gave_up)",
    ["outcome"],
)
# One lookup per LoRA a request names, `result` "hit" (already in the worker's memory) or
# "miss" (read from disk); and per LoRA URL, whether the download cache already had it.
lora_cache_lookups_total = Counter(
    PREFIX + "lora_cache_lookups", "LoRA weight cache lookups by result (hit, miss)", ["result"]
)
lora_downloads_total = Counter(
    PREFIX + "lora_downloads", "LoRA URLs requests used, by whether the download cache had them", ["result"]
)
# torch.compile in a worker: `phase` "warmup" (before the worker is ready) or "request" (a
# graph compiled inside a request: a recompile the warm-up did not cover, or the first LoRA
# request making hot-swap slots).
compiled_graphs_total = Counter(
    PREFIX + "compiled_graphs", "Graphs torch.compile compiled in a worker, by phase", ["phase"]
)
compile_seconds_total = Counter(
    PREFIX + "compile_seconds", "Seconds torch.compile spent compiling in a worker, by phase", ["phase"]
)


def record_compiles(phase: str, graphs: int, seconds: float) -> None:
    """What a warm-up (`phase` "warmup") or one request ("request") compiled."""
    if graphs > 0:
        compiled_graphs_total.labels(phase).inc(graphs)
    if seconds > 0:
        compile_seconds_total.labels(phase).inc(seconds)


gpu_memory_used_bytes = Gauge(
    PREFIX + "gpu_memory_used_bytes",
    "GPU memory allocated by a worker's model and buffers",
    ["worker"],
    multiprocess_mode="livemostrecent",
)
gpu_memory_total_bytes = Gauge(
    PREFIX + "gpu_memory_total_bytes",
    "Total memory of a worker's GPU",
    ["worker"],
    multiprocess_mode="livemostrecent",
)


def record_gpu_memory(worker: str, used_bytes: int, total_bytes: int) -> None:
    """A worker's GPU memory: set when it reports ready, after each job and after a failure
    (server/worker/loop.py). Only a worker on a CUDA device records it."""
    gpu_memory_used_bytes.labels(worker).set(used_bytes)
    gpu_memory_total_bytes.labels(worker).set(total_bytes)


# The FLUX.1 [dev] family (models/residency.py): which variants each worker holds on its GPU
# (1) or off it (0), and the moves onto the GPU jobs waited for, by variant and source ("host":
# pinned host memory, "disk": read back from the spill file).
variant_resident = Gauge(
    PREFIX + "variant_resident",
    "Whether a worker holds a variant's transformer on its device (1) or not (0)",
    ["worker", "variant"],
    multiprocess_mode="livemostrecent",
)
variant_swaps_total = Counter(
    PREFIX + "variant_swaps",
    "Variants moved onto a worker's device for a job, by variant and source (host, disk)",
    ["worker", "variant", "source"],
)
SWAP_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32)
variant_swap_seconds = Histogram(
    PREFIX + "variant_swap_seconds",
    "Seconds a job waited for its variant to move onto the device (evictions included)",
    ["source"],
    buckets=SWAP_BUCKETS,
)


def record_variants(worker: str, placement: dict[str, bool]) -> None:
    """Each variant a worker serves: on its device or not (after load and after each swap)."""
    for variant, on_device in placement.items():
        variant_resident.labels(worker, variant).set(1 if on_device else 0)


def record_swap(worker: str, variant: str, source: str, seconds: float) -> None:
    variant_swaps_total.labels(worker, variant, source).inc()
    variant_swap_seconds.labels(source).observe(seconds)


class QueueCollector(Collector):
    """Figures read from the queue at scrape time."""

    def __init__(self, queue: JobQueue) -> None:
        self.queue = queue

    def collect(self) -> Iterator[Metric]:
        counts = self.queue.counts()
        size = GaugeMetricFamily(PREFIX + "queue_size", "Requests waiting in the queue", labels=["priority"])
        for priority, queued in sorted(counts.queued.items()):
            size.add_metric([priority], queued)
        yield size
        yield GaugeMetricFamily(
            PREFIX + "requests_running", "Requests a worker is running", value=counts.running
        )
        workers = GaugeMetricFamily(PREFIX + "workers", "Workers by state", labels=["state"])
        states = [worker.state for worker in self.queue.workers()]
        for state in sorted({*WORKER_STATES, *states}):
            workers.add_metric([state], states.count(state))
        yield workers
        yield from usage_counters(self.queue)


# The usage counters: (name, help, the figure of a usage row).
_USAGE_COUNTERS: tuple[tuple[str, str, Callable[[UsageRow], float]], ...] = (
    ("tenant_requests", "Completed requests by tenant and endpoint (failed included)", lambda r: r.requests),
    ("tenant_failed_requests", "Failed requests (cancels too) by tenant and endpoint", lambda r: r.failed),
    ("tenant_images", "Images generated by tenant and endpoint", lambda r: r.images),
    ("tenant_megapixels", "Megapixels generated by tenant and endpoint", lambda r: r.megapixels),
    ("tenant_gpu_seconds", "Seconds of GPU inference by tenant and endpoint", lambda r: r.gpu_seconds),
)


def usage_counters(queue: JobQueue) -> Iterator[Metric]:
    totals = queue.usage_totals()
    for name, help_text, figure in _USAGE_COUNTERS:
        family = CounterMetricFamily(PREFIX + name, help_text, labels=["tenant", "endpoint"])
        for row in totals:
            family.add_metric([tenant_label(row.tenant), row.app_id], figure(row))
        yield family


def render(queue: JobQueue) -> bytes:
    """The text exposition of every figure: this box's processes plus the queue's."""
    registry = CollectorRegistry()
    if os.environ.get(MULTIPROCESS_ENV):
        MultiProcessCollector(registry)
        registry.register(QueueCollector(queue))
        return generate_latest(registry)
    registry.register(QueueCollector(queue))
    return generate_latest(REGISTRY) + generate_latest(registry)
