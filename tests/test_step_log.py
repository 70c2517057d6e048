"""The engine's progress lines: a decode summary every `interval` decode-only steps; a prefill step resets nothing."""

from tailorkv.engine.step_log import StepLog


def test_decode_summary_every_interval(caplog):
    log = StepLog(interval=4)
    with caplog.at_level("INFO", logger="tailorkv.engine"):
        for i in range(9):
            log.record([(100, 256)] * (i == 2), [(100, 256)] * (i == 2), 8, 0.02)
    assert [r.getMessage() for r in caplog.records] == [
        "prefill: 1 seqs, 100 new tokens, 256 cached tokens, 8 decoding, 20.0 ms",
        "decode: 8 running, 20.0 ms/step, 400.0 tok/s",
        "decode: 8 running, 20.0 ms/step, 400.0 tok/s",
    ]


def test_a_warning_when_the_allocator_retried(caplog):
    log = StepLog()
    with caplog.at_level("INFO", logger="tailorkv.engine"):
        for retries in (0, 0, 2, 2, 3):
            log.allocator(retries)
    assert [r.levelname for r in caplog.records] == ["WARNING", "WARNING"]
    assert (
        "retried 2 times" in caplog.records[0].getMessage()
        and "retried 1 times" in caplog.records[1].getMessage()
    )
