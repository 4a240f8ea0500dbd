r"""Compares finished runs of examples/train_cifar.py: mean test accuracy per method.

  python examples/compare_runs.py --runs='/tmp/fmnist/*' \
      --output_json=/tmp/fmnist.json --plot=/tmp/fmnist.png

Prints a Markdown table (one row per method, mean over seeds). All logic
lives in `tf_dpsat.experiments.reporting`; this file only parses flags.
"""

import glob
import json
import os
import sys

from absl import app
from absl import flags

try:
    from tf_dpsat.experiments import reporting
except ImportError:  # Run from a source checkout without `pip install -e .`.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tf_dpsat.experiments import reporting

_RUNS = flags.DEFINE_list(
    "runs", None, "Comma-separated --model_dir paths or glob patterns of "
    "finished runs that differ only in method and seed.", required=True)
_OUTPUT_JSON = flags.DEFINE_string("output_json", None,
                                   "Write the summary as JSON here.")
_PLOT = flags.DEFINE_string("plot", None,
                            "Write a PNG of test accuracy per epoch here.")


def _expand(patterns):
    dirs = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or [pattern]
        dirs += [d for d in matches if os.path.isdir(d)]
    return dirs


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    dirs = _expand(_RUNS.value)
    if not dirs:
        raise app.UsageError(f"No run directories match --runs={_RUNS.value}.")
    try:
        summary = reporting.summarize_runs(dirs)
    except (OSError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(reporting.markdown_table(summary))
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump(summary, f, indent=1)
    if _PLOT.value:
        reporting.plot_summary(summary, _PLOT.value)


if __name__ == "__main__":
    app.run(main)
