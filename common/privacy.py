"""Nothing private in what a store shares or a message shows.

`shareable(obj)`: a JSON value as it may be written into a store that is pushed to teammates:
the user's home folder becomes `~` (also inside messages, e.g. exclusion reasons), a path component equal to the user's name becomes `$USER`,
and URLs lose their `user:password@` part. `local_path(text)` undoes the first two on the reading
side (a teammate's `~` is their own home). `scrub(text)`: any message with credentials replaced by
`***`: `user:password@` in URLs, the AWS variables of the environment and the secrets of
`~/.aws/credentials` (or $AWS_SHARED_CREDENTIALS_FILE).
"""

from __future__ import annotations

import configparser
import getpass
import os
import re
from functools import lru_cache

SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s:]*(?::[^/@\s]*)?@")
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{12,}\b")


@lru_cache(maxsize=1)
def _file_secrets(path: str, mtime: float) -> tuple:
    cp = configparser.ConfigParser(interpolation=None)
    try:
        cp.read(path)
    except (configparser.Error, OSError, UnicodeDecodeError):
        return ()
    return tuple(
        v
        for s in cp.sections()
        for k, v in cp.items(s)
        if k.lower() in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        and len(v) >= 4
    )


def secrets() -> list[str]:
    """Credential values this process can see: AWS variables and the shared credentials file."""
    found = [os.environ[v] for v in SECRET_VARS if len(os.environ.get(v, "")) >= 4]
    path = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    try:
        found += _file_secrets(path, os.stat(path).st_mtime)
    except OSError:
        pass
    return sorted(set(found), key=len, reverse=True)


def strip_url_credentials(text: str) -> str:
    return _URL_CREDENTIALS.sub(lambda m: m["scheme"] + "***@", text)


def scrub(text) -> str:
    """`text` with every credential replaced by ***, whatever its source."""
    text = strip_url_credentials(str(text))
    for value in secrets():
        text = text.replace(value, "***")
    return _AWS_KEY_ID.sub("***", text)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def shareable(obj):
    """`obj` (JSON) with user-specific paths made portable and URL credentials removed."""
    if isinstance(obj, dict):
        return {k: shareable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [shareable(v) for v in obj]
    if not isinstance(obj, str):
        return obj
    text = _URL_CREDENTIALS.sub(lambda m: m["scheme"], obj)
    home = os.path.expanduser("~").rstrip("/")
    if (
        home and home != "/"
    ):  # a path, one after a prefix such as `openclip:`, or one inside a message
        text = re.sub(rf"""(?<![^\s:'"(=,\[]){re.escape(home)}(?![^/\s'"):,\]])""", "~", text)
    user = _user()
    if user and "/" in text:
        text = re.sub(rf"(?<=/){re.escape(user)}(?=/|$)", "$USER", text)
    return text


def local_path(text):
    """A path (or `prefix:path`) recorded with `shareable`, for this user (`~`, `$USER` expanded)."""
    if not isinstance(text, str):
        return text
    home = os.path.expanduser("~")
    text = re.sub(r"(^|(?<=:))~(?=/|$)", lambda m: home, text)
    return text.replace("$USER", _user())
