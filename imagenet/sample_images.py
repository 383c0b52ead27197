"""Generate a tiny ImageNet-style JPEG folder (`<synset>/*.JPEG` + synsets file) for demos
and tests on machines without the shared sample. Each class has its own colour and
shape, so a small network can learn it.

  python -m imagenet.sample_images --output_dir=DIR [--num_classes=4] [--per_class=10]
"""
import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw


def generate(output_dir: str, num_classes: int = 4, per_class: int = 10, size: int = 80,
             seed: int = 0):
    """Writes output_dir/images/<synset>/*.JPEG and output_dir/synsets.txt; returns paths."""
    rng = np.random.default_rng(seed)
    synsets = [f"n{90000000 + i:08d}" for i in range(num_classes)]
    colours = rng.integers(40, 255, size=(num_classes, 3))
    for c, synset in enumerate(synsets):
        folder = os.path.join(output_dir, "images", synset)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
            image = Image.fromarray(noise)
            draw = ImageDraw.Draw(image)
            x, y = rng.integers(5, size // 2, size=2)
            box = [int(x), int(y), int(x + size // 3 + 5 * c), int(y + size // 3)]
            (draw.ellipse if c % 2 else draw.rectangle)(box, fill=tuple(map(int, colours[c])))
            image.save(os.path.join(folder, f"{synset}_{i}.JPEG"), quality=90)
    synsets_file = os.path.join(output_dir, "synsets.txt")
    with open(synsets_file, "w") as f:
        f.write("".join(f"{s} generated class {i}\n" for i, s in enumerate(synsets)))
    return os.path.join(output_dir, "images"), synsets_file


def main(argv):
    del argv
    images, synsets = generate(FLAGS.output_dir, FLAGS.num_classes, FLAGS.per_class)
    print(f"wrote {FLAGS.num_classes * FLAGS.per_class} JPEGs under {images}, synsets "
          f"in {synsets}")


if __name__ == "__main__":
    flags.DEFINE_string("output_dir", None, "Where to write images/ and synsets.txt.")
    flags.DEFINE_integer("num_classes", 4, "Number of classes.")
    flags.DEFINE_integer("per_class", 10, "Images per class.")
    flags.mark_flag_as_required("output_dir")
    FLAGS = flags.FLAGS
    app.run(main)
