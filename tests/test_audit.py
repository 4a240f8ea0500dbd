"""Tests for tf_dpsat.audit.

The one-run bound, the audit of the real optimizer and the controls it must
catch, and the command line.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tf_dpsat import audit

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------ the bound


@pytest.mark.parametrize("k", [10, 30, 100])
def test_bound_with_all_guesses_right_and_no_delta_solves_q_to_the_k(k):
    # With delta = 0 the p-value is P[Binomial(k, q) >= k] = q^k, where
    # q = e^eps / (1 + e^eps). The bound is the eps with q^k = alpha:
    #   q = alpha^(1/k),  e^eps = q / (1 - q),  eps = log(q / (1 - q)).
    # k = 10: 1.0519, k = 30: 2.2537, k = 100: 3.4930.
    q = audit.ALPHA ** (1 / k)
    expected = math.log(q / (1 - q))
    bound = audit.epsilon_lower_bound(canaries=k, guesses=k, correct=k,
                                      delta=0.0)
    assert bound == pytest.approx(expected, abs=1e-6)
    # Reported on the rejected side of the root.
    assert audit.p_value(bound, canaries=k, guesses=k, correct=k,
                         delta=0.0) <= audit.ALPHA


def test_p_value_matches_the_formula_written_out_with_delta():
    # m = 50, r = 10, v = 9, eps = 1, delta = 1e-3, by hand:
    #   P[W >= 9] + 2 m delta max_{i=1..9} P[9 - i <= W < 9] / i,
    # W ~ Binomial(10, e / (1 + e)), with math.comb (no scipy).
    m, r, v, eps, delta = 50, 10, 9, 1.0, 1e-3
    q = math.exp(eps) / (1 + math.exp(eps))

    def pmf(j):
        return math.comb(r, j) * q**j * (1 - q)**(r - j)

    tail = sum(pmf(j) for j in range(v, r + 1))
    window = max(sum(pmf(v - j) for j in range(1, i + 1)) / i
                 for i in range(1, v + 1))
    expected = tail + 2 * m * delta * window
    assert audit.p_value(eps, canaries=m, guesses=r, correct=v,
                         delta=delta) == pytest.approx(expected, rel=1e-12)
    # The delta term matters here: it is not the plain binomial tail.
    assert expected > tail * 1.05


def test_bound_without_delta_inverts_the_binomial_tail():
    # r = 100, v = 80, delta = 0: the bound is the eps whose tail
    # P[Binomial(100, q) >= 80], q = e^eps / (1 + e^eps), equals alpha;
    # the tail is summed here with math.comb, independently of scipy.
    bound = audit.epsilon_lower_bound(canaries=1000, guesses=100, correct=80,
                                      delta=0.0)

    def tail(eps):
        q = math.exp(eps) / (1 + math.exp(eps))
        return sum(math.comb(100, j) * q**j * (1 - q)**(100 - j)
                   for j in range(80, 101))

    assert tail(bound) == pytest.approx(audit.ALPHA, rel=1e-6)
    assert tail(bound + 1e-3) > audit.ALPHA  # the largest rejected eps
    assert bound == pytest.approx(0.9584, abs=1e-4)


@pytest.mark.parametrize("m, r, v, delta, published", [
    # Values printed in Steinke, Nasr, Jagielski, arXiv:2305.08846v1:
    # Appendix D's example and Section 7 (Fig. 11), both at alpha = 0.05.
    (1000, 100, 75, 1e-4, 0.673),
    (100000, 1510, 1439, 1e-5, 2.675),
])
def test_bound_reproduces_values_printed_in_the_paper(m, r, v, delta,
                                                      published):
    bound = audit.epsilon_lower_bound(canaries=m, guesses=r, correct=v,
                                      delta=delta)
    # Printed to three decimals (2.6759 appears as 2.675): within 1e-3.
    assert bound == pytest.approx(published, abs=1e-3)


def test_bound_is_zero_at_chance_and_grows_with_correct_guesses():
    bounds = [audit.epsilon_lower_bound(canaries=200, guesses=40, correct=v,
                                        delta=1e-5) for v in (20, 30, 35, 40)]
    assert bounds[0] == 0.0
    assert bounds == sorted(bounds) and bounds[1] < bounds[2] < bounds[3]


def test_bound_refuses_impossible_counts():
    with pytest.raises(ValueError, match="correct=5 <= guesses=4"):
        audit.epsilon_lower_bound(canaries=10, guesses=4, correct=5,
                                  delta=1e-5)
    with pytest.raises(ValueError, match="Expected canaries=0 >= 1"):
        audit.p_value(1.0, canaries=0, guesses=0, correct=0, delta=1e-5)
    with pytest.raises(ValueError, match="k_plus \\+ k_minus = 300 <= "
                                         "canaries=200"):
        audit.one_run_audit(canaries=200, k_plus=150, k_minus=150)


# ------------------------------------------------------------------ the audit

# A small seeded audit (about 2 s of training each): 200 canaries, 20
# guesses on each side, 30 steps over the first 500 digits.
_SMALL = dict(epsilon=1.0, canaries=200, k_plus=20, k_minus=20, steps=30,
              expected_batch_size=200, num_real_examples=500, seed=3,
              log_every=0)
# The most 40 guesses can show: all 40 right. With delta = 0 that is
# log(q / (1 - q)) for q = 0.05^(1/40), i.e. 2.554; the delta term
# (2 m delta = 0.004) takes it to 2.548. 39/40 right gives 2.055 and 38/40
# only 1.739, so a bound >= 2 needs at least 39 of the 40 guesses right.
_REACHABLE = 2.548


@pytest.mark.parametrize("auditor", audit.AUDITORS)
@pytest.mark.slow
def test_real_optimizer_stays_below_its_claim(auditor):
    result = audit.one_run_audit(auditor=auditor, **_SMALL)
    # If the training is (1, 1e-5)-DP, the bound exceeds 1 with probability
    # <= alpha = 5% over the canaries' inclusion; this seed gives 0.03
    # (white box, 26/40 right) and 0.0 (black box, 25/40), far from 1.
    assert result.epsilon == pytest.approx(1.0, abs=1e-3)
    assert result.epsilon_lower_bound <= result.epsilon
    assert result.guesses == 40 and result.canaries == 200
    assert result.max_epsilon_lower_bound == pytest.approx(_REACHABLE, abs=1e-3)
    assert result.steps == 30 and result.noise_multiplier > 0


@pytest.mark.slow
def test_the_audited_mechanism_does_not_depend_on_which_canaries_are_in():
    # q and sigma must be fixed before the canaries are drawn: from the
    # expected size, 500 real + 200 / 2 canaries, q = 200 / 600 = 1/3,
    # whatever the count drawn (seeds 3 and 4 draw different counts).
    runs = [audit.one_run_audit(auditor="white_box", **dict(_SMALL, seed=seed))
            for seed in (3, 4)]
    assert runs[0].canaries_in != runs[1].canaries_in
    for run in runs:
        assert run.sampling_probability == 200 / 600
        assert run.num_examples == 500 + run.canaries_in
    assert runs[0].noise_multiplier == runs[1].noise_multiplier
    assert runs[0].epsilon == runs[1].epsilon


@pytest.mark.parametrize("auditor", audit.AUDITORS)
@pytest.mark.parametrize("control", ["no_noise", "no_clipping"])
@pytest.mark.slow
def test_controls_are_caught(auditor, control):
    result = audit.one_run_audit(auditor=auditor, control=control, **_SMALL)
    # The claim stays epsilon = 1; a bound >= 2 refutes it at 95% confidence
    # and needs >= 39 of the 40 guesses right (see _REACHABLE).
    assert result.control == control
    assert result.epsilon == pytest.approx(1.0, abs=1e-3)
    assert result.epsilon_lower_bound >= 2.0
    assert result.epsilon_lower_bound > result.epsilon + 1
    if control == "no_noise":
        # Out-canary rows get no gradient and no noise: they score exactly
        # their initial value, and an in-canary sampled at least once (each
        # misses all 30 steps with probability (1 - 0.336)^30 ~ 5e-6) scores
        # above it. So every guess is right: the reachable maximum.
        assert result.correct == 40
        assert result.epsilon_lower_bound == pytest.approx(_REACHABLE,
                                                           abs=1e-3)


@pytest.mark.parametrize("control,clip,noise_std", [
    # (clip norm, noise standard deviation noise_multiplier * clip) that each
    # control's optimizer runs with, for sigma 4 and C 0.5: the real one
    # (C, sigma C = 2), no noise (C, 0), no clipping (1e6, still sigma C = 2),
    # half the noise (C, sigma C / 2 = 1).
    ("none", 0.5, 2.0),
    ("no_noise", 0.5, 0.0),
    ("no_clipping", 1e6, 2.0),
    ("half_noise", 0.5, 1.0),
])
def test_each_control_breaks_what_it_names(control, clip, noise_std):
    from tf_dpsat.audit import _training
    optimizer = _training._optimizer(
        control, 4.0, l2_norm_clip=0.5, no_clipping_norm=1e6,
        learning_rate=1.0, expected_batch_size=10)
    assert optimizer.l2_norm_clip == clip
    assert optimizer.noise_multiplier * optimizer.l2_norm_clip == pytest.approx(
        noise_std, rel=1e-12)
    assert set(audit.CONTROLS) == {"none", "no_noise", "no_clipping", "half_noise"}


# ------------------------------------------------------------------ the CLI


def _run_cli(*args):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "tf_dpsat.audit", *args],
                          capture_output=True, text=True, cwd=REPO_ROOT,
                          env=env, timeout=300, check=False)


@pytest.mark.slow
def test_cli_help_documents_every_option_without_runpy_warning():
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    assert "RuntimeWarning" not in result.stderr
    for option in ("--epsilon", "--canaries", "--auditor", "--control",
                   "--output_json", "--seed", "--delta", "--steps",
                   "--batch_size", "--guesses_per_side"):
        assert option in result.stdout
    from tf_dpsat.audit import __main__ as cli
    actions = cli.parser()._actions
    assert len(actions) == 11  # --help and the ten options above
    assert all(action.help for action in actions)


@pytest.mark.slow
def test_cli_writes_the_result_as_json(tmp_path):
    output = tmp_path / "audit.json"
    # q = 500 / ~1550 and 30 steps: an in-canary is never sampled with
    # probability (1 - q)^30 ~ 1e-5, so none ties with the out-canaries at 0.
    result = _run_cli("--epsilon=1", "--canaries=100", "--steps=30",
                      "--batch_size=500", "--control=no_noise", "--seed=5",
                      f"--output_json={output}")
    assert "RuntimeWarning" not in result.stderr
    record = json.loads(output.read_text())
    # Without noise all 10 + 10 guesses are right: the bound is the most 20
    # guesses allow at m = 100, log(q / (1 - q)) with q = 0.05^(1/20), i.e.
    # 1.82 less the delta term, which refutes the claimed epsilon = 1: the
    # command fails (status 1) as a release check should.
    assert record["epsilon"] == pytest.approx(1.0, abs=1e-3)
    assert record["canaries"] == 100 and record["guesses"] == 20
    assert record["correct"] == 20
    assert record["epsilon_lower_bound"] == pytest.approx(
        audit.max_epsilon_lower_bound(canaries=100, guesses=20, delta=1e-5))
    assert record["epsilon_lower_bound"] > 1.7
    assert result.returncode == 1, result.stderr
    assert "FAIL: epsilon lower bound" in result.stdout
