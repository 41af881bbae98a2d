"""Shared pytest fixtures.

`tiny_corpus`: the synthetic corpus at size="tiny" (a few dozen items of each dataset), generated once per test
session into a temporary directory; returns its root Path (same layout as data/synth, see data/README.md).
"""
import pytest

from data.synthetic import ensure_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "tiny"
    return ensure_corpus(root, size="tiny", seed=0)
