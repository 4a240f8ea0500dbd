"""Tests for tf_dpsat.accounting against published epsilon values."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from tf_dpsat import accounting

CIFAR_Q, CIFAR_STEPS = 256 / 50000, 5860  # 30 epochs of 50000 at batch 256.
# The same run as the trainer counts it (and the statement and the CLI):
# round(50000 / 256) = 195 steps per epoch, 30 epochs; tensorflow-privacy's
# ceil(30 * 50000 / 256) = 5860 above.
STATEMENT_STEPS = 5850
TF_PRIVACY_SIGMA = 0.8976665  # tensorflow-privacy compute_noise(..., eps=3).


# (sigma, q, steps, epsilon) at delta=1e-5 under Poisson sampling, RDP.
@pytest.mark.parametrize("sigma, q, steps, expected", [
    (1.8408203125, 1 / 25, 750, 2.9964),  # Park et al. CIFAR-10 (Opacus).
    (2.63671875, 1 / 30, 1200, 1.9949),
    (4.8046875, 1 / 30, 1200, 0.9940),
    (TF_PRIVACY_SIGMA, CIFAR_Q, CIFAR_STEPS, 2.984),  # tensorflow-privacy.
])
def test_rdp_epsilon_matches_reference(sigma, q, steps, expected):
    epsilon = accounting.compute_epsilon(
        noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=1e-5)
    assert epsilon == pytest.approx(expected, abs=1e-3)


def test_pld_epsilon_matches_reference():
    epsilon = accounting.compute_epsilon(
        noise_multiplier=TF_PRIVACY_SIGMA, sampling_probability=CIFAR_Q,
        steps=CIFAR_STEPS, accountant="pld")
    assert epsilon == pytest.approx(2.688, abs=1e-3)


def test_two_queries_per_step_equal_one_query_at_sigma_over_sqrt2():
    sigma, q, steps = 1.8408203125, 1 / 25, 750
    two = accounting.compute_epsilon(noise_multiplier=sigma, sampling_probability=q,
                                     steps=steps, queries_per_step=2)
    one = accounting.compute_epsilon(noise_multiplier=sigma / math.sqrt(2),
                                     sampling_probability=q, steps=steps)
    assert two == pytest.approx(4.9867, abs=1e-3)
    assert two == pytest.approx(one, rel=1e-12)
    # Doubling the steps instead would under-count the privacy cost.
    doubled = accounting.compute_epsilon(noise_multiplier=sigma,
                                         sampling_probability=q, steps=2 * steps)
    assert doubled < two - 0.5


def test_no_noise_means_infinite_epsilon():
    assert math.isinf(accounting.compute_epsilon(
        noise_multiplier=0.0, sampling_probability=0.1, steps=10))


def test_calibration_is_close_to_tensorflow_privacy_and_within_target():
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=3.0, sampling_probability=CIFAR_Q, steps=CIFAR_STEPS)
    assert sigma == pytest.approx(TF_PRIVACY_SIGMA, rel=5e-3)
    assert accounting.compute_epsilon(noise_multiplier=sigma,
                                      sampling_probability=CIFAR_Q,
                                      steps=CIFAR_STEPS) <= 3.0


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.slow
def test_calibration_is_smallest_within_tolerance(accountant):
    kwargs = dict(sampling_probability=1 / 25, steps=750, accountant=accountant)
    sigma = accounting.calibrate_noise_multiplier(target_epsilon=3.0, **kwargs)
    assert accounting.compute_epsilon(noise_multiplier=sigma, **kwargs) <= 3.0
    slightly_less = sigma * (1 - 1e-3)
    assert accounting.compute_epsilon(noise_multiplier=slightly_less,
                                      **kwargs) > 3.0


def test_calibration_decreases_in_target_epsilon():
    targets = [0.5, 1.0, 2.0, 4.0, 8.0]
    sigmas = [accounting.calibrate_noise_multiplier(
        target_epsilon=t, sampling_probability=1 / 30, steps=1200) for t in targets]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:]))
    for target, sigma in zip(targets, sigmas):
        assert accounting.compute_epsilon(noise_multiplier=sigma,
                                          sampling_probability=1 / 30,
                                          steps=1200) <= target


def test_calibration_with_two_queries_scales_by_sqrt2():
    kwargs = dict(target_epsilon=3.0, sampling_probability=1 / 25, steps=750)
    one = accounting.calibrate_noise_multiplier(**kwargs)
    two = accounting.calibrate_noise_multiplier(queries_per_step=2, **kwargs)
    assert two == pytest.approx(one * math.sqrt(2), rel=2e-3)


def test_poisson_steps_are_the_trainers_round_n_over_b_per_epoch():
    assert accounting.poisson_steps(num_examples=50000, batch_size=256,
                                    epochs=30) == STATEMENT_STEPS
    # The case: the trainer runs 234, not ceil(60000 / 256) = 235.
    assert accounting.poisson_steps(num_examples=60000, batch_size=256,
                                    epochs=1) == 234
    assert accounting.poisson_steps_per_epoch(num_examples=60000,
                                              batch_size=256) == 234
    assert accounting.poisson_steps(num_examples=5000, batch_size=50,
                                    epochs=0.1) == 10  # Not 11 from float error.
    assert accounting.poisson_steps(num_examples=100, batch_size=30,
                                    epochs=1) == 3
    assert accounting.poisson_steps(num_examples=100, batch_size=40,
                                    epochs=1) == 3  # 2.5 rounds half up.
    # A started step counts: 1.5 epochs of 3 steps.
    assert accounting.poisson_steps(num_examples=100, batch_size=30,
                                    epochs=1.5) == 5


def test_microbatching_halves_effective_sigma():
    assert accounting.effective_noise_multiplier(
        1.2, batch_size=256, num_microbatches=64) == pytest.approx(0.6)
    # One example per microbatch is per-example clipping: no doubling.
    assert accounting.effective_noise_multiplier(
        1.2, batch_size=256, num_microbatches=256) == 1.2
    assert accounting.effective_noise_multiplier(1.2, batch_size=256) == 1.2


def test_once_per_epoch_is_unsubsampled_gaussian_composition():
    # Replace-one adjacency: sensitivity 2C, so sigma 2 acts as sigma 1.
    per_epoch = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=2.0, epochs=4.5)
    full_batches = accounting.compute_epsilon(
        noise_multiplier=1.0, sampling_probability=1.0, steps=5)
    assert per_epoch == pytest.approx(full_batches, rel=1e-12)


def _gaussian_rdp_epsilon(sigma, compositions, delta):
    """Independent reference: `compositions` Gaussian mechanisms of sensitivity 1.

    RDP of one is alpha / (2 sigma^2) (Mironov 2017, Prop. 7); it composes
    additively; Balle et al. (2020, Thm. 21) convert it with
    eps = rdp + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1),
    minimised over the orders.
    """
    orders = np.array(accounting.RDP_ORDERS, dtype=float)
    rdp = compositions * orders / (2 * sigma**2)
    return float(np.min(rdp + np.log((orders - 1) / orders)
                        - (np.log(delta) + np.log(orders)) / (orders - 1)))


def test_shuffle_accounting_uses_sensitivity_2c():
    # sigma = 4 on two epochs: the effective sigma is 4 / 2 = 2, i.e.
    # rdp(alpha) = 2 * alpha / (2 * 2^2) = alpha / 4; the minimum over the
    # orders is at alpha = 7.2: 1.8 + log(6.2 / 7.2) - (log 1e-5 + log 7.2) / 6.2
    # = 1.8 - 0.14953 + 1.53853 = 3.18899.
    epsilon = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=4.0, epochs=2, delta=1e-5)
    assert epsilon == pytest.approx(3.188992, abs=1e-6)
    assert epsilon == pytest.approx(_gaussian_rdp_epsilon(2.0, 2, 1e-5), rel=1e-12)


def test_shuffle_calibration_doubles_the_sensitivity_c_sigma():
    # Target 3 over two epochs. Under sensitivity C, sigma_C = 2.11272 is the
    # smallest 6-digit sigma with eps(sigma_C) <= 3 (the reference above gives
    # 2.998 there and > 3 just below); replace-one needs twice that, 4.22544.
    sensitivity_c = accounting.calibrate_noise_multiplier(
        target_epsilon=3.0, sampling_probability=1.0, steps=2, delta=1e-5)
    shuffle = accounting.calibrate_noise_multiplier_once_per_epoch(
        target_epsilon=3.0, epochs=2, delta=1e-5)
    assert sensitivity_c == pytest.approx(2.11272, abs=1e-5)
    assert shuffle == 2 * sensitivity_c == pytest.approx(4.22544, abs=2e-5)
    assert _gaussian_rdp_epsilon(shuffle / 2, 2, 1e-5) <= 3.0
    assert _gaussian_rdp_epsilon(shuffle / 2 * (1 - 1e-3), 2, 1e-5) > 3.0
    assert accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=shuffle, epochs=2, delta=1e-5) <= 3.0
    # A partial epoch counts as a whole one.
    assert accounting.calibrate_noise_multiplier_once_per_epoch(
        target_epsilon=3.0, epochs=1.5, delta=1e-5) == shuffle


def test_sampler_tail_delta_hand_computed():
    # epsilon 2, 1000 steps, 2 queries, 1001 parameters: ceil(1001 / 2) = 501
    # pairs per query, 1000 * 2 * 501 = 1,002,000 pairs in all, each truncated
    # with probability 2^-64: eta = 1,002,000 / 18,446,744,073,709,551,616
    # = 5.43189e-14, times (1 + e^2) = 8.389056 gives 4.556812e-13.
    value = accounting.sampler_tail_delta(2.0, 1000, 2, 1001)
    assert value == pytest.approx(4.556812e-13, rel=1e-6)
    assert value == (1 + math.exp(2.0)) * 1_002_000 * 2.0**-64
    assert accounting.sampler_tail_delta(2.0, 0, 1, 10) == 0.0
    # The TV argument: overflow probability 1e-8 at epsilon 1 costs
    # (1 + e) * 1e-8 = 3.718282e-8.
    assert accounting.padding_overflow_delta(1.0, 1e-8) == pytest.approx(
        3.718282e-8, rel=1e-6)
    parts = accounting.delta_breakdown(epsilon=1.0, delta=1e-5, steps=10,
                                       queries_per_step=1, num_params=3,
                                       overflow_probability=1e-8)
    # noise tail: (1 + e) * 10 * 2 * 2^-64 = 4.031369e-18.
    assert parts.noise_tail == pytest.approx(4.031369e-18, rel=1e-6)
    assert parts.accountant == 1e-5
    assert parts.padding_overflow == accounting.padding_overflow_delta(1.0, 1e-8)
    assert parts.total == 1e-5 + parts.noise_tail + parts.padding_overflow
    with pytest.raises(ValueError, match="num_params"):
        accounting.sampler_tail_delta(1.0, 10, 1, 0)
    with pytest.raises(ValueError, match="eta"):
        accounting.total_variation_delta(1.0, 1.5)


def test_statement_names_adjacency_total_delta_and_non_private_values():
    text = _flat(_statement(num_params=1000, overflow_probability=1e-8))
    assert "(*) Add/remove-one adjacency" in text
    assert "(**) Replace-one adjacency (sensitivity 2C)" in text
    poisson = accounting.compute_epsilon(
        noise_multiplier=TF_PRIVACY_SIGMA, sampling_probability=CIFAR_Q,
        steps=STATEMENT_STEPS)
    parts = accounting.delta_breakdown(
        epsilon=poisson, delta=1e-5, steps=STATEMENT_STEPS, queries_per_step=1,
        num_params=1000, overflow_probability=1e-8)
    # (1 + e^2.98) * 1e-8 = 2.07e-7 for the overflow term.
    assert parts.padding_overflow == pytest.approx(
        (1 + math.exp(poisson)) * 1e-8, rel=1e-12)
    assert parts.padding_overflow == pytest.approx(2.07e-7, rel=5e-3)
    assert f"(*) {accounting.format_delta_breakdown(parts)}" in text
    for name in accounting.NON_PRIVATE_DIAGNOSTICS:
        assert name in text
    assert "Not private" in text
    assert "Total delta" not in _flat(_statement())


def _statement(**overrides):
    kwargs = dict(num_examples=50000, batch_size=256,
                  noise_multiplier=TF_PRIVACY_SIGMA, epochs=30)
    kwargs.update(overrides)
    return accounting.privacy_statement(**kwargs)


def _flat(text):
    """The text with line wrapping undone, for phrase checks."""
    return " ".join(text.split())


def test_statement_reports_both_analyses_and_warns():
    text = _flat(_statement())
    assert ("30 epochs = 5850 steps (round(num_examples / batch_size) per "
            "epoch, as the trainer runs)") in text
    poisson = accounting.compute_epsilon(
        noise_multiplier=TF_PRIVACY_SIGMA, sampling_probability=CIFAR_Q,
        steps=STATEMENT_STEPS)
    assert f"Poisson sampling (*): {poisson:.3f}" in text
    shuffled = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=TF_PRIVACY_SIGMA, epochs=30)
    assert f"{shuffled:.3f}" in text
    assert "once per epoch" in text and "shuffled" in text
    assert "WARNING" in text
    assert "without microbatching" in text


def test_statement_accounts_for_queries():
    text = _flat(_statement(queries_per_step=2))
    two_queries = accounting.compute_epsilon(
        noise_multiplier=TF_PRIVACY_SIGMA, sampling_probability=CIFAR_Q,
        steps=STATEMENT_STEPS, queries_per_step=2)
    assert f"Poisson sampling (*): {two_queries:.3f}" in text
    assert "0.8976665 / sqrt(2) = 0.6347, subsampled once per step" in text


def _rdp_epsilon_of_gaussians(noise_multiplier, compositions, delta=1e-5):
    """Epsilon of unsubsampled Gaussians by RDP, written out independently.

    A Gaussian of noise multiplier s has RDP a / (2 s^2) at order a; the
    conversion of Balle et al. 2020 gives epsilon = RDP + log((a - 1) / a)
    - (log delta + log a) / (a - 1), minimised over the library's orders.
    """
    orders = np.asarray(accounting.RDP_ORDERS, np.float64)
    rdp = compositions * orders / (2 * noise_multiplier ** 2)
    return float(np.min(rdp + np.log((orders - 1) / orders)
                        - (math.log(delta) + np.log(orders)) / (orders - 1)))


# The microbatch run of the statement and CLI tests below: sigma 10, 3 epochs
# of 50000 examples in fixed-size batches of 300 (4 examples in each of 75
# microbatches), 2 queries per step (DP-SAM). The once-per-epoch analysis is
# 3 unsubsampled Gaussians of noise multiplier 10 / 2 / sqrt(2) = 3.5355
# (sensitivity 2C, 2 queries): RDP 3 a / 25 = 0.12 a at order a, minimal at
# a = 9.8: 1.176 + log(8.8 / 9.8) - (log 1e-5 + log 9.8) / 8.8 = 1.176 - 0.1076
# + 1.0489 = 2.117. Steps: floor(50000 / 300) = 166 per epoch, 498 in all
# (round(50000 / 300) = 167 would be the Poisson count, 501). With 1000
# parameters the sampler tail is (1 + e^2.117) * 498 * 2 * 500 * 2^-64 =
# 9.309 * 2.700e-14 = 2.51e-13 (with 501 steps: 2.53e-13).
MICROBATCH_RUN = dict(num_examples=50000, batch_size=300, noise_multiplier=10.0,
                      epochs=3, num_microbatches=75, queries_per_step=2)
MICROBATCH_EPSILON = "2.117"


def test_statement_with_microbatches_states_only_the_fixed_size_analysis():
    assert f"{_rdp_epsilon_of_gaussians(10 / 2 / math.sqrt(2), 3):.3f}" == (
        MICROBATCH_EPSILON)
    text = _flat(_statement(**MICROBATCH_RUN, num_params=1000))
    assert ("Epsilon with each example once per epoch (**): "
            f"{MICROBATCH_EPSILON}") in text
    assert "3 epochs = 498 steps (floor(num_examples / batch_size) per epoch" in text
    assert "with 75 microbatches of 4 examples per batch" in text
    assert "noise multiplier 10 / 2 = 5." in text
    assert "5 / sqrt(2) = 3.536, once per epoch for each example" in text
    assert "(**) 1e-05 + 2.51e-13 + 0 = 1e-05" in text
    # No Poisson value, footnote or comparison: tf_dpsat refuses microbatches
    # with Poisson sampling.
    assert "Epsilon with Poisson sampling" not in text
    assert "(*)" not in text and "WARNING" not in text
    assert "no epsilon with Poisson sampling is stated" in text
    # One example per microbatch is still only the fixed-size analysis.
    text = _flat(_statement(**dict(MICROBATCH_RUN, num_microbatches=300)))
    assert f"(**): {MICROBATCH_EPSILON}" in text and "(*)" not in text


def test_statement_warns_even_when_the_batch_is_the_dataset():
    # Batch = dataset: both analyses are 3 unsubsampled Gaussians, but the
    # shuffle one at sensitivity 2C, i.e. sigma 5 / 2 against sigma 5.
    text = _flat(_statement(num_examples=1000, batch_size=1000,
                            noise_multiplier=5.0, epochs=3))
    add_remove, replace = (accounting.compute_epsilon(
        noise_multiplier=sigma, sampling_probability=1.0, steps=3)
        for sigma in (5.0, 2.5))
    assert f"{add_remove:.3f}" in text and f"{replace:.3f}" in text
    assert f"differ by a factor of {replace / add_remove:.1f}" in text


def test_cli_statement(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", f"--noise_multiplier={TF_PRIVACY_SIGMA}"
                            ]) == 0
    out = capsys.readouterr().out
    assert out == _statement()


def test_cli_total_delta(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", f"--noise_multiplier={TF_PRIVACY_SIGMA}",
                            "--num_params=1000"]) == 0
    assert capsys.readouterr().out == _statement(num_params=1000)


def test_cli_calibration(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--epsilon=3"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith("Calibrated noise multiplier: ")
    sigma = float(first.split()[3])
    assert sigma == pytest.approx(TF_PRIVACY_SIGMA, rel=5e-3)
    assert rest.lstrip("\n") == _statement(noise_multiplier=sigma)


# MICROBATCH_RUN on the command line.
MICROBATCH_FLAGS = ["--num_examples=50000", "--batch_size=300", "--epochs=3",
                    "--noise_multiplier=10", "--num_microbatches=75",
                    "--queries_per_step=2"]


def test_cli_with_microbatches_prints_the_fixed_size_epsilon_only(capsys):
    assert accounting.main(MICROBATCH_FLAGS + ["--num_params=1000"]) == 0
    out = capsys.readouterr().out
    assert out == _statement(**MICROBATCH_RUN, num_params=1000)
    lines = [line.split() for line in out.splitlines() if "Epsilon with" in line]
    assert lines == [["Epsilon", "with", "each", "example", "once", "per", "epoch",
                      "(**):", MICROBATCH_EPSILON]]


def test_cli_with_microbatches_pld_matches_the_analytic_gaussian(capsys):
    # The run above under PLD: 3 Gaussians of noise multiplier 3.5355 are one
    # Gaussian of mu = sqrt(3) / 3.5355 = 0.4899, whose exact epsilon solves
    # Phi(-eps / mu + mu / 2) - e^eps Phi(-eps / mu - mu / 2) = 1e-5
    # (Balle and Wang 2018): 1.9482. The pessimistic PLD is within 1e-3.
    assert accounting.main(MICROBATCH_FLAGS + ["--accountant=pld"]) == 0
    out = capsys.readouterr().out
    assert "Poisson sampling (*)" not in out
    printed = float(out.split("once per epoch (**):")[1].split()[0])
    mu = math.sqrt(3) / (10 / 2 / math.sqrt(2))
    normal = scipy.stats.norm.cdf
    exact = scipy.optimize.brentq(
        lambda eps: normal(-eps / mu + mu / 2)
        - math.exp(eps) * normal(-eps / mu - mu / 2) - 1e-5, 0, 50)
    assert exact == pytest.approx(1.9482, abs=1e-4)
    assert printed == pytest.approx(exact, abs=1.5e-3)


def test_cli_calibration_with_microbatches_uses_the_fixed_size_analysis(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--epsilon=3",
                            "--num_microbatches=128"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith("Calibrated noise multiplier: ")
    assert ("with each example once per epoch over 30 epochs (fixed-size "
            "batches, as --num_microbatches needs)") in first
    sigma = float(first.split()[3])
    # Independently: the smallest sigma whose 30 unsubsampled Gaussians of
    # noise multiplier sigma / 2 reach epsilon 3 (16.36; the Poisson
    # calibration doubled for microbatches gave 2 * 0.8977 = 1.795).
    reference = scipy.optimize.brentq(
        lambda s: _rdp_epsilon_of_gaussians(s / 2, 30) - 3, 1, 100)
    assert reference == pytest.approx(16.36, abs=0.01)
    assert sigma == pytest.approx(reference, rel=1e-3)
    assert _rdp_epsilon_of_gaussians(sigma / 2, 30) <= 3
    assert rest.lstrip("\n") == _statement(noise_multiplier=sigma,
                                            num_microbatches=128)
    assert "Poisson sampling (*)" not in rest


def test_cli_counts_the_trainers_steps(capsys):
    assert accounting.main(["--num_examples=60000", "--batch_size=256",
                            "--epochs=1", "--epsilon=3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "with Poisson sampling over 234 steps" in out
    assert "1 epochs = 234 steps (round(num_examples / batch_size) per epoch" in out


def test_cli_reports_bad_input(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--noise_multiplier=1",
                            "--delta=0"]) == 2
    assert "delta=0.0 > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "tf_dpsat.accounting", "--num_examples=60000",
         "--batch_size=256", "--epochs=15", "--noise_multiplier=1.1",
         "--accountant=pld"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PLD accounting" in result.stdout
    assert "Poisson sampling (*):" in result.stdout


@pytest.mark.slow
def test_import_registers_no_absl_flags():
    # In a fresh interpreter: the training binary defines --epsilon/--delta, so
    # importing the accounting module must not define flags of its own.
    code = ("from absl import flags; import tf_dpsat.accounting; "
            "print(sorted(n for n in ('epsilon', 'delta', 'noise_multiplier', "
            "'batch_size', 'num_examples') if n in flags.FLAGS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("kwargs, message", [
    (dict(delta=0.0), "Expected delta=0.0 > 0."),
    (dict(delta=-1e-5), "delta=-1e-05"),
    (dict(delta=1.0), "Expected delta=1.0 < 1."),
    (dict(sampling_probability=0.0), "sampling_probability=0.0"),
    (dict(sampling_probability=1.5), "sampling_probability=1.5"),
    (dict(steps=0), "Expected steps=0 >= 1."),
    (dict(noise_multiplier=-1.0), "Expected noise_multiplier=-1.0 >= 0."),
    (dict(noise_multiplier=math.nan), "noise_multiplier=nan"),
    (dict(queries_per_step=0), "Expected queries_per_step=0 >= 1."),
    (dict(accountant="moments"), "accountant='moments'"),
])
def test_compute_epsilon_rejects_bad_input(kwargs, message):
    args = dict(noise_multiplier=1.0, sampling_probability=0.01, steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace(
            "(", r"\(")):
        accounting.compute_epsilon(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(target_epsilon=0.0), "Expected target_epsilon=0.0 > 0."),
    (dict(target_epsilon=-2.0), "target_epsilon=-2.0"),
    (dict(delta=0.0), "delta=0.0"),
    (dict(sampling_probability=2.0), "sampling_probability=2.0"),
    (dict(steps=0), "steps=0"),
    (dict(queries_per_step=0), "queries_per_step=0"),
    (dict(accountant="gdp"), "accountant='gdp'"),
])
def test_calibration_rejects_bad_input(kwargs, message):
    args = dict(target_epsilon=1.0, sampling_probability=0.01, steps=100)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        accounting.calibrate_noise_multiplier(**args)


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_examples=0), "num_examples=0"),
    (dict(batch_size=0), "batch_size=0"),
    (dict(batch_size=60000), "batch_size / num_examples=1.2"),
    (dict(epochs=0), "epochs=0.0"),
    (dict(noise_multiplier=-0.5), "noise_multiplier=-0.5"),
    (dict(delta=0.0), "delta=0.0"),
    (dict(num_microbatches=0), "num_microbatches=0"),
    (dict(queries_per_step=0), "queries_per_step=0"),
    (dict(accountant="x"), "accountant='x'"),
])
def test_statement_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        _statement(**kwargs)


def test_steps_must_be_an_integer():
    with pytest.raises(TypeError, match="steps"):
        accounting.compute_epsilon(noise_multiplier=1.0, sampling_probability=0.1,
                                   steps=10.5)


def test_smallest_target_epsilon_is_the_rdp_floor():
    # min over orders of log(1 - 1/a) - log(delta a) / (a - 1): order 1024 at
    # delta 1e-5 gives 0.003549..., rounded up to two digits.
    assert accounting.smallest_target_epsilon(1e-5) == 0.0036
    assert accounting.smallest_target_epsilon(1e-5, "pld") == pytest.approx(1e-3)


@pytest.mark.parametrize("target", [1e-6, 1e-3])
def test_calibration_refuses_targets_below_the_floor(target):
    with pytest.raises(ValueError, match=(
            rf"Expected target epsilon={target:g} >= 0.0036, the smallest epsilon "
            r"the RDP accountant calibrates at delta=1e-05; ask for epsilon >= "
            r"0.0036")):
        accountant_kwargs = dict(sampling_probability=256 / 60000, steps=235)
        accounting.calibrate_noise_multiplier(target_epsilon=target,
                                              **accountant_kwargs)


def test_calibration_just_above_the_floor_is_within_target():
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=0.01, sampling_probability=256 / 60000, steps=235)
    assert 0 < accounting.compute_epsilon(
        noise_multiplier=sigma, sampling_probability=256 / 60000, steps=235) <= 0.01


def test_cli_tiny_epsilon_is_one_line_error(capsys):
    assert accounting.main(["--num_examples=60000", "--batch_size=256",
                            "--epochs=1", "--epsilon=1e-6"]) == 2
    captured = capsys.readouterr()
    assert captured.err == (
        "error: Expected target epsilon=1e-06 >= 0.0036, the smallest epsilon the "
        "RDP accountant calibrates at delta=1e-05; ask for epsilon >= 0.0036 (or a "
        "larger delta).\n")


def test_statement_with_zero_poisson_epsilon_does_not_divide_by_zero():
    # sigma 1e4: the RDP conversion's total-variation branch gives epsilon 0.
    text = _flat(_statement(num_examples=60000, batch_size=256,
                            noise_multiplier=1e4, epochs=1))
    assert "Epsilon with Poisson sampling (*): 0.000" in text
    assert "differ by epsilon 0" in text


@pytest.mark.slow
def test_cli_runs_without_warnings_and_every_option_has_help():
    env = dict(os.environ, PYTHONWARNINGS="default", TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-m", "tf_dpsat.accounting", "--num_examples=60000",
         "--batch_size=256", "--epochs=1", "--noise_multiplier=1.1"],
        capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "RuntimeWarning" not in result.stderr, result.stderr[-2000:]
    options = [action for action in accounting._parser()._actions
               if action.option_strings]
    assert len(options) == 11  # --help and the ten options.
    assert all(action.help for action in options), [
        action.option_strings for action in options if not action.help]


def test_a_total_delta_of_one_or_more_is_called_vacuous():
    # MNIST-like settings at a large epsilon make (1 + e^eps) * tail exceed 1;
    # delta >= 1 bounds nothing, and the line must say so. 1e-5 + 2e-6 + 0
    # (a meaningful total) gets no such note.
    vacuous = accounting.DeltaBreakdown(
        accountant=1e-5, noise_tail=1.67e61, padding_overflow=0.0, total=1.67e61)
    assert accounting.format_delta_breakdown(vacuous) == (
        "1e-05 + 1.67e+61 + 0 = 1.67e+61 (at least 1: no guarantee at this "
        "epsilon)")
    infinite = vacuous._replace(noise_tail=float("inf"), total=float("inf"))
    assert accounting.format_delta_breakdown(infinite).endswith("no guarantee at this epsilon)")
    fine = accounting.DeltaBreakdown(1e-5, 2e-6, 0.0, 1.2e-5)
    assert accounting.format_delta_breakdown(fine) == "1e-05 + 2e-06 + 0 = 1.2e-05"
