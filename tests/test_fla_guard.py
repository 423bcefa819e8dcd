"""The version gate of fla's Hopper per-token-gate refusal (pure logic, runs without a GPU)."""

from __future__ import annotations

import pytest

from parallel.fla_backend import gated_backward_refused


@pytest.mark.parametrize(
    "hopper,triton,fla_knows_3_7_1,refused",
    [
        (False, "3.5.0", False, False),  # not Hopper: never refused
        (True, "3.3.1", False, False),  # before the miscompile
        (True, "3.4.0", True, True),  # the buggy range [3.4.0, 3.7.1)
        (True, "3.7.0+git5a3d", True, True),
        (True, "3.7.1", True, False),  # fixed Triton, fla with PR #983
        (True, "3.8.0", True, False),
        (True, "3.7.1", False, True),  # fixed Triton, but an fla from before PR #983 still raises
    ],
)
def test_gated_backward_refusal_follows_triton_and_fla_versions(hopper, triton, fla_knows_3_7_1, refused):
    assert gated_backward_refused(hopper=hopper, triton_version=triton, fla_knows_3_7_1=fla_knows_3_7_1) is refused
