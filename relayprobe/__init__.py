"""relayprobe: an open-relay tester that connects back to the caller and proves relaying by delivery."""

__version__ = "0.1.0"
