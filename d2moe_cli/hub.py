"""The Hugging Face Hub, asked only when it answers.

Without a network, `datasets` and `huggingface_hub` retry every request with back-off: a user
without internet waited ~40 s of "Retrying in 8s" lines before the one error line. One TCP connect
to the hub's endpoint (3 s at most) tells first; when it fails, the block runs in the libraries'
offline mode, where what is already in the local cache still loads and the rest fails at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Iterator

PROBE_TIMEOUT_S = 3.0
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub's endpoint accepts a TCP connection. Behind a proxy the endpoint is not dialled directly,
    so a configured proxy counts as reachable (the libraries then use it, with their own errors)."""
    from huggingface_hub import constants

    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return True
    url = urllib.parse.urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within the block: the hub's offline mode when it cannot be reached. Yields whether the block is offline
    (set by the user's HF_HUB_OFFLINE, or because the hub did not answer)."""
    import datasets.config as datasets_config
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or datasets_config.HF_HUB_OFFLINE:
        yield True
        return
    if hub_reachable():
        yield False
        return
    saved = constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE
    constants.HF_HUB_OFFLINE = datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True
    try:
        yield True
    finally:
        constants.HF_HUB_OFFLINE, datasets_config.HF_HUB_OFFLINE, datasets_config.HF_DATASETS_OFFLINE = saved


def offline_hint(offline: bool) -> str:
    """What an error line adds when a hub read failed offline: the data was not in the local cache."""
    return "the hub cannot be reached and it is not in the local cache; " if offline else ""
