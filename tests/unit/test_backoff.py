from streamer.app import BACKOFF_START_SECONDS, Backoff


def test_backoff_doubles_to_its_ceiling_and_resets() -> None:
    b = Backoff(ceiling_seconds=3.0)
    delays = [b.failed() for _ in range(5)]
    assert delays == [BACKOFF_START_SECONDS, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.failed() == BACKOFF_START_SECONDS
