"""The original CRBL Keras model (tf_keras + qubvel efficientnet), rebuilt from its description
in the reference notes. Import only under TF_USE_LEGACY_KERAS=1, never in a torch process."""
import efficientnet.tfkeras as efn
import tensorflow as tf
from tensorflow import keras  # tf_keras, because of TF_USE_LEGACY_KERAS


def outer_product(inputs):
    """The original bilinear pooling Lambda (written from its description in the reference notes)."""
    x1, x2 = inputs
    n = tf.shape(x1)[0]
    hw = tf.shape(x1)[1] * tf.shape(x1)[2]
    c1, c2 = x1.shape[3], x2.shape[3]
    a = tf.reshape(x1, [n, hw, c1])
    b = tf.reshape(x2, [n, hw, c2])
    phi = tf.reshape(tf.matmul(tf.transpose(a, [0, 2, 1]), b), [n, c1 * c2])
    phi = phi / tf.cast(hw, tf.float32)
    y = tf.sign(phi) * tf.sqrt(tf.abs(phi) + 1e-12)
    return tf.nn.l2_normalize(y, axis=1)


def set_trainable(backbones, is_crop):
    for bb in backbones:
        for layer in bb.layers[150:]:
            layer.trainable = is_crop
        for layer in bb.layers[:150]:
            layer.trainable = False


def build_crbl(is_crop, input_shape=(128, 128, 3), odd_shape=None):
    """(model, model on odd_shape or None, backbone 1, backbone 2, dense)."""
    inp = keras.layers.Input(shape=input_shape)
    b1 = efn.EfficientNetB0(include_top=False, weights=None)
    b2 = efn.EfficientNetB0(include_top=False, weights=None)
    b1._name = "EfficientNetB0_imagenetWeight"
    b2._name = "EfficientNetB0_noisy-studentWeight"
    for layer in b1.layers:
        layer._name = "model1_" + layer._name
    for layer in b2.layers:
        layer._name = "model2_" + layer._name
    set_trainable((b1, b2), is_crop)
    lam = keras.layers.Lambda(outer_product)
    drop = keras.layers.Dropout(0.5)
    dense = keras.layers.Dense(1, activation="sigmoid", name="predictions")
    model = keras.Model(inp, dense(drop(lam([b1(inp), b2(inp)]))))
    model_odd = None
    if odd_shape is not None:  # the same layers on an odd-sized input (backbones take (None, None, 3))
        inp_odd = keras.layers.Input(shape=odd_shape)
        model_odd = keras.Model(inp_odd, dense(drop(lam([b1(inp_odd), b2(inp_odd)]))))
    model.pooled = lambda x: lam([b1(x, training=False), b2(x, training=False)]).numpy()
    return model, model_odd, b1, b2, dense
