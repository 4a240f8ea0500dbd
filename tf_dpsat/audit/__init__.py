"""One-run empirical privacy audit of tf_dpsat's DP training (DP-SAT, DP-SGD).

What: `one_run_audit(...)` trains ONE model with tf_dpsat's real data path and
optimizer (`tf_dpsat.sampling.poisson_dataset` with padding, `make_private`,
`DPSATKeras` and its clipping engine) on scikit-learn's digits plus m canaries,
each included independently with probability 1/2, then guesses from a score
per canary which canaries were included and turns the number of correct
guesses into a 95%-confidence lower bound on epsilon. Accounting proves an
upper bound for the algorithm on paper; the audit checks the code: a lower
bound above the claimed epsilon means the release is not as private as it
says (a bug in clipping, noise, sampling or accounting).

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run", NeurIPS 2023 (arXiv:2305.08846). Their main result in its (epsilon,
delta) form (Corollary 5.4 of arXiv:2305.08846v1, computed as in the paper's
Appendix D) bounds the number of correct guesses of any auditor by a binomial
tail plus a delta term; see `p_value`.

Canaries: the audit model takes d + m inputs, the d image
pixels followed by m extra features that real examples leave at 0. Canary j
is the scaled one-hot input s * e_{d+j} with the fixed label `CANARY_LABEL`,
so only canary j ever moves row d+j of the first Dense kernel. Its rows start
at 0 and the hidden layer is tanh, so at the initial weights a canary's whole
gradient lies (up to the biases) in its own row, and s is chosen so that its
norm is `CANARY_GRADIENT_MARGIN` times the clip norm C: every canary is
clipped to norm C, the worst case the accountant assumes.

Auditors:
* "white_box": sees the initial and final weights; canary j's score is the
  movement of row d+j from the initial to the final weights, projected on the
  descent direction of canary j's (clipped) gradient at the initial weights.
  Row d+j receives exactly Gaussian noise plus canary j's clipped gradient
  whenever it was sampled, so each canary is one Poisson-subsampled Gaussian
  mechanism, the strongest realistic setting for DP-SGD.
* "black_box": sees only the final model; score = minus the final model's
  cross-entropy on the canary (an out-of-distribution input: no real example
  uses its features).

Controls (`CONTROLS`), bugs the audit must catch:
* "no_noise": the optimizer gets noise_multiplier 0 while the claimed epsilon
  stays the one calibrated for sigma.
* "no_clipping": the optimizer clips at `NO_CLIPPING_NORM` (1e6, i.e. never)
  while its noise keeps the standard deviation sigma * C calibrated for the
  real clip norm C (noise_multiplier = sigma * C / 1e6): the bug of clipping
  being skipped. Canary gradients, `CANARY_GRADIENT_MARGIN` times C, then face
  noise calibrated for C, so a canary's first update carries a noise
  multiplier of sigma / margin (later ones less signal: an unclipped canary
  is soon fitted and its gradient shrinks).
* "half_noise": the optimizer adds noise of standard deviation sigma * C / 2,
  what a sensitivity of 2C under noise calibrated for C amounts to (the bug
  of an example counted twice in a step). A subtle break: it measures the
  audit's power, and one audit of the default size does not refute it.

Limits: r guesses, all right, give at most the bound of
`max_epsilon_lower_bound` (4.17 for the default 100 + 100 guesses of 1000
canaries at delta = 1e-5), so no control can refute a larger claim; and the
delta term grows as 2 m delta, which must stay well below alpha (m = 1000 at
delta = 1e-5 costs 0.02 of the 0.05), so more canaries need a smaller delta.
Refuting epsilon = 8 would take about 9,000 correct guesses.

Command line: `python -m tf_dpsat.audit --help`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any
from typing import Dict
from typing import Optional

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from tf_dpsat import validation

__all__ = [
    "AUDITORS",
    "AuditResult",
    "CONTROLS",
    "epsilon_lower_bound",
    "max_epsilon_lower_bound",
    "one_run_audit",
    "p_value",
]

AUDITORS: tuple = ("white_box", "black_box")
CONTROLS: tuple = ("none", "no_noise", "no_clipping", "half_noise")

# Every canary carries this label: a shared label makes all out-canaries
# identical at the initial weights (their rows start at 0), so the scores of
# out-canaries differ only by the noise.
CANARY_LABEL = 0
# A canary's raw gradient norm at the initial weights, in units of the clip
# norm. Above 1 every canary is clipped to exactly C (the sensitivity the
# accountant assumes). Under no_clipping the canary's first update is then
# 100x larger than with clipping; measured (seed 3, epsilon 2, defaults), a
# margin of 10 let the no_clipping control reach only 1.0-1.2 (below the
# claimed 2) because the canary's gradient shrinks as soon as it is fitted,
# while 100 reaches the maximum the canary count allows. The price is a
# larger input scale s, which amplifies the noise on a canary row into its
# tanh units; the default learning rate (0.1) keeps that below saturation.
CANARY_GRADIENT_MARGIN = 100.0
# "Never clip": far above any gradient norm the audit model produces.
NO_CLIPPING_NORM = 1e6
# The bound is a 1 - ALPHA confidence statement.
ALPHA = 0.05
# Bracket of the root finding; above it the bound is reported as this value
# (no practical canary count reaches it: see max_epsilon_lower_bound).
_MAX_EPSILON = 100.0


# ------------------------------------------------------------------ the bound


def _check_counts(canaries: int, guesses: int, correct: int) -> None:
    validation.check_int("canaries", canaries, minimum=1)
    validation.check_int("guesses", guesses, minimum=0)
    validation.check_int("correct", correct, minimum=0)
    if not correct <= guesses <= canaries:
        raise ValueError(
            f"Expected correct={correct} <= guesses={guesses} <= "
            f"canaries={canaries}: one guess per canary at most, and only "
            "guesses can be correct.")


def p_value(epsilon: float, *, canaries: int, guesses: int, correct: int,
            delta: float) -> float:
    """P-value of `correct` right guesses out of `guesses` under (eps, delta)-DP.

    Steinke, Nasr and Jagielski (NeurIPS 2023; Corollary 5.4 of
    arXiv:2305.08846v1, the (epsilon, delta) form of their main result, as
    computed by the paper's Appendix D): if the training is
    (epsilon, delta)-DP, m canaries are each included with probability 1/2
    and an auditor makes r guesses (abstaining on the rest), then the number
    of correct guesses V satisfies, for every v,

        P[V >= v] <= P[W >= v]
                     + 2 m delta * max_{i=1..v} P[v - i <= W < v] / i,
        W ~ Binomial(r, e^eps / (1 + e^eps)).

    The first term is the tail of r guesses each right with probability
    e^eps / (1 + e^eps), the best accuracy of one guess against eps-DP
    randomized response; the second pays for delta.

    Args:
      epsilon: The epsilon of the null hypothesis, >= 0.
      canaries: m, the number of canaries.
      guesses: r, the number of guesses (canaries not abstained on).
      correct: v, the number of correct guesses.
      delta: The delta of the null hypothesis, in [0, 1).

    Returns:
      The p-value, in [0, 1].

    Raises:
      ValueError, TypeError: for arguments out of range.
    """
    epsilon = validation.check_non_negative("epsilon", epsilon)
    delta = validation.check_non_negative("delta", delta)
    if delta >= 1:
        raise ValueError(f"Expected delta={delta} < 1.")
    _check_counts(canaries, guesses, correct)
    if correct == 0:
        return 1.0
    q = float(scipy.special.expit(epsilon))  # e^eps / (1 + e^eps), stably.
    tail = float(scipy.stats.binom.sf(correct - 1, guesses, q))  # P[W >= v]
    if delta == 0:
        return min(tail, 1.0)
    # P[v - i <= W < v] for i = 1..v, as cumulative sums of the pmf downwards.
    pmf = scipy.stats.binom.pmf(np.arange(correct - 1, -1, -1), guesses, q)
    window = np.cumsum(pmf) / np.arange(1, correct + 1)
    return min(tail + 2 * canaries * delta * float(window.max()), 1.0)


def epsilon_lower_bound(*, canaries: int, guesses: int, correct: int,
                        delta: float, alpha: float = ALPHA) -> float:
    """The largest epsilon that `correct` out of `guesses` rejects at level alpha.

    The p-value of `p_value` grows with epsilon (a more private algorithm
    makes many correct guesses less likely), so the bound is the root of
    p_value(eps) = alpha, found with scipy's brentq. With probability at least
    1 - alpha over the canaries' inclusion, an (eps, delta)-DP training run
    gives a bound <= eps: a larger bound refutes the claim.

    Args:
      canaries: m, the number of canaries.
      guesses: r, the number of guesses.
      correct: v, the number of correct guesses.
      delta: The delta of the claim, in [0, 1).
      alpha: Significance level in (0, 1); 0.05 is 95% confidence.

    Returns:
      The lower bound, >= 0; 0 when even epsilon = 0 is not rejected.

    Raises:
      ValueError, TypeError: for arguments out of range.
    """
    alpha = validation.check_probability("alpha", alpha)
    if alpha >= 1:
        raise ValueError(f"Expected alpha={alpha} < 1.")

    def excess(epsilon: float) -> float:
        return p_value(epsilon, canaries=canaries, guesses=guesses,
                       correct=correct, delta=delta) - alpha

    if excess(0.0) > 0:
        return 0.0
    if excess(_MAX_EPSILON) <= 0:
        return _MAX_EPSILON
    root = scipy.optimize.brentq(excess, 0.0, _MAX_EPSILON, xtol=1e-10)
    # Report a value the test does reject: brentq's root may sit a hair
    # above the crossing.
    while root > 0 and excess(root) > 0:
        root = max(root - 1e-9, 0.0)
    return float(root)


def max_epsilon_lower_bound(*, canaries: int, guesses: int, delta: float,
                            alpha: float = ALPHA) -> float:
    """The bound when every guess is right: the most the canary count allows.

    A control (a broken release) can show no more than this; a claimed epsilon
    above it cannot be refuted by this audit at any accuracy.
    """
    return epsilon_lower_bound(canaries=canaries, guesses=guesses,
                               correct=guesses, delta=delta, alpha=alpha)


# ----------------------------------------------------------------- the audit


@dataclasses.dataclass(frozen=True)
class AuditResult:
    """The outcome of one `one_run_audit`.

    Attributes:
      epsilon: The claimed epsilon (the accountant's, for `noise_multiplier`).
      delta: The claimed delta, also the delta of the bound.
      epsilon_lower_bound: The 1 - alpha confidence lower bound on epsilon.
      max_epsilon_lower_bound: The bound had every guess been right.
      canaries: m, the number of canaries.
      canaries_in: How many canaries were included in the training set.
      guesses: r = k_plus + k_minus.
      correct: How many guesses were right.
      k_plus: Guesses "in" (the highest scores).
      k_minus: Guesses "out" (the lowest scores).
      auditor: One of `AUDITORS`.
      control: One of `CONTROLS`.
      noise_multiplier: sigma, calibrated to the claimed epsilon (the control
        may train with another).
      steps: Noisy steps of the training run.
      expected_batch_size: B; sampling probability q = B / (real examples
        + canaries / 2), the expected training-set size.
      num_examples: Training-set size: the real examples plus canaries_in.
      sampling_probability: q, fixed before the canaries are drawn.
      l2_norm_clip: C of the real run.
      alpha: Significance level of the bound.
      seed: The seed of the whole run (drawn from OS entropy if not given).
      test_accuracy: The trained model's accuracy on the digits test split.
      seconds: Wall time of the audit.
    """

    epsilon: float
    delta: float
    epsilon_lower_bound: float
    max_epsilon_lower_bound: float
    canaries: int
    canaries_in: int
    guesses: int
    correct: int
    k_plus: int
    k_minus: int
    auditor: str
    control: str
    noise_multiplier: float
    steps: int
    expected_batch_size: int
    num_examples: int
    sampling_probability: float
    l2_norm_clip: float
    alpha: float
    seed: int
    test_accuracy: float
    seconds: float

    def to_dict(self) -> Dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _check_audit_args(epsilon, delta, canaries, auditor, control, k_plus,
                      k_minus, steps, expected_batch_size, alpha) -> None:
    validation.check_positive("epsilon", epsilon)
    validation.check_delta(delta)
    validation.check_int("canaries", canaries, minimum=1)
    validation.check_one_of("auditor", auditor, AUDITORS)
    validation.check_one_of("control", control, CONTROLS)
    validation.check_int("k_plus", k_plus, minimum=0)
    validation.check_int("k_minus", k_minus, minimum=0)
    if k_plus + k_minus > canaries:
        raise ValueError(
            f"Expected k_plus + k_minus = {k_plus + k_minus} <= canaries="
            f"{canaries}: each canary gets one guess at most. Lower k_plus / "
            "k_minus or add canaries.")
    if k_plus + k_minus == 0:
        raise ValueError("Expected k_plus + k_minus > 0: an audit without "
                         "guesses bounds nothing.")
    validation.check_int("steps", steps, minimum=1)
    validation.check_int("expected_batch_size", expected_batch_size, minimum=1)
    validation.check_probability("alpha", alpha)


def _guess(scores: np.ndarray, k_plus: int, k_minus: int,
           rng: np.random.Generator) -> np.ndarray:
    """+1 ("in") for the k_plus highest scores, -1 for the k_minus lowest, else 0.

    Ties are broken at random (a stable sort of a random permutation): under
    no noise every out-canary scores exactly 0, and index order would leak
    nothing but could bias the count.
    """
    order = rng.permutation(len(scores))
    ranked = order[np.argsort(scores[order], kind="stable")]
    guesses = np.zeros(len(scores), np.int64)
    if k_minus:
        guesses[ranked[:k_minus]] = -1
    if k_plus:
        guesses[ranked[len(scores) - k_plus:]] = 1
    return guesses


def one_run_audit(*, epsilon: float = 2.0, delta: float = 1e-5,
                  canaries: int = 1000, auditor: str = "white_box",
                  control: str = "none", seed: Optional[int] = None,
                  k_plus: Optional[int] = None, k_minus: Optional[int] = None,
                  steps: int = 200, expected_batch_size: int = 250,
                  learning_rate: float = 0.1, momentum: float = 0.0,
                  rho: float = 0.03, l2_norm_clip: float = 1.0,
                  hidden_units: int = 64, num_real_examples: Optional[int] = None,
                  alpha: float = ALPHA, log_every: int = 25) -> AuditResult:
    """Trains one DP-SAT model with m canaries and lower-bounds its epsilon.

    The noise multiplier is calibrated (RDP, Poisson sampling) so that the
    run claims `epsilon` at `delta`; the control, if any, then breaks the
    release the way it names while the claim stays. See the module docstring
    for the canaries, auditors and controls.

    Args:
      epsilon: The target (claimed) epsilon.
      delta: The claimed delta, also used by the bound.
      canaries: m, each included with probability 1/2.
      auditor: "white_box" or "black_box".
      control: "none", or a broken release: "no_noise", "no_clipping" or
        "half_noise".
      seed: Seeds inclusion, initial weights, Poisson sampling, noise and tie
        breaking; None draws one from OS entropy (reported in the result).
      k_plus: Guesses "in"; default m // 10.
      k_minus: Guesses "out"; default m // 10.
      steps: Noisy training steps.
      expected_batch_size: B of the Poisson sampling (q = B / N).
      learning_rate: SGD learning rate of DPSATKeras. Small, because the
        canary inputs are large (see CANARY_GRADIENT_MARGIN): at 0.5 the noise
        on a canary row saturated its tanh units and weakened the audit.
      momentum: SGD momentum. 0 by default so that every step's noise and
        canary gradient enter the final weights with the same weight, which is
        what the white-box score (a plain sum over steps) is optimal for.
      rho: DP-SAT radius (0 audits DP-SGD).
      l2_norm_clip: C of the real run.
      hidden_units: Width of the audit MLP's tanh hidden layer.
      num_real_examples: Use only the first this many digits training
        examples (None: all 1500).
      alpha: Significance level of the bound.
      log_every: Log training progress every this many steps (0: never).

    Returns:
      An `AuditResult`.

    Raises:
      ValueError, TypeError: for arguments out of range.
    """
    validation.check_int("canaries", canaries, minimum=1)
    if k_plus is None:
        k_plus = canaries // 10
    if k_minus is None:
        k_minus = canaries // 10
    _check_audit_args(epsilon, delta, canaries, auditor, control, k_plus,
                      k_minus, steps, expected_batch_size, alpha)
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1
    validation.check_int("seed", seed, minimum=0)
    # Imported here: TensorFlow and Keras take seconds to import, and the
    # bound functions above do not need them.
    from tf_dpsat.audit import _training

    start = time.time()
    rng = np.random.default_rng(seed)
    included = rng.random(canaries) < 0.5
    run = _training.train_with_canaries(
        included=included, target_epsilon=epsilon, delta=delta,
        control=control, seed=int(rng.integers(2**62)), steps=steps,
        expected_batch_size=expected_batch_size, learning_rate=learning_rate,
        momentum=momentum, rho=rho, l2_norm_clip=l2_norm_clip,
        hidden_units=hidden_units, num_real_examples=num_real_examples,
        log_every=log_every, canary_label=CANARY_LABEL,
        margin=CANARY_GRADIENT_MARGIN, no_clipping_norm=NO_CLIPPING_NORM)
    scores = run.white_box_scores if auditor == "white_box" else (
        run.black_box_scores)
    guesses = _guess(scores, k_plus, k_minus, rng)
    truth = np.where(included, 1, -1)
    correct = int(np.sum(guesses == truth))
    made = int(np.count_nonzero(guesses))
    bound = epsilon_lower_bound(canaries=canaries, guesses=made,
                                correct=correct, delta=delta, alpha=alpha)
    return AuditResult(
        epsilon=run.claimed_epsilon, delta=float(delta),
        epsilon_lower_bound=bound,
        max_epsilon_lower_bound=max_epsilon_lower_bound(
            canaries=canaries, guesses=made, delta=delta, alpha=alpha),
        canaries=int(canaries), canaries_in=int(included.sum()),
        guesses=made, correct=correct, k_plus=int(k_plus),
        k_minus=int(k_minus), auditor=auditor, control=control,
        noise_multiplier=run.noise_multiplier, steps=int(steps),
        expected_batch_size=int(expected_batch_size),
        num_examples=run.num_examples,
        sampling_probability=run.sampling_probability,
        l2_norm_clip=float(l2_norm_clip), alpha=float(alpha), seed=int(seed),
        test_accuracy=run.test_accuracy,
        seconds=round(time.time() - start, 2))
