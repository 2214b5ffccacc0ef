"""Builds a small randomly initialised Keras network of ResNet8's shape (MLPerf Tiny layout),
and tiny CIFAR-shaped data, for the framework tests. Run as a script in its own process:

    python -m tests.tiny_models KERAS_OUT DATA_DIR
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

TEST_IMAGES, TRAIN_IMAGES = 48, 200


def make_data(directory: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("test", TEST_IMAGES), ("train", TRAIN_IMAGES)):
        np.save(directory / f"{split}_images.npy", rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
        np.save(directory / f"{split}_labels.npy", np.arange(n, dtype=np.int64) % 10)


def build_resnet8(seed: int = 0):
    """ResNet8 as in MLPerf Tiny: 16-32-64 filters, stride-2 'same' convs, 1x1 shortcuts,
    BatchNorm after every conv, average pooling, a softmax Dense layer."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    from keras import layers

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(16, 3, padding="same")(inputs)
    x = layers.Activation("relu")(layers.BatchNormalization()(x))
    for filters, stride in ((16, 1), (32, 2), (64, 2)):
        y = layers.Conv2D(filters, 3, strides=stride, padding="same")(x)
        y = layers.Activation("relu")(layers.BatchNormalization()(y))
        y = layers.BatchNormalization()(layers.Conv2D(filters, 3, padding="same")(y))
        if stride > 1:
            x = layers.Conv2D(filters, 1, strides=stride, padding="same")(x)
        x = layers.Activation("relu")(layers.add([x, y]))
    x = layers.Flatten()(layers.AveragePooling2D(pool_size=8)(x))
    outputs = layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(seed)
    for layer in model.layers:  # non-trivial BatchNorm statistics, inputs scaled for 0-255 pixels
        if isinstance(layer, layers.BatchNormalization):
            gamma, beta, mean, var = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                               rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 2.0, var.shape)])
        if isinstance(layer, (layers.Conv2D, layers.Dense)):  # non-zero biases survive tf2onnx
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    first = model.layers[1]
    kernel, bias = first.get_weights()
    first.set_weights([kernel / 128.0, bias])
    return model


if __name__ == "__main__":
    keras_out, data_dir = Path(sys.argv[1]), Path(sys.argv[2])
    keras_out.parent.mkdir(parents=True, exist_ok=True)
    build_resnet8().save(keras_out)
    make_data(data_dir)
    print(f"tiny ResNet8 -> {keras_out}, data -> {data_dir}")
