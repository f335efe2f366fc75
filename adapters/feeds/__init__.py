"""REST feeds polled by the core loop (bridge/poller.py): one module per API."""
