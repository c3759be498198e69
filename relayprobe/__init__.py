"""relayprobe: an open-relay tester that connects back to the caller and proves relaying."""

__version__ = "0.1.0"
