"""Client mods: the SecAgg+ weight check (issue 9, defect 4)."""

import pytest

from fatellm_flwr.mods import check_secagg_weight


def test_secagg_weight_above_max_weight_is_a_clear_error():
    check_secagg_weight(100, 100.0)  # at the limit: fine
    check_secagg_weight(1, 1.0)  # client-level DP: every clipped update weighs 1
    with pytest.raises(ValueError, match=r"secagg-max-weight=100 .* weight 150"):
        check_secagg_weight(150, 100.0)
