"""Tests for tf_dpsat.accounting against published epsilon values."""

import math
import subprocess
import sys

import pytest

from tf_dpsat import accounting

CIFAR_Q, CIFAR_STEPS = 256 / 50000, 5860  # 30 epochs of 50000 at batch 256.
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


def test_poisson_steps_round_up():
    assert accounting.poisson_steps(num_examples=50000, batch_size=256,
                                    epochs=30) == CIFAR_STEPS
    assert accounting.poisson_steps(num_examples=5000, batch_size=50,
                                    epochs=0.1) == 10  # Not 11 from float error.
    assert accounting.poisson_steps(num_examples=100, batch_size=30,
                                    epochs=1) == 4


def test_microbatching_halves_effective_sigma():
    assert accounting.effective_noise_multiplier(
        1.2, batch_size=256, num_microbatches=64) == pytest.approx(0.6)
    # One example per microbatch is per-example clipping: no doubling.
    assert accounting.effective_noise_multiplier(
        1.2, batch_size=256, num_microbatches=256) == 1.2
    assert accounting.effective_noise_multiplier(1.2, batch_size=256) == 1.2


def test_once_per_epoch_is_unsubsampled_gaussian_composition():
    per_epoch = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=2.0, epochs=4.5)
    full_batches = accounting.compute_epsilon(
        noise_multiplier=2.0, sampling_probability=1.0, steps=5)
    assert per_epoch == pytest.approx(full_batches)


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
    assert "5860 steps" in text
    assert "Poisson sampling (*):" in text and "2.984" in text
    shuffled = accounting.compute_epsilon_once_per_epoch(
        noise_multiplier=TF_PRIVACY_SIGMA, epochs=30)
    assert f"{shuffled:.3f}" in text
    assert "once per epoch" in text and "shuffled" in text
    assert "WARNING" in text
    assert "without microbatching" in text


def test_statement_accounts_for_microbatching_and_queries():
    text = _flat(_statement(num_microbatches=64, queries_per_step=2))
    assert "with microbatching" in text
    assert "0.44883325" in text  # sigma / 2
    halved_two_queries = accounting.compute_epsilon(
        noise_multiplier=TF_PRIVACY_SIGMA / 2, sampling_probability=CIFAR_Q,
        steps=CIFAR_STEPS, queries_per_step=2)
    assert f"{halved_two_queries:.3f}" in text
    assert "sqrt(2)" in text


def test_statement_without_big_gap_does_not_warn():
    # Batch = dataset: both analyses are the same unsubsampled Gaussian.
    text = _statement(num_examples=1000, batch_size=1000, noise_multiplier=5.0,
                      epochs=3)
    assert "WARNING" not in text


def test_cli_statement(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", f"--noise_multiplier={TF_PRIVACY_SIGMA}"
                            ]) == 0
    out = capsys.readouterr().out
    assert out == _statement()


def test_cli_calibration(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--epsilon=3"]) == 0
    first, rest = capsys.readouterr().out.split("\n", 1)
    assert first.startswith("Calibrated noise multiplier: ")
    sigma = float(first.split()[3])
    assert sigma == pytest.approx(TF_PRIVACY_SIGMA, rel=5e-3)
    assert rest.lstrip("\n") == _statement(noise_multiplier=sigma)


def test_cli_calibration_with_microbatching_reports_optimizer_sigma(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--epsilon=3",
                            "--num_microbatches=128"]) == 0
    sigma = float(capsys.readouterr().out.split()[3])
    assert sigma == pytest.approx(2 * TF_PRIVACY_SIGMA, rel=5e-3)
    assert accounting.compute_epsilon(noise_multiplier=sigma / 2,
                                      sampling_probability=CIFAR_Q,
                                      steps=CIFAR_STEPS) <= 3


def test_cli_reports_bad_input(capsys):
    assert accounting.main(["--num_examples=50000", "--batch_size=256",
                            "--epochs=30", "--noise_multiplier=1",
                            "--delta=0"]) == 2
    assert "delta=0.0 > 0" in capsys.readouterr().err


def test_cli_subprocess():
    result = subprocess.run(
        [sys.executable, "-m", "tf_dpsat.accounting", "--num_examples=60000",
         "--batch_size=256", "--epochs=15", "--noise_multiplier=1.1",
         "--accountant=pld"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PLD accounting" in result.stdout
    assert "Poisson sampling (*):" in result.stdout


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
