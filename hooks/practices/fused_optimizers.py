"""Keras's SGD (momentum) and Adam with their update in one TensorFlow kernel per variable.

Keras 3's `update_step` writes the update as separate element-wise ops (SGD with momentum:
two multiplies, a subtraction, an assign and an assign-add, each a pass over every weight;
Adam: ten). TensorFlow's training kernels do the same arithmetic in one pass:
`ResourceApplyKerasMomentum` (Keras's momentum form, ``m = momentum * m - lr * g; w += m``,
Nesterov included) and `ResourceApplyAdam` (Keras's Adam: bias correction folded into the
rate, epsilon added to sqrt(v)). Same variables, same order and same slot names as Keras's
classes, so checkpoints and `optimizer.npz` files are interchangeable; anything these
kernels do not cover (no momentum, AMSGrad, non-float32 variables) uses Keras's code.
"""

import keras
import tensorflow as tf


def _handle(variable):
    """The resource handle of a tf.Variable, or of the tf.Variable behind a Keras one (Keras's
    TF backend passes `update_step` the tf.Variable, its slots stay Keras variables)."""
    return variable.handle if isinstance(variable, tf.Variable) else variable.value.handle


def _fusable(variable, gradient) -> bool:
    return (tf.as_dtype(variable.dtype) == tf.float32
            and not isinstance(gradient, tf.IndexedSlices))


@keras.saving.register_keras_serializable(package="hpc_resnet")
class SGD(keras.optimizers.SGD):
    """keras.optimizers.SGD; with momentum, one ResourceApplyKerasMomentum per variable."""

    def update_step(self, gradient, variable, learning_rate):
        if self.momentum == 0 or not _fusable(variable, gradient):
            return super().update_step(gradient, variable, learning_rate)
        m = self.momentums[self._get_variable_index(variable)]
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(m), lr=tf.cast(learning_rate, tf.float32),
            grad=tf.cast(gradient, tf.float32), momentum=tf.constant(self.momentum, tf.float32),
            use_nesterov=self.nesterov)


@keras.saving.register_keras_serializable(package="hpc_resnet")
class Adam(keras.optimizers.Adam):
    """keras.optimizers.Adam; without AMSGrad, one ResourceApplyAdam per variable."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _fusable(variable, gradient):
            return super().update_step(gradient, variable, learning_rate)
        index = self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, tf.float32)
        beta_1 = tf.constant(self.beta_1, tf.float32)
        beta_2 = tf.constant(self.beta_2, tf.float32)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]),
            v=_handle(self._velocities[index]), beta1_power=tf.pow(beta_1, step),
            beta2_power=tf.pow(beta_2, step), lr=tf.cast(learning_rate, tf.float32),
            beta1=beta_1, beta2=beta_2, epsilon=tf.constant(self.epsilon, tf.float32),
            grad=tf.cast(gradient, tf.float32), use_nesterov=False)
