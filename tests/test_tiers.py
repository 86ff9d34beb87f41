"""helpers.matrix, which splits a parameter matrix between the fast tier and the full tier: the fast
cases cover what they claim (one case, each value, each pair), the rest carry ``slow``, every
case of the product is kept, and ids and marks come through."""
import itertools

import pytest
import torch

from helpers import matrix


def _cases(mark):
    """(values by argname, id, is slow, other mark names) of each case of a matrix decorator."""
    assert mark.name == "parametrize"
    names, params = mark.args
    out = []
    for p in params:
        marks = [m.name for m in p.marks]
        out.append((dict(zip(names, p.values)), p.id, "slow" in marks, [m for m in marks if m != "slow"]))
    return out


AXES = dict(a=(1, 2, 3), b=("x", "y", "z", "w"), c=(torch.float32, torch.bfloat16), d=((3, 3, 3), (5, 5, 5)))


@pytest.mark.parametrize("cover,strength", (("one", 0), ("each", 1), ("pairs", 2)))
def test_fast_cases_cover_what_they_claim(cover, strength):
    cases = _cases(matrix(cover=cover, **AXES))
    assert len(cases) == 3 * 4 * 2 * 2  # the full tier keeps the whole product
    fast = [values for values, _, slow, _ in cases if not slow]
    for axes in itertools.combinations(AXES, strength):
        wanted = set(itertools.product(*(AXES[a] for a in axes)))
        got = {tuple(v[a] for a in axes) for v in fast}
        assert got == wanted, (cover, axes)
    # and no more than needed: one case; the longest axis; at most a few more than 4 x 3 pairs
    assert len(fast) <= {"one": 1, "each": 4, "pairs": 16}[cover]


def test_ids_marks_where_prefer_and_joint_axes():
    skip = pytest.mark.skipif(False, reason="example")
    cases = _cases(matrix(cover="one", dtype=[torch.float16, pytest.param(torch.bfloat16, marks=skip)],
                          **{"kernel,scale": [pytest.param((5, 5, 5), False, id="5x5x5"), pytest.param((7, 7, 7), True, id="7x7x7-scale")]},
                          arch=(80, 90), where=lambda dtype, kernel, scale, arch: not (arch == 80 and scale),
                          prefer=lambda dtype, kernel, scale, arch: arch == 90 and dtype == torch.bfloat16))
    ids = [i for _, i, _, _ in cases]
    assert ids == ["float16-5x5x5-80", "float16-5x5x5-90", "float16-7x7x7-scale-90",
                   "bfloat16-5x5x5-80", "bfloat16-5x5x5-90", "bfloat16-7x7x7-scale-90"]
    fast = [(values, i, other) for values, i, slow, other in cases if not slow]
    assert fast == [(dict(dtype=torch.bfloat16, kernel=(5, 5, 5), scale=False, arch=90), "bfloat16-5x5x5-90", ["skipif"])]
