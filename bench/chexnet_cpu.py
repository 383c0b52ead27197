"""chexnet per CPU-second: input pipeline (224 px from 1024x1024 PNGs), evaluate, predict, train.

    .venv/bin/python -m bench.chexnet_cpu [--image_dir DIR] [--train_steps 2]

One process, 1 rank, the shared 1024x1024 ChestX-ray14 PNGs at 224 px ("whole" view, torch
normalisation: chexnet's defaults), DenseNet-121 with random weights (throughput does not
depend on them). Cases, each timed in CPU seconds of the process (tf.data's threads
included) with wall-clock beside it:

- input, evaluate: `chexnet.input_pipeline.eval_dataset`, one pass, no cache (decode,
  resize, normalise: what `chexnet evaluate` does per image);
- input, train: `train_dataset` with `--cache=memory`: epoch 1 decodes, epoch 2 reads the
  cache (flip + normalise only);
- input, predict: `chexnet.predict.read_image` + `prepare` per image (PIL, numpy);
- model, evaluate: `chexnet.evaluate.gather` (`hooks.training.evaluation.predict`) over the images
  already decoded (model only), default fused batch norm (and Keras's: `--kerasbn`);
- model, train: chexnet's DenseNet-121 training step (`bench.chexnet_backbones.build`).

Then the input's share of the CPU beside the model: input CPU-s per image / (input +
model CPU-s per image). Writes runs/bench/chexnet_cpu.json.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

import numpy as np  # noqa: E402

from bench.common import Clock, lscpu, write_json  # noqa: E402

DEFAULT_IMAGES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "..", "shared", "data", "chestxray14", "images")


def _rate(images: int, clock: Clock) -> dict:
    return {"images": images, "per_cpu_s": images / clock.cpu, "per_wall_s": images / clock.wall}


def input_cases(paths, size: int, batch: int) -> tuple[dict, list]:
    """Rates of the three input paths, and the decoded evaluation batches (for the model)."""
    from chexnet import input_pipeline, predict

    labels = np.zeros((len(paths), 14), np.float32)
    out, batches = {}, []
    options = input_pipeline.InputOptions(size, "torch", verify=False)
    ds, _ = input_pipeline.eval_dataset(paths, labels, options, batch_size=batch)
    with Clock() as clock:
        batches = [b for b in ds.as_numpy_iterator()]
    out["input_evaluate"] = _rate(len(paths), clock)
    cached = input_pipeline.InputOptions(size, "torch", cache="memory", verify=False)
    train_ds, _ = input_pipeline.train_dataset(paths, labels, cached, batch_size=batch)
    steps = len(paths) // batch
    it = iter(train_ds.as_numpy_iterator())
    for epoch in ("input_train_epoch1_decode", "input_train_epoch2_cached"):
        with Clock() as clock:
            for _ in range(steps):
                next(it)
        out[epoch] = _rate(steps * batch, clock)
    with Clock() as clock:
        for path in paths:
            predict.prepare(predict.read_image(path), options)
    out["input_predict"] = _rate(len(paths), clock)
    return out, batches


def evaluate_case(batches, size: int, fused_bn: bool) -> dict:
    import keras
    import tensorflow as tf

    from chexnet import evaluate
    from chexnet import model as model_lib
    from hooks.distributed.horovod_glue import Context

    keras.mixed_precision.set_global_policy("float32")
    network, _ = model_lib.build_chexnet_model("densenet121", size, fused_bn=fused_bn)
    ds = tf.data.Dataset.from_tensor_slices(tuple(np.concatenate(p) for p in zip(*batches)))
    ds = ds.batch(len(batches[0][0])).cache()
    n = sum(len(b[0]) for b in batches)
    evaluate.gather(network, ds.take(1), len(batches[0][0]), Context())  # trace
    with Clock() as clock:
        evaluate.gather(network, ds, n, Context())
    return _rate(n, clock)


def train_case(size: int, batch: int, steps: int) -> dict:
    from bench.chexnet_backbones import build

    trainer, data, _ = build("densenet121", "float32", True, batch, size)
    trainer.fit(data, steps_per_epoch=1, epochs=1, verbose=0)  # trace + first step
    with Clock() as clock:
        trainer.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
    return _rate(batch * steps, clock)


def share(input_rate: float, model_rate: float) -> float:
    """The input's share of the CPU when it feeds the model: per-image CPU seconds."""
    return (1 / input_rate) / (1 / input_rate + 1 / model_rate)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_dir", default=DEFAULT_IMAGES)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--train_batch", type=int, default=8)
    parser.add_argument("--train_steps", type=int, default=2)
    parser.add_argument("--max_images", type=int, default=None, help="first N images")
    parser.add_argument("--kerasbn", action="store_true",
                        help="also evaluate with Keras's batch norm (before)")
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    from chexnet import splits

    if not os.path.isdir(args.image_dir):
        parser.error(f"--image_dir={args.image_dir} is not a folder")
    found = splits.find_images(args.image_dir)
    paths = [found[n] for n in sorted(found)]
    paths = paths[:args.max_images]

    def show(name):  # as each case ends: a run cut short still reports what it measured
        r = results[name]
        print(f"{name:28s} {r['per_cpu_s']:8.2f} img/CPU-s {r['per_wall_s']:8.2f} img/s wall",
              flush=True)

    results, batches = input_cases(paths, args.image_size, args.batch)
    for name in results:
        show(name)
    results["model_evaluate"] = evaluate_case(batches, args.image_size, True)
    show("model_evaluate")
    results["model_train"] = train_case(args.image_size, args.train_batch, args.train_steps)
    show("model_train")
    if args.kerasbn:
        results["model_evaluate_kerasbn"] = evaluate_case(batches, args.image_size, False)
        show("model_evaluate_kerasbn")
    shares = {
        "evaluate: decode beside the model": share(results["input_evaluate"]["per_cpu_s"],
                                                   results["model_evaluate"]["per_cpu_s"]),
        "train, epoch 1 (decode)": share(results["input_train_epoch1_decode"]["per_cpu_s"],
                                         results["model_train"]["per_cpu_s"]),
        "train, cached epochs": share(results["input_train_epoch2_cached"]["per_cpu_s"],
                                      results["model_train"]["per_cpu_s"]),
        "predict: read + prepare beside the model": share(
            results["input_predict"]["per_cpu_s"], results["model_evaluate"]["per_cpu_s"]),
    }
    for name, value in shares.items():
        print(f"input share of the CPU, {name}: {100 * value:.1f} %")
    cpu = lscpu()
    print(f"CPU: {cpu.get('model')} ({cpu.get('cpus')} CPUs), {len(paths)} images")
    path = write_json("chexnet_cpu", {"args": vars(args), "lscpu": cpu, "results": results,
                                      "input_share": shares}, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
