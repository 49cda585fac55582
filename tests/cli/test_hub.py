"""The hub probe: a refused endpoint switches the libraries to offline mode for the block only, and a hub read
then fails at once with one line instead of retrying."""

import socket
import time

import datasets.config as datasets_config
import pytest
from huggingface_hub import constants

from d2moe.errors import InputError
from d2moe.hub import PROXY_VARIABLES, hub_reachable, offline_unless_reachable
from d2moe.router_train.data import load_texts


@pytest.fixture
def no_proxy(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def refused_endpoint(monkeypatch, no_proxy):
    """An endpoint on this machine where nothing listens: connecting is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)


def test_listening_endpoint_is_reachable_and_stays_online(monkeypatch, no_proxy):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(datasets_config, "HF_HUB_OFFLINE", False)
        assert hub_reachable()
        with offline_unless_reachable() as offline:
            assert not offline and not constants.HF_HUB_OFFLINE


def test_refused_endpoint_goes_offline_for_the_block_only(refused_endpoint):
    assert not hub_reachable()
    with offline_unless_reachable() as offline:
        assert offline and constants.HF_HUB_OFFLINE and datasets_config.HF_HUB_OFFLINE
    assert not constants.HF_HUB_OFFLINE and not datasets_config.HF_HUB_OFFLINE


def test_a_proxy_counts_as_reachable(refused_endpoint, monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    assert hub_reachable()


def test_hub_dataset_without_a_hub_fails_at_once_with_one_line(refused_endpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets_config, "HF_DATASETS_CACHE", tmp_path)  # nothing cached
    start = time.monotonic()
    with pytest.raises(InputError, match="cannot be reached and it is not in the local cache.*--calib FILE.txt"):
        load_texts(["someone/no-such-dataset"], option="--calib")
    assert time.monotonic() - start < 20  # retries with back-off took ~40 s
