"""Continuous batching: waiting/running queues, admission against every memory pool, chunked prefill."""
