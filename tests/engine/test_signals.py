import os
import signal

from simclr_cli.engine.signals import StopRequest


def test_stop_request_is_reentrant_and_restores_handlers():
    original = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop:
        with stop:  # the loop re-enters the stage's request
            pass
        # still installed after the inner exit: a signal now is caught, not fatal
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is original
