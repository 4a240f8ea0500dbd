"""A worker of tests/test_distributed.py: `distributed.fit` on the workers' batches.

Run on two loopback workers (TF_CONFIG), it trains a tiny DP model on
Poisson batches drawn with `argv[1]`: "agreed" (the chief's secret, the
library's recipe; one step) or "own" (each worker's own OS-entropy key, the
mistake that `check_same_batch` refuses; one step), or "chief_stops" (the
agreed secret, 5 steps, and a callback on the chief only that stops training
after the second). Prints one JSON line: whether fit refused, whether the
weights changed, the steps taken and the weights' sum.
"""

import json
import sys

import keras
import numpy as np

import tf_dpsat
from tf_dpsat import distributed
from tf_dpsat import noise
from tf_dpsat import sampling

N, BATCH = 64, 16


class _StopAfterTwoSteps(keras.callbacks.Callback):

    def on_train_batch_end(self, batch, logs=None):
        if batch == 1:
            self.model.stop_training = True


def main(keys: str) -> None:
    steps = 5 if keys == "chief_stops" else 1
    strategy = distributed.make_strategy("multi_worker")
    rng = np.random.default_rng(0)  # The same (public) data on both workers.
    images = rng.integers(0, 255, size=(N, 4, 4, 1)).astype(np.uint8)
    labels = rng.integers(0, 3, size=N)
    secret = noise.secret_key()  # Each worker's own OS-entropy key.
    if keys != "own":
        secret = distributed.agree_on_int(strategy, secret)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = tf_dpsat.make_private(keras.Sequential([
            keras.Input((4, 4, 1)), keras.layers.Flatten(),
            keras.layers.Dense(3)]))
        model.compile(optimizer=tf_dpsat.DPSATKeras(
            learning_rate=1.0, noise_multiplier=1.0, expected_batch_size=BATCH,
            seed=secret), loss=keras.losses.SparseCategoricalCrossentropy(
                from_logits=True))
    before = [v.numpy() for v in model.trainable_variables]
    batches = sampling.poisson_dataset(
        images, labels, expected_batch_size=BATCH, steps=steps, seed=secret,
        padded_size=sampling.padded_batch_size(BATCH, N, steps))
    stoppers = ([_StopAfterTwoSteps()]
                if keys == "chief_stops" and distributed.is_chief(strategy) else [])
    refused = None
    try:
        distributed.fit(model, strategy, batches, epochs=1,
                        steps_per_epoch=steps, callbacks=stoppers)
    except ValueError as error:
        refused = str(error)
    changed = any(not np.array_equal(a, v.numpy())
                  for a, v in zip(before, model.trainable_variables))
    print(json.dumps({
        "refused": refused, "weights_changed": changed,
        "steps": int(model.optimizer.iterations.numpy()),
        "weights": float(sum(v.numpy().sum() for v in model.trainable_variables))}))


if __name__ == "__main__":
    main(sys.argv[1])
