"""The one layer-selection rule: sorted, no repeats, negative from the end, clear errors."""

import numpy as np
import pytest

from mahals.layers import select_layers


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        (None, (0, 1, 2, 3, 4)),
        ("all", (0, 1, 2, 3, 4)),
        (2, (2,)),
        (-1, (4,)),
        ([3, -5, 1], (0, 1, 3)),
        (np.int64(3), (3,)),
        ([np.int32(-2)], (3,)),
    ],
)
def test_selection_is_sorted(layers, expected):
    assert select_layers(layers, 5) == expected


@pytest.mark.parametrize(
    ("layers", "error", "message"),
    [
        ([], ValueError, "layers is empty"),
        ("last", ValueError, "'all', an int or a list"),
        (True, TypeError, r"must be ints, got \[True\]"),
        ([1.0], TypeError, r"must be ints, got \[1.0\]"),
        (["3"], TypeError, "must be ints"),
        ([0, 5], IndexError, r"\[5\] out of range for 5 layers"),
        (-6, IndexError, r"\[-6\] out of range"),
        ((4, -1, 0), ValueError, r"name layers \[4\] more than once"),
        ([2, 2], ValueError, r"name layers \[2\] more than once"),
    ],
)
def test_bad_selections_name_the_argument_and_values(layers, error, message):
    with pytest.raises(error, match=message):
        select_layers(layers, 5)
    with pytest.raises(error, match="read_layers"):
        select_layers(layers, 5, argument="read_layers")
