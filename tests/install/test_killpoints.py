"""The crash harness's sample of kill points (tests/install/killpoints.py), on a run shaped like the
ready HGX's: many writes, a few of each other kind, the enroll steps in the middle."""

from __future__ import annotations

from tests.install.killpoints import sample

RUN = (
    [f"write /etc/x{i}" for i in range(20)]
    + ["run systemctl daemon-reload", "link /etc/vectorlay/identity"]
    + [f"enroll step-{i}" for i in range(5)]
    + [f"sync /var/lib/x{i}" for i in range(10)]
    + [f"write /var/lib/y{i}" for i in range(30)]
    + ["remove /etc/old", "run systemctl restart node-agent"]
)


def test_the_sample_keeps_the_ends_and_one_point_of_every_kind() -> None:
    chosen = sample(RUN, 4)
    assert chosen[0] == 1 and chosen[-1] == len(RUN)
    assert {RUN[k - 1].split(" ", 1)[0] for k in chosen} == {
        "write",
        "run",
        "link",
        "enroll",
        "sync",
        "remove",
    }
    assert chosen == sorted(set(chosen)) and all(1 <= k <= len(RUN) for k in chosen)


def test_the_sample_spreads_the_rest_evenly_and_is_the_same_every_time() -> None:
    chosen = sample(RUN, 4)
    # 69 points: 1 and 69, the first of each kind (21 run, 22 link, 23 enroll, 28 sync, 68 remove),
    # and four at a fifth of the way each (14.6, 28.2, 41.8, 55.4 -> 15, 28, 42, 55).
    assert chosen == [1, 15, 21, 22, 23, 28, 42, 55, 68, 69]
    assert sample(list(RUN), 4) == chosen


def test_a_run_with_few_points_is_walked_whole() -> None:
    assert sample(RUN[:6], 4) == [1, 2, 3, 4, 5, 6]
    assert sample([], 4) == []
