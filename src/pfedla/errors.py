"""The project's error types: every expected failure is one of these, with a specific message."""

import re
import reprlib

MESSAGE_CHARS = 2000  # an error is one readable line, whatever the input that caused it

# Values echoed in messages are shown shortened, never rendered whole: a YAML alias bomb or a
# huge list would otherwise cost gigabytes to print.
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 120, 120, 60
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def shown(value: object) -> str:
    """``repr(value)``, bounded in size and cost."""
    return _SHORT.repr(value)


# The password runs to the authority's last '@' (a password may hold '@'; the host never does), and
# the authority ends at the first '/', '?', '#' or blank.
_URL_PASSWORD = re.compile(r"(?P<user>[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s:]*):[^/?#\s]*@")
_URL_USERINFO = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^/?#\s]*@")
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def without_credentials(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL replaced by ***."""
    return _URL_PASSWORD.sub(r"\g<user>:***@", text)


def has_userinfo(text: str) -> bool:
    """Whether ``text`` holds a URL with a user name or password before its host (``user[:pw]@host``)."""
    return _URL_USERINFO.search(text) is not None


def one_line(text: str) -> str:
    """``text`` with line breaks, escape sequences and other control characters written as escapes
    (``\\n``, ``\\x1b``), so that a message quoting a path or name stays one plain line."""
    return _CONTROL_CHARACTER.sub(lambda found: repr(found.group())[1:-1], text)


def _bounded(text: str) -> str:
    return text if len(text) <= MESSAGE_CHARS else f"{text[:MESSAGE_CHARS]}... ({len(text)} characters)"


class PfedlaError(Exception):
    """Base class for every error pfedla reports to a user."""


class ConfigError(PfedlaError):
    """An invalid configuration value; the message names the key and what is allowed."""

    def __init__(self, key: str, message: str):
        self.key = key[:200]
        super().__init__(_bounded(f"config key '{self.key}': {message}"))


class DataError(PfedlaError):
    """A dataset that is missing, unreadable or inconsistent."""


class ArtifactError(PfedlaError):
    """A stored model, checkpoint or update that is missing, corrupt or does not fit."""
