r"""How much a run's top Hessian eigenvalue depends on the examples measured.

    python -m benchmarks.eigenvalue_subsets --run_dirs=DIR1,DIR2 \
        --num_examples=1000,10000 --subsets=3 --output_json=subsets.json

For each finished run of examples/train_cifar.py and each N, the final
model's top Hessian eigenvalue on `--subsets` disjoint sets of N training
examples (`tf_dpsat.experiments.study.eigenvalue_by_subset`; set 0 is what
`examples/study.py --measure_sharpness=N` records). NOT private: functions
of training examples without noise.
"""

import json
import os

from absl import app
from absl import flags

from tf_dpsat.experiments import study

_RUN_DIRS = flags.DEFINE_list("run_dirs", None, "Finished runs' --model_dir.",
                              required=True)
_NUM_EXAMPLES = flags.DEFINE_list("num_examples", ["1000", "10000"],
                                  "Examples per set.")
_SUBSETS = flags.DEFINE_integer("subsets", 3, "Disjoint sets per N.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Output JSON path.")
_NOTE = ("NOT private: top Hessian eigenvalues of final models on training "
         "examples, without noise; diagnostics outside the (epsilon, delta) "
         "guarantee.")


def main(argv):
    del argv
    report = {"note": _NOTE, "subsets": _SUBSETS.value, "runs": {}}
    for directory in _RUN_DIRS.value:
        name = os.path.basename(directory.rstrip("/"))
        report["runs"][name] = {}
        for count in (int(n) for n in _NUM_EXAMPLES.value):
            values = study.eigenvalue_by_subset(directory, count, _SUBSETS.value)
            report["runs"][name][str(count)] = values
            print(f"{name}: N={count}: " + ", ".join(f"{v:.4g}" for v in values),
                  flush=True)
    if _OUTPUT_JSON.value:
        with open(_OUTPUT_JSON.value, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
            f.write("\n")


if __name__ == "__main__":
    app.run(main)
