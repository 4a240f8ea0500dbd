"""The core installs and trains without the experiment kit's extra.

`pip install tf_dpsat` installs only setup.py's install_requires; the kit's
dependencies (tensorflow-datasets, matplotlib, tensorboard, scikit-learn) come
with the "experiments" extra. These tests fail when the core starts to import
one of them, or when setup.py starts to require one.
"""

import ast
import json
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Top-level modules of the "experiments" extra.
KIT_MODULES = ("tensorflow_datasets", "matplotlib", "tensorboard", "sklearn")
# Their distribution names, as setup.py spells them.
KIT_DISTRIBUTIONS = ("tensorflow-datasets", "matplotlib", "tensorboard",
                     "scikit-learn")

# Runs in a fresh interpreter: a meta-path finder makes every kit module
# unimportable, then the core trains a DP model for two steps.
_TRAIN_WITHOUT_KIT = textwrap.dedent("""
    import json
    import sys

    BLOCKED = {blocked!r}

    class BlockKit:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is blocked: not installed")
            return None

    sys.meta_path.insert(0, BlockKit())

    import keras
    import numpy as np

    import tf_dpsat

    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(3)(keras.layers.Dense(5, activation="tanh")(inputs))
    model = tf_dpsat.make_private(keras.Model(inputs, outputs))
    model.compile(
        optimizer=tf_dpsat.DPSATKeras(
            learning_rate=0.5, noise_multiplier=1.0, l2_norm_clip=1.0,
            expected_batch_size=8, rho=0.05, seed=7),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=16)
    before = [w.copy() for w in model.get_weights()]
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    after = model.get_weights()
    print("RESULT " + json.dumps({{
        "steps": int(model.optimizer.iterations.numpy()),
        "changed": [bool(np.any(a != b)) for a, b in zip(after, before)],
        "finite": bool(all(np.all(np.isfinite(a)) for a in after)),
        "losses": [float(v) for v in history.history["loss"]],
        "loaded_kit": sorted({{m.split(".")[0] for m in sys.modules}} & BLOCKED),
        "loaded_experiments": "tf_dpsat.experiments" in sys.modules,
    }}))
""")


def test_core_trains_without_the_experiment_kit():
    script = _TRAIN_WITHOUT_KIT.format(blocked=set(KIT_MODULES))
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(
                   [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, done.stdout[-2000:]
    result = json.loads(lines[0][len("RESULT "):])
    # 16 examples in batches of 8: two private steps, every weight moved.
    assert result["steps"] == 2
    assert result["changed"] == [True, True, True, True]
    assert result["finite"]
    assert len(result["losses"]) == 1
    assert result["loaded_kit"] == []
    assert not result["loaded_experiments"]


def _setup_lists():
    """INSTALL_REQUIRES and EXTRAS_REQUIRE of setup.py, read without running it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(
                node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in ("INSTALL_REQUIRES", "EXTRAS_REQUIRE"):
                values[name] = ast.literal_eval(node.value)
    return values["INSTALL_REQUIRES"], values["EXTRAS_REQUIRE"]


def _distribution(requirement: str) -> str:
    """`tensorflow>=2.16,<2.22` -> `tensorflow`."""
    for separator in "<>=!~[; ":
        requirement = requirement.split(separator)[0]
    return requirement.strip().lower()


def test_install_requires_holds_only_the_core():
    install_requires, extras = _setup_lists()
    core = {_distribution(r) for r in install_requires}
    assert core == {"tensorflow", "keras", "dp-accounting", "absl-py", "numpy",
                    "scipy"}
    kit = {_distribution(r) for r in extras["experiments"]}
    assert set(KIT_DISTRIBUTIONS) <= kit
    assert not core & kit
    assert "pytest" in {_distribution(r) for r in extras["test"]}
