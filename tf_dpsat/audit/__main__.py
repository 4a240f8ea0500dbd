r"""Command line of the one-run privacy audit: `python -m tf_dpsat.audit`.

Trains one DP-SAT model with canaries (see `tf_dpsat.audit`), prints the
claimed epsilon next to the audit's lower bound and optionally writes them as
JSON. Exit status 0 when the bound stays at or below the claim, 1 when it
exceeds it (the release is not as private as claimed), 2 for bad arguments.

  python -m tf_dpsat.audit --epsilon=4 --canaries=1000 \\
      --auditor=white_box --control=none --output_json=audit.json
"""

import argparse
import json
import os
import sys
from typing import Optional
from typing import Sequence

from tf_dpsat import audit


def parser() -> argparse.ArgumentParser:
    """The command line's argument parser (every option has help text)."""
    parser = argparse.ArgumentParser(
        prog="python -m tf_dpsat.audit",
        description="One-run empirical privacy audit (Steinke, Nasr and "
                    "Jagielski, NeurIPS 2023) of tf_dpsat's DP-SAT training: "
                    "a lower bound on epsilon to compare with the claim.")
    parser.add_argument("--epsilon", type=float, default=2.0,
                        help="claimed epsilon: the noise multiplier is "
                             "calibrated to it (default: %(default)s)")
    parser.add_argument("--delta", type=float, default=1e-5,
                        help="claimed delta, also the delta of the bound "
                             "(default: %(default)s)")
    parser.add_argument("--canaries", type=int, default=1000,
                        help="m, canaries each included with probability 1/2 "
                             "(default: %(default)s)")
    parser.add_argument("--auditor", choices=audit.AUDITORS,
                        default="white_box",
                        help="white_box: scores from the weights' movement; "
                             "black_box: from the final model's loss "
                             "(default: %(default)s)")
    parser.add_argument("--control", choices=audit.CONTROLS, default="none",
                        help="none audits the real optimizer; no_noise, "
                             "no_clipping and half_noise break it, to show "
                             "what the audit catches (default: %(default)s)")
    parser.add_argument("--guesses_per_side", type=int, default=None,
                        help="k: guess 'in' for the k highest and 'out' for "
                             "the k lowest scores (default: canaries // 10)")
    parser.add_argument("--steps", type=int, default=200,
                        help="noisy training steps (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=250,
                        help="expected Poisson batch size B "
                             "(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the whole run; default: drawn from OS "
                             "entropy (and reported)")
    parser.add_argument("--output_json", default=None,
                        help="write the result to this JSON file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the audit; returns the process exit status."""
    args = parser().parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging  # After TF_CPP_MIN_LOG_LEVEL: quiet TF start-up.
    logging.set_verbosity(logging.INFO)
    try:
        result = audit.one_run_audit(
            epsilon=args.epsilon, delta=args.delta, canaries=args.canaries,
            auditor=args.auditor, control=args.control, seed=args.seed,
            k_plus=args.guesses_per_side, k_minus=args.guesses_per_side,
            steps=args.steps, expected_batch_size=args.batch_size)
    except (ValueError, TypeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    record = result.to_dict()
    print(json.dumps(record, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    refuted = result.epsilon_lower_bound > result.epsilon
    print(f"{'FAIL' if refuted else 'OK'}: epsilon lower bound "
          f"{result.epsilon_lower_bound:.3f} vs claimed {result.epsilon:.3f} "
          f"({result.correct}/{result.guesses} guesses correct, "
          f"{result.auditor}, control={result.control}).")
    return 1 if refuted else 0


if __name__ == "__main__":
    sys.exit(main())
