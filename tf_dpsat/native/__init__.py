"""Optional fused CPU kernels for the per-parameter work of a DP step.

Every DP step adds N(0, sigma^2 C^2) to each of the model's parameters, so the
noise costs the same whatever the batch size. With TensorFlow's own ops on a
CPU that is a Philox kernel for the uniforms plus one pass per Box-Muller op
(`clipping.normal_samples`): ~0.9 ms for a 269k-parameter MLP, half of a
non-private training step at batch 256. `noise_kernel.cc` forms the whole
noisy mean, (sum + noise) / divisor, in one multithreaded pass over
L1-sized chunks: the same generator (Philox4x32-10, bit for bit TensorFlow's)
and transform, ~6x faster; `DpsatNoisySgd` draws the same noise for one
variable and applies the SGD (momentum) update with it in the same pass. It
also computes DP-SAT's evaluation point w + rho * d / ||d|| in two passes
instead of ~5 ops per variable.

The kernels are compiled on the machine that runs them, against the
installed TensorFlow, by `python -m tf_dpsat.native` (needs g++; ~10 s).
Nothing else changes when they are absent: `clipping.noisy_mean` and
`clipping.perturbed` fall back to TensorFlow's ops (logged once, with how to
build). A build is used only by the TensorFlow version, kernel source and
CPU it was built for (its file name says which); they are CPU kernels, so
with a GPU or TPU present, and under XLA, TensorFlow's ops are used. Set
TF_DPSAT_NATIVE=0 to ignore a build (for A/B comparisons).

References:
  Salmon, Moraes, Dror, Shaw. "Parallel random numbers: as easy as 1, 2, 3".
  SC 2011 (Philox).
  Box, Muller. "A note on the generation of random normal deviates". Ann.
  Math. Statist. 1958.
"""

import contextlib
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Iterator, Optional, Sequence

import tensorflow as tf
from absl import logging

SOURCE = pathlib.Path(__file__).resolve().parent / "noise_kernel.cc"
ENV_SWITCH = "TF_DPSAT_NATIVE"
_COMPILER = "g++"
# -march=native: the build is for this CPU only (its flags are in the name).
_OPTIMIZE = ("-O3", "-march=native", "-fPIC", "-shared",
             "-Wno-deprecated-declarations")

# Values per chunk of the kernels' noise (kChunk in noise_kernel.cc): each
# tensor's noise starts on a chunk boundary of the concatenation.
CHUNK = 1024

_loaded = {}  # library path -> module (tf.load_op_library caches too)
_library_path = None  # set by load(path): the build to use
_enabled = os.environ.get(ENV_SWITCH, "1") != "0"
_fallback_logged = False


def _cpu_flags() -> str:
    """The CPU's instruction-set flags, from /proc/cpuinfo where it exists."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def build_tag() -> str:
    """What a build depends on: TensorFlow, the kernel source, the CPU."""
    digest = hashlib.sha256()
    for part in (tf.__version__, SOURCE.read_bytes().decode(), _cpu_flags(),
                 " ".join(_OPTIMIZE)):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _candidate_dirs() -> list:
    """Where a build may live: next to the source, then the user's cache."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache")
    return [SOURCE.parent, pathlib.Path(cache) / "tf_dpsat"]


def library_name() -> str:
    return f"_noise_kernel_{build_tag()}.so"


def find_library() -> Optional[pathlib.Path]:
    """The path of a build for this TensorFlow, source and CPU, if any."""
    name = library_name()
    for directory in _candidate_dirs():
        if (directory / name).is_file():
            return directory / name
    return None


def build(directory: Optional[str] = None, verbose: bool = False) -> pathlib.Path:
    """Compiles the kernel for this machine and returns the library's path.

    Args:
      directory: where to put it; by default the first writable of the
        package directory and ~/.cache/tf_dpsat.
      verbose: print the compiler command.

    Raises:
      RuntimeError: no compiler, or the compilation failed (with its output).
    """
    if shutil.which(_COMPILER) is None:
        raise RuntimeError(
            f"Building the native noise kernel needs {_COMPILER} (Debian: "
            "apt-get install g++). Without it tf_dpsat uses TensorFlow's ops.")
    if directory is None:
        for candidate in _candidate_dirs():
            with contextlib.suppress(OSError):
                candidate.mkdir(parents=True, exist_ok=True)
            if os.access(candidate, os.W_OK):
                directory = candidate
                break
        else:
            raise RuntimeError("No writable directory for the native kernel: "
                               f"tried {[str(d) for d in _candidate_dirs()]}.")
    target = pathlib.Path(directory) / library_name()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: a concurrent loader never sees
    # half a library.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so",
                                     delete=False) as tmp:
        partial = pathlib.Path(tmp.name)
    command = ([_COMPILER, *_OPTIMIZE, *tf.sysconfig.get_compile_flags(),
                str(SOURCE), "-o", str(partial)]
               + tf.sysconfig.get_link_flags())
    if verbose:
        print(" ".join(command))
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError("Compiling the native noise kernel failed:\n"
                           + result.stderr[-4000:])
    os.replace(partial, target)
    _remove_old_builds(target)
    return target


def _remove_old_builds(target: pathlib.Path) -> None:
    """Deletes the package directory's builds other than `target`.

    They are this installation's own (for another TensorFlow, source or
    CPU). The shared cache is left alone: other environments use it.
    """
    if target.parent != SOURCE.parent:
        return
    for stale in target.parent.glob("_noise_kernel_*.so"):
        if stale != target:
            stale.unlink(missing_ok=True)


def load(path: Optional[pathlib.Path] = None):
    """The kernel's op module, or None when not built (or switched off).

    Args:
      path: a library from `build`; it becomes the one used from now on, and
        an error loading it is raised.
        Without it: the last one given, else `find_library()`; a library
        that fails to load is reported once and then ignored (training
        uses TensorFlow's ops rather than failing).
    """
    global _library_path
    strict = path is not None
    if strict:
        _library_path = pathlib.Path(path)
    else:
        if not _enabled:
            return None
        path = _library_path or find_library()
        if path is None:
            return None
    key = str(path)
    if key not in _loaded:
        try:
            _loaded[key] = tf.load_op_library(key)
        except (tf.errors.OpError, OSError) as error:
            if strict:
                raise
            logging.warning("tf_dpsat: ignoring the native kernels at %s, "
                            "which do not load (%s); rebuild them with "
                            "`python -m tf_dpsat.native`.", key, error)
            _loaded[key] = None
    return _loaded[key]


@contextlib.contextmanager
def enabled(value: bool) -> Iterator[None]:
    """Switches the kernel on or off inside a `with` block (tests, A/B)."""
    global _enabled
    previous, _enabled = _enabled, value
    try:
        yield
    finally:
        _enabled = previous


def _runs_on_cpu() -> bool:
    """The kernel is CPU-only; with an accelerator the sums live there."""
    return not (tf.config.list_logical_devices("GPU")
                or tf.config.list_logical_devices("TPU"))


def _usable(tensors: Sequence[tf.Tensor]):
    """The op module if the kernels can take `tensors` here, else None.

    None when not built or switched off (logged once), or for tensors that
    are not float32, or with an accelerator present (the kernels are CPU
    only; they would pull the tensors to the host).
    """
    global _fallback_logged
    module = load()
    if module is None:
        if not _fallback_logged and _enabled:
            _fallback_logged = True
            logging.info(
                "tf_dpsat: noise drawn with TensorFlow's ops. On CPU, "
                "`%s -m tf_dpsat.native` builds fused kernels that draw it "
                "several times faster.", os.path.basename(sys.executable))
        return None
    if not tensors or any(t.dtype != tf.float32 for t in tensors):
        return None
    if not _runs_on_cpu():
        return None
    return module


def usable(tensors: Sequence[tf.Tensor]) -> bool:
    """Whether the kernels can take `tensors` here (see `_usable`)."""
    return _usable(list(tensors)) is not None


def noisy_mean(sums: Sequence[tf.Tensor], stddev, seed: tf.Tensor, stream,
               divisor) -> Optional[list]:
    """(sums[i] + N(0, stddev^2)) / divisor by the fused kernel, if usable.

    Args:
      sums: float32 tensors (one per variable).
      stddev: scalar standard deviation of the noise.
      seed: int64 [2]: the Philox key and the counter's high 64 bits.
      stream: int in [0, 2^32): the counter's next 32 bits. Draws with
        different (seed, stream) are independent.
      divisor: scalar.

    Returns:
      The noisy means, or None when the kernel cannot be used (see
      `_usable`); the caller then uses TensorFlow's ops.
    """
    module = _usable(sums)
    if module is None:
        return None
    return module.dpsat_noisy_mean(
        list(sums), tf.cast(seed, tf.int64), tf.cast(stream, tf.int64),
        tf.cast(stddev, tf.float32), tf.cast(divisor, tf.float32))


def perturb(params: Sequence[tf.Tensor], directions: Sequence[tf.Tensor],
            rho: float) -> Optional[list]:
    """params + rho * d / (||d|| + 1e-16) by the fused kernel, if usable.

    Args:
      params: float32 tensors (the weights w_t).
      directions: tensors shaped like `params` (the direction d).
      rho: the radius.

    Returns:
      The perturbed weights, or None when the kernel cannot be used.
    """
    module = _usable(list(params) + list(directions))
    if module is None:
        return None
    return module.dpsat_perturb(list(params), list(directions),
                                tf.constant(rho, tf.float32))


def chunk_offsets(sizes: Sequence[int]) -> list:
    """The chunk at which each tensor's noise starts in `DpsatNoisyMean`.

    Args:
      sizes: the number of values of each tensor, in the kernel's order.

    Returns:
      One int per tensor: the chunks of the tensors before it.
    """
    offsets, total = [], 0
    for size in sizes:
        offsets.append(total)
        total += -(-int(size) // CHUNK)
    return offsets


def noisy_sgd(summed: tf.Tensor, param: tf.Tensor, velocity: Optional[tf.Tensor],
              *, seed: tf.Tensor, stream, first_chunk: int, stddev, divisor,
              learning_rate, momentum: float, nesterov: bool):
    """The noisy mean of one variable and the SGD update with it, fused.

    The noise is what `noisy_mean` adds to this tensor when it is the one at
    `first_chunk` (see `chunk_offsets`) of the same (seed, stream).

    Args:
      summed: the variable's clipped sum (float32).
      param: the variable's value w.
      velocity: its SGD momentum slot, or None without momentum.
      seed, stream: as for `noisy_mean`.
      first_chunk: the chunk where this tensor's noise starts.
      stddev, divisor: as for `noisy_mean`.
      learning_rate, momentum, nesterov: as `keras.optimizers.SGD`.

    Returns:
      (new w, new velocity or None, the noisy mean g), or None when the
      kernel cannot be used.
    """
    tensors = [summed, param] + ([velocity] if velocity is not None else [])
    module = _usable(tensors)
    if module is None:
        return None
    use_momentum = velocity is not None
    new_param, new_velocity, gradient = module.dpsat_noisy_sgd(
        summed, param, velocity if use_momentum else param,
        tf.cast(seed, tf.int64), tf.cast(stream, tf.int64),
        tf.constant(first_chunk, tf.int64), tf.cast(stddev, tf.float32),
        tf.cast(divisor, tf.float32), tf.cast(learning_rate, tf.float32),
        tf.constant(momentum, tf.float32), nesterov=nesterov,
        use_momentum=use_momentum)
    return new_param, (new_velocity if use_momentum else None), gradient
