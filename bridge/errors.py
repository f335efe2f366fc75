"""Every exception the core defines, in one place.

The tree::

    Exception
    ├── ConfigError            the configuration is wrong: file, key and what to fix (the daemon
    │                          refuses to start; check-config prints it)
    ├── EmbeddedRedisError     the embedded redis-server could not be started or reached
    ├── BusUnavailable         Redis did not take a write: nothing was accepted (HTTP callbacks
    │                          answer 503 so the platform retries)
    └── SendError              a sink could not send one delivery; its message becomes the
        │                      dead letter's reason
        ├── RetryableError     worth another try later (5xx, 429, a dropped connection); may
        │                      carry the platform's ``retry_after``
        └── PermanentError     retrying cannot help (4xx, a rejected token): dead-lettered now
            ├── NoWayBack      this sink cannot carry this answer back the way it came (a closed
            │                  window, too long): relayed through the outbound's ``fallback``
            │                  when it has one (bridge/fallback.py), else dead-lettered
            └── EgressRefused  a URL from a payload that bridge/egress.py refuses (not an
                               allowed host, or an internal address)

Adapters define their own exceptions next to the code that raises them; the ones a sink lets
escape to the runner derive from :class:`RetryableError` or :class:`PermanentError`, because the
runner decides what to do by these two classes alone.
"""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem a person can act on: file, key, what is wrong."""


class EmbeddedRedisError(Exception):
    """The embedded Redis (no ``[redis] url`` configured) did not start or does not answer."""


class BusUnavailable(Exception):
    """Redis did not take the write; nothing was accepted."""


class SendError(Exception):
    """Base of the errors a sink raises. The message becomes the dead letter's reason: make it say
    what to fix, and never put a secret in it."""


class RetryableError(SendError):
    """A send that may work later; ``retry_after`` (seconds) is the platform's hint, if it gave one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(SendError):
    """A send that cannot work as it is: the delivery goes to the dead letters with this reason."""


class NoWayBack(PermanentError):
    """The answer cannot go back the way it came (e.g. an AI bot's stream window and response_url
    are both closed, or it is too long for the platform). The runner relays it through the sink's
    ``fallback`` outbound when one is configured; ``text``: what the fallback should carry (None:
    the whole answer; e.g. only the part that did not get through)."""

    def __init__(self, message: str, text: str | None = None) -> None:
        super().__init__(message)
        self.text = text


class EgressRefused(PermanentError):
    """A URL the allow-list or the address check of bridge/egress.py refuses."""
