"""Input-pipeline throughput on the real 1024x1024 ChestX-ray14 PNGs: ours vs 2018.

  python bench/chexnet_input.py --image_dir=../shared/data/chestxray14/images --epochs=4

"ours": chexnet.input_pipeline.train_dataset (tf.data: parallel decode + antialiased resize to
  size*256/224, cached as uint8 in memory after the first epoch, random crop + flip,
  ImageNet normalisation on the batch, prefetch).
"2018": a re-creation of the Dell EMC Keras script's loader: a Python generator in one
  process that per image does PIL open, convert("RGB"), resize to size x size, random
  horizontal mirror, then keras.applications.densenet.preprocess_input on the batch.
Epoch 1 includes decoding for both; epochs 2+ are the steady state (ours reads the
in-memory cache of decoded, resized images; the 2018 loader decodes again every epoch).
Prints images/s per epoch and a JSON line.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

import numpy as np


def legacy_generator(paths, labels, image_size, batch_size, seed=0):
    """The 2018 loader: PIL + numpy in a Python generator, one process."""
    from keras.applications.densenet import preprocess_input
    from PIL import Image

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(paths))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = []
            for i in order[start : start + batch_size]:
                image = Image.open(paths[i]).convert("RGB").resize((image_size, image_size))
                array = np.asarray(image, np.float32)
                if rng.random() < 0.5:
                    array = array[:, ::-1]
                batch.append(array)
            yield preprocess_input(np.stack(batch)), labels[order[start : start + batch_size]]


def time_epochs(iterator, steps_per_epoch, epochs, batch_size):
    rates = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for _ in range(steps_per_epoch):
            x, _ = next(iterator)
            np.asarray(x)
        rates.append(steps_per_epoch * batch_size / (time.perf_counter() - t0))
    return rates


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--image_dir",
        default=os.path.join(
            os.path.dirname(__file__), "..", "..", "shared", "data", "chestxray14", "images"
        ),
    )
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()

    from chexnet import input_pipeline, splits

    found = splits.find_images(args.image_dir)
    paths = [found[n] for n in sorted(found)]
    labels = np.zeros((len(paths), 14), np.float32)
    steps = len(paths) // args.batch_size
    n_images = steps * args.batch_size

    options = input_pipeline.InputOptions(args.image_size, "torch", cache="memory", verify=False)
    ds, _ = input_pipeline.train_dataset(paths, labels, options, batch_size=args.batch_size)
    ours = time_epochs(iter(ds.as_numpy_iterator()), steps, args.epochs, args.batch_size)
    legacy = time_epochs(
        legacy_generator(paths, labels, args.image_size, args.batch_size),
        steps,
        args.epochs,
        args.batch_size,
    )

    print(
        f"{len(paths)} images ({n_images} per epoch), {args.image_size} px, "
        f"batch {args.batch_size}, "
        f"{os.cpu_count()} cores"
    )
    print(f"{'epoch':>6} {'2018 loader img/s':>18} {'ours img/s':>12} {'speed-up':>9}")
    for e, (a, b) in enumerate(zip(legacy, ours), start=1):
        print(f"{e:>6} {a:>18.1f} {b:>12.1f} {b / a:>8.1f}x")
    steady_legacy, steady_ours = float(np.mean(legacy[1:])), float(np.mean(ours[1:]))
    print(
        f"{'steady':>6} {steady_legacy:>18.1f} {steady_ours:>12.1f} "
        f"{steady_ours / steady_legacy:>8.1f}x"
    )
    print(
        "BENCH "
        + json.dumps(
            {
                "images": n_images,
                "image_size": args.image_size,
                "legacy_img_s": legacy,
                "ours_img_s": ours,
                "first_epoch_speedup": ours[0] / legacy[0],
                "steady_speedup": steady_ours / steady_legacy,
            }
        )
    )


if __name__ == "__main__":
    main()
