"""Traffic split between model versions: policy loading, weights, stickiness, replay."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from randkit import UserError, global_rng_guard
from randkit.serve.traffic import (
    Router,
    TrafficPolicy,
    effective_weights,
    latest_version,
    load_policy,
    resolve_version,
    sorted_versions,
)

VERSIONS = ["1", "2", "3"]
CANARY = TrafficPolicy(labels={"stable": "1", "canary": "2"}, weights={"stable": 90, "canary": 10})


def route_many(router: Router, n: int, available: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for request in range(n):
        version = router.route(request, None, available)
        assert version is not None
        counts[version] = counts.get(version, 0) + 1
    return counts


def within_sigmas(count: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_split_follows_weights() -> None:
    n = 10_000
    counts = route_many(Router(CANARY, "digits", seed=11), n, ["1", "2"])
    assert set(counts) == {"1", "2"}
    assert within_sigmas(counts["2"], n, 0.10)
    chi2 = stats.chisquare([counts["1"], counts["2"]], [0.9 * n, 0.1 * n])
    assert chi2.pvalue > 1e-4


def test_same_request_same_version_and_seed_matters() -> None:
    a, b = Router(CANARY, "digits", seed=3), Router(CANARY, "digits", seed=3)
    first = [a.route(r, None, ["1", "2"]) for r in range(500)]
    assert first == [a.route(r, None, ["1", "2"]) for r in range(500)]
    assert first == [b.route(r, None, ["1", "2"]) for r in reversed(range(500))][::-1]
    other_seed = [Router(CANARY, "digits", seed=4).route(r, None, ["1", "2"]) for r in range(500)]
    other_model = [Router(CANARY, "text", seed=3).route(r, None, ["1", "2"]) for r in range(500)]
    assert first != other_seed and first != other_model


def test_sticky_keys_keep_their_version() -> None:
    policy = CANARY.model_copy(update={"sticky": True})
    router = Router(policy, "digits", seed=5)
    rng = np.random.default_rng(2024)
    keys = [f"user-{x:016x}" for x in rng.integers(0, 2**62, size=1000)]
    requests = rng.permutation(10 * len(keys)).reshape(len(keys), 10)
    chosen = []
    for key, numbers in zip(keys, requests, strict=True):
        seen = {router.route(int(r), key, ["1", "2"]) for r in numbers[:5]}
        assert len(seen) == 1, key
        chosen.append(seen.pop())
    assert within_sigmas(chosen.count("2"), len(keys), 0.10)
    # Another seed reshuffles which keys land where.
    other = Router(policy, "digits", seed=6)
    assert chosen != [other.route(0, key, ["1", "2"]) for key in keys]


def test_sticky_without_key_draws_per_request() -> None:
    sticky = Router(CANARY.model_copy(update={"sticky": True}), "digits", seed=8)
    plain = Router(CANARY, "digits", seed=8)
    routes = [sticky.route(r, None, ["1", "2"]) for r in range(300)]
    assert routes == [plain.route(r, None, ["1", "2"]) for r in range(300)]
    assert len(set(routes)) == 2


def test_labels_resolve() -> None:
    assert resolve_version(CANARY, VERSIONS, "canary") == "2"
    assert resolve_version(CANARY, VERSIONS, "3") == "3"
    assert resolve_version(CANARY, VERSIONS, "beta") is None
    assert resolve_version(CANARY, ["2", "3"], "stable") is None  # label to a missing version


def test_unavailable_versions_excluded_and_renormalized() -> None:
    policy = TrafficPolicy(weights={"1": 50, "2": 30, "3": 20})
    assert effective_weights(policy, ["1", "3"]) == {"1": 50, "3": 20}
    n = 7_000
    counts = route_many(Router(policy, "digits", seed=1), n, ["1", "3"])
    assert set(counts) == {"1", "3"}
    assert within_sigmas(counts["3"], n, 20 / 70)


def test_version_named_twice_sums() -> None:
    policy = TrafficPolicy(labels={"stable": "1"}, weights={"stable": 25, "1": 25, "2": 50})
    assert effective_weights(policy, ["1", "2"]) == {"1": 50, "2": 50}


def test_no_policy_serves_latest(tmp_path: Path) -> None:
    policy = load_policy(tmp_path / "policy.yaml", ["9", "10"])
    assert policy == TrafficPolicy()
    router = Router(policy, "digits", seed=0)
    assert {router.route(r, None, ["9", "10", "2"]) for r in range(50)} == {"10"}
    assert router.route(0, None, ["b", "a"]) == "b"
    assert router.route(0, None, []) is None
    assert sorted_versions(["10", "9", "1"]) == ["1", "9", "10"]
    assert latest_version(["v10", "v9"]) == "v9"  # not all digits: string order


def test_no_positive_weight_available_falls_back_to_latest() -> None:
    policy = TrafficPolicy(weights={"1": 100, "2": 0})
    router = Router(policy, "digits", seed=0)
    assert {router.route(r, None, ["2", "3"]) for r in range(50)} == {"3"}
    assert {router.route(r, None, ["1", "2", "3"]) for r in range(50)} == {"1"}


def test_load_policy_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "labels: {stable: 1, canary: '2'}\nweights: {stable: 90, 2: 10}\n"
        "sticky: true\nbaseline: stable\nalpha: 0.01\nmin_samples: 50\n"
    )
    policy = load_policy(path, VERSIONS)
    assert policy.labels == {"stable": "1", "canary": "2"}
    assert policy.weights == {"stable": 90.0, "2": 10.0}
    assert (policy.sticky, policy.baseline, policy.alpha, policy.min_samples) == (
        True,
        "stable",
        0.01,
        50,
    )
    (tmp_path / "empty.yaml").write_text("")
    assert load_policy(tmp_path / "empty.yaml", VERSIONS) == TrafficPolicy()


BAD_POLICIES = [
    ("labels: [stable", "policy.yaml", "YAML"),
    ("- 1\n- 2\n", "policy.yaml", "list"),
    ("weight: {'1': 1}\n", "policy.yaml: weight", "unknown field"),
    ("labels: {stable: '7'}\n", "policy.yaml: labels.stable", "'7'"),
    ("labels: {'bad label': '1'}\n", "policy.yaml: labels", "'bad label'"),
    ("labels: {'1': '2'}\n", "policy.yaml: labels.1", "also a version"),
    ("weights: {'7': 10}\n", "policy.yaml: weights.7", "'7'"),
    ("weights: {'1': -5}\n", "policy.yaml: weights.1", "-5"),
    ("weights: {'1': .nan}\n", "policy.yaml: weights.1", "nan"),
    ("weights: {'1': .inf}\n", "policy.yaml: weights.1", "inf"),
    ("weights: {'1': ten}\n", "policy.yaml: weights.1", "'ten'"),
    ("weights: {'1': 0, '2': 0.0}\n", "policy.yaml: weights", "at least one"),
    ("sticky: maybe\n", "policy.yaml: sticky", "'maybe'"),
    ("baseline: gold\n", "policy.yaml: baseline", "'gold'"),
    ("alpha: 1.5\n", "policy.yaml: alpha", "1.5"),
    ("min_samples: 0\n", "policy.yaml: min_samples", "0"),
]


@pytest.mark.parametrize(("text", "field", "value"), BAD_POLICIES)
def test_bad_policy_is_a_user_error(tmp_path: Path, text: str, field: str, value: str) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        load_policy(path, VERSIONS)
    assert info.value.field == field
    assert value in info.value.message
    assert "\n" not in str(info.value)


def test_router_leaves_global_rngs_alone() -> None:
    with global_rng_guard():
        route_many(Router(CANARY, "digits", seed=9), 200, ["1", "2"])
        sticky = Router(CANARY.model_copy(update={"sticky": True}), "digits", seed=9)
        sticky.route(0, "user-1", ["1", "2"])
