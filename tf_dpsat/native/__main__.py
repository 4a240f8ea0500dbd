"""Builds the fused CPU kernels: `python -m tf_dpsat.native`.

Prints the library's path. With --check, only reports whether a build for
this TensorFlow, kernel source and CPU exists (exit status 0 if it does).
"""

from absl import app
from absl import flags

from tf_dpsat import native

_DIR = flags.DEFINE_string("output_dir", None,
                           "Where to write the library (default: the package "
                           "directory, else ~/.cache/tf_dpsat).")
_CHECK = flags.DEFINE_bool("check", False, "Only report an existing build.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Print the compiler command.")


def main(argv):
    del argv
    if _CHECK.value:
        path = native.find_library()
        print(path if path else "not built")
        return 0 if path else 1
    path = native.build(_DIR.value, verbose=_VERBOSE.value)
    native.load(path)  # fails here, not in training, if it does not load
    print(path)
    return 0


if __name__ == "__main__":
    app.run(main)
