"""ImageNet input pipeline throughput per core on real JPEGs, against what the model consumes.

    .venv/bin/python -m bench.imagenet_input [--copies 12] [--rounds 3] \
        [--parallel_calls 1,2,autotune] [--steady_epochs 2]

Builds TPU-style TFRecords (imagenet.build_tfrecords, 8 shards) in a temporary folder from the
real ILSVRC-2012 sample in ../shared/data/imagenet (42 JPEGs, about 500x375 px and 107 KB
on average, as real ImageNet; each linked `--copies` times, so 12 gives 504 records), then
reads them with imagenet.input_pipeline.tfrecord_dataset as resnet_main trains: parallel
interleaved reads, record shuffle, JPEG decode of the random distorted-bounding-box crop
window, flip, bicubic resize to 224, normalisation, batch 32, prefetch. Cases: the map's
`num_parallel_calls` (also the interleave's), 1, 2 and AUTOTUNE (resnet_main's default),
interleaved in every round, each with a fresh iterator: the first pass over the records
(iterator start, function tracing, shuffle buffer fill, cold reads) and the steady state
(the next `--steady_epochs` passes). Images per CPU-second of this process (all tf.data
threads) is the robust figure on this capped VM; wall-clock images/s beside it.

Against the model: ResNet-50 training consumes at most 2.5 images per CPU-second on this CPU
(24.5 GFLOP per 224 px image at the ~60 GFLOP/CPU-s GEMM limit, docs/benchmarks.md), so the
share of the CPU that feeding it takes is model / (model + input) per CPU-second
(`input_share`). Writes runs/bench/imagenet_input.json.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hooks import entry  # noqa: E402

if __name__ == "__main__":
    entry.quiet_startup()  # before TensorFlow is imported

from bench.common import Clock, finish, fmt, summary  # noqa: E402

SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                          "shared", "data", "imagenet")
# ResNet-50 training at this CPU's measured fp32 limit (bench.gemm_peak: ~60 GFLOP per
# CPU-second; 24.5 GFLOP per 224 px image): what one core of the model can consume.
MODEL_IMAGES_PER_CPU_S = 2.5


def parse_parallel_calls(text: str) -> list[int | str]:
    """'1,2,autotune' -> [1, 2, 'autotune']; ValueError for anything else."""
    out: list[int | str] = []
    for item in (t.strip().lower() for t in text.split(",")):
        if item == "autotune":
            out.append(item)
        elif item.isdigit() and int(item) >= 1:
            out.append(int(item))
        else:
            raise ValueError(f"--parallel_calls: '{item}' is neither an integer >= 1 nor "
                             "'autotune'")
    if not out:
        raise ValueError("--parallel_calls names no case")
    return out


def input_share(model_per_cpu_s: float, input_per_cpu_s: float) -> dict[str, float]:
    """When one image costs 1/model CPU-seconds of training and 1/input of preprocessing:
    the fraction of the CPU the input takes, and the images per CPU-second of both together."""
    if model_per_cpu_s <= 0 or input_per_cpu_s <= 0:
        raise ValueError("rates must be > 0")
    per_image = 1.0 / model_per_cpu_s + 1.0 / input_per_cpu_s
    return {"input_fraction": (1.0 / input_per_cpu_s) / per_image,
            "combined_per_cpu_s": 1.0 / per_image}


def link_sample(sample_images: str, dest: str, copies: int) -> int:
    """`dest/<synset>/<name>_c<k>.JPEG` symlinks, `copies` per sample image; returns the
    number of links (the sample's bytes, decoded once per record as in training)."""
    n = 0
    for synset in sorted(os.listdir(sample_images)):
        folder = os.path.join(sample_images, synset)
        if not os.path.isdir(folder):
            continue
        os.makedirs(os.path.join(dest, synset), exist_ok=True)
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            for k in range(copies):
                os.symlink(os.path.abspath(os.path.join(folder, name)),
                           os.path.join(dest, synset, f"{stem}_c{k}{ext}"))
                n += 1
    return n


def measure_case(data_dir, parallel, batch, image_size, batches_per_epoch, steady_epochs):
    """(first pass Clock, steady Clock) for one fresh iterator of the training pipeline."""
    from imagenet import input_pipeline
    calls = input_pipeline.AUTOTUNE if parallel == "autotune" else parallel
    with Clock() as first:
        ds = input_pipeline.tfrecord_dataset(data_dir, is_training=True, per_rank_batch=batch,
                                             image_size=image_size, num_parallel_calls=calls)
        it = iter(ds)
        for _ in range(batches_per_epoch):
            next(it)[0].numpy()
    with Clock() as steady:
        for _ in range(batches_per_epoch * steady_epochs):
            next(it)[0].numpy()
    del it, ds  # stops the prefetch threads before the next case's clock starts
    return first, steady


def parse_args():
    """(parser, args): the parser reports the errors found later, once the records exist."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample_dir", default=SAMPLE_DIR,
                        help="folder with images/<synset>/*.JPEG and synsets.txt")
    parser.add_argument("--copies", type=int, default=12, help="links per sample image")
    parser.add_argument("--num_shards", type=int, default=8)
    parser.add_argument("--parallel_calls", default="1,2,autotune")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steady_epochs", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--out", default=None, help="JSON path (default runs/bench/)")
    args = parser.parse_args()
    for name in ("copies", "num_shards", "rounds", "steady_epochs", "batch", "image_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    try:
        parse_parallel_calls(args.parallel_calls)
    except ValueError as err:
        parser.error(str(err))
    images_dir = os.path.join(args.sample_dir, "images")
    synsets = os.path.join(args.sample_dir, "synsets.txt")
    if not (os.path.isdir(images_dir) and os.path.isfile(synsets)):
        parser.error(f"no ImageNet sample (images/, synsets.txt) in {args.sample_dir}")
    return parser, args


def build_records(args, tmp, parser) -> tuple[str, int, int]:
    """Links the sample and writes its TFRecords under `tmp`: (records dir, records,
    batches per pass)."""
    from imagenet import build_tfrecords
    jpegs, records_dir = os.path.join(tmp, "jpeg"), os.path.join(tmp, "tfrecords")
    link_sample(os.path.join(args.sample_dir, "images"), jpegs, args.copies)
    with Clock() as build:
        stats = build_tfrecords.build(jpegs, records_dir, "train",
                                      os.path.join(args.sample_dir, "synsets.txt"),
                                      args.num_shards, log=lambda _: None)
    records = stats.num_records
    batches = records // args.batch
    if batches < 1:
        parser.error(f"{records} records make no batch of {args.batch}")
    print(f"{records} records in {args.num_shards} shards "
          f"({sum(os.path.getsize(f) for f in stats.output_files) / 1e6:.1f} MB, built in "
          f"{build.wall:.1f} s); {batches} batches of {args.batch} per pass, "
          f"{args.image_size} px, {os.cpu_count()} CPUs", flush=True)
    return records_dir, records, batches


def run_rounds(records_dir, cases, batches, args):
    """Interleaved rounds: ({case: {phase: [img/CPU-s]}}, {case: {phase: [img/s wall]}})."""
    per_cpu = {c: {"first": [], "steady": []} for c in cases}
    wall = {c: {"first": [], "steady": []} for c in cases}
    for r in range(args.rounds):
        for case in cases:
            first, steady = measure_case(records_dir, case, args.batch, args.image_size,
                                         batches, args.steady_epochs)
            n_first, n_steady = batches * args.batch, batches * args.batch * args.steady_epochs
            for phase, clock, n in (("first", first, n_first), ("steady", steady, n_steady)):
                per_cpu[case][phase].append(n / clock.cpu)
                wall[case][phase].append(n / clock.wall)
            print(f"round {r + 1} parallel_calls={case!s:<8} first pass "
                  f"{per_cpu[case]['first'][-1]:6.1f} img/CPU-s {wall[case]['first'][-1]:6.1f} "
                  f"img/s | steady {per_cpu[case]['steady'][-1]:6.1f} img/CPU-s "
                  f"{wall[case]['steady'][-1]:6.1f} img/s", flush=True)
    return per_cpu, wall


def summarise(cases, per_cpu, wall, rounds) -> dict:
    """Prints the table; returns its rows by case and phase."""
    model = MODEL_IMAGES_PER_CPU_S
    result = {}
    print(f"\nmedian [min-max] of {rounds} interleaved rounds; model = ResNet-50 training "
          f"at {model} img/CPU-s (this CPU's fp32 limit)")
    print(f"{'parallel_calls':<15} {'phase':<7} {'img/CPU-s':>22} {'img/s wall':>22} "
          f"{'x model':>8} {'CPU share of input':>19}")
    for case in cases:
        result[str(case)] = {}
        for phase in ("first", "steady"):
            s_cpu, s_wall = summary(per_cpu[case][phase]), summary(wall[case][phase])
            share = input_share(model, s_cpu["median"])
            result[str(case)][phase] = {"img_per_cpu_s": s_cpu, "img_per_s": s_wall,
                                        "x_model": s_cpu["median"] / model, **share}
            print(f"{case!s:<15} {phase:<7} {fmt(s_cpu, 1):>22} {fmt(s_wall, 1):>22} "
                  f"{s_cpu['median'] / model:7.0f}x {share['input_fraction']:18.1%}")
    return result


def main():
    parser, args = parse_args()
    cases = parse_parallel_calls(args.parallel_calls)
    with tempfile.TemporaryDirectory(prefix="imagenet_input_") as tmp:
        records_dir, records, batches = build_records(args, tmp, parser)
        per_cpu, wall = run_rounds(records_dir, cases, batches, args)
    result = summarise(cases, per_cpu, wall, args.rounds)
    finish("imagenet_input", {"args": vars(args), "records": records,
                              "batches_per_pass": batches,
                              "model_img_per_cpu_s": MODEL_IMAGES_PER_CPU_S, "cases": result},
           args.out)


if __name__ == "__main__":
    main()
