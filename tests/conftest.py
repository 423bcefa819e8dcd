"""Fixtures shared by test modules."""

from __future__ import annotations

import pytest

from tests.slurm_fixture import slurm_cluster, unavailable_reason


@pytest.fixture(scope="session")
def slurm():
    """One real one-node Slurm for the whole run (tests/slurm_fixture.py); skips without the daemons."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster(cpus=4) as cluster:
        yield cluster
