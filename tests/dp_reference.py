"""An independent reference implementation of DP-SAT / DP-SGD / DP-SAM.

Written as the paper states the algorithm, with none of the library's
machinery: one GradientTape per example (or microbatch) in eager mode, the
model's weights assigned explicitly to the perturbed point, and the SGD
momentum update in NumPy float64. Tests compare the library against it with
noise off (sigma = 0).
"""

import numpy as np
import tensorflow as tf

CLIP_EPSILON = 1e-6  # min(1, C / (||g|| + 1e-6)), as in the authors' code.


def _unit_gradients(model, params, x, y, w, loss_fn, num_microbatches,
                    extra_loss_fn):
    """Per-unit gradients (float64 lists) at `params`, and unit weights."""
    for v, p in zip(model.trainable_variables, params):
        v.assign(p.astype(np.float32))
    n = len(y)
    units = n if num_microbatches is None else num_microbatches
    size = n // units
    grads, active = [], []
    for u in range(units):
        sl = slice(u * size, (u + 1) * size)
        with tf.GradientTape() as tape:
            pred = model(x[sl], training=True)
            loss = loss_fn(y[sl], pred, sample_weight=w[sl])
            if extra_loss_fn is not None:
                loss += extra_loss_fn(model, x[sl])
        g = tape.gradient(loss, model.trainable_variables)
        grads.append([np.asarray(tf.convert_to_tensor(t), np.float64) for t in g])
        active.append(np.any(w[sl] != 0))
    return grads, np.array(active), size


def _clipped_mean(grads, active, clip, expected_batch_size):
    total = [np.zeros_like(t) for t in grads[0]]
    clipped = 0
    for g, keep in zip(grads, active):
        if not keep:
            continue
        norm = np.sqrt(sum(np.sum(t * t) for t in g))
        factor = min(1.0, clip / (norm + CLIP_EPSILON))
        clipped += factor < 1.0
        total = [s + factor * t for s, t in zip(total, g)]
    # The expected batch, else every unit of the batch (padding included):
    # never a count of the data.
    divisor = expected_batch_size if expected_batch_size is not None else len(
        active)
    return [s / divisor for s in total], clipped


def _direction_step(direction, rho):
    norm = np.sqrt(sum(np.sum(d * d) for d in direction))
    return [rho * d / (norm + 1e-16) for d in direction]


def train(model, batches, *, learning_rate, momentum, l2_norm_clip, rho,
          loss_fn, nesterov=False, direction="gradient", num_microbatches=None,
          expected_batch_size=None, dpsam=False, extra_loss_fn=None,
          regularization_grad_fn=None, weight_decay=None):
    """Trains `model` in place on `batches`; returns (weights, clipped counts).

    Args:
      model: a Keras model (plain; only its forward pass is used).
      batches: list of (x, y, sample_weight) NumPy batches; each is a logical
        step.
      learning_rate, momentum, nesterov, l2_norm_clip, rho, direction,
        num_microbatches, expected_batch_size: as for `DPSATKeras`.
      loss_fn: a Keras loss object called per unit as loss_fn(y, pred, w).
      dpsam: take the ascent direction from a fresh clipped gradient at w_t.
      extra_loss_fn: optional (model, x_unit) -> data-dependent loss term.
      regularization_grad_fn: optional params -> gradient list of the weight
        regularizers, added after clipping.
      weight_decay: decoupled decay, applied as Keras does.

    Returns:
      The final trainable weights (float64) and per-step clipped-unit counts.
    """
    w = [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]
    velocity = [np.zeros_like(t) for t in w]
    previous = [np.zeros_like(t) for t in w]  # g_{t-1} or w_{t-1} - w_t
    clipped_counts = []
    for x, y, sw in batches:
        point = w
        if dpsam:
            g, active, size = _unit_gradients(model, w, x, y, sw, loss_fn,
                                              num_microbatches, extra_loss_fn)
            ascent, _ = _clipped_mean(g, active, l2_norm_clip,
                                      expected_batch_size)
            point = [a + e for a, e in zip(w, _direction_step(ascent, rho))]
        elif rho > 0:
            point = [a + e for a, e in zip(w, _direction_step(previous, rho))]
        g, active, size = _unit_gradients(model, point, x, y, sw, loss_fn,
                                          num_microbatches, extra_loss_fn)
        grad, clipped = _clipped_mean(g, active, l2_norm_clip,
                                      expected_batch_size)
        clipped_counts.append(clipped)
        if regularization_grad_fn is not None:
            grad = [a + b for a, b in zip(grad, regularization_grad_fn(w))]
        new = []
        for i, (wi, gi) in enumerate(zip(w, grad)):
            if weight_decay is not None:
                wi = wi - wi * weight_decay * learning_rate
            velocity[i] = momentum * velocity[i] - learning_rate * gi
            if nesterov:
                wi = wi + momentum * velocity[i] - learning_rate * gi
            else:
                wi = wi + velocity[i]
            new.append(wi)
        previous = grad if direction == "gradient" else [
            a - b for a, b in zip(w, new)]
        w = new
    for v, p in zip(model.trainable_variables, w):
        v.assign(p.astype(np.float32))
    return w, clipped_counts


def median_norm(model, x, y, loss_fn, num_microbatches=None):
    """Median per-example gradient norm at the model's current weights.

    Tests use it as the clip norm so that clipping binds on about half of the
    examples: both branches of min(1, C / ||g||) are exercised.
    """
    params = [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]
    grads, _, _ = _unit_gradients(model, params, x, y, np.ones(len(y)), loss_fn,
                                  num_microbatches, None)
    return float(np.median([np.sqrt(sum(np.sum(t * t) for t in g))
                            for g in grads]))
