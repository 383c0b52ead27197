"""The published learning-rate recipes, as data: which reference each comes from, at which
global batch and run length, with which phases.

Keras-free on purpose: flag checks import `NAMES` before TensorFlow starts, so a bad
`--lr_schedule` fails in a second. `hooks.practices.schedules.preset` turns a recipe into schedule
objects at any global batch and run length.

Sources, by name:
- "tpu": tensorflow/tpu `models/official/resnet/resnet_main.py`, the reference schedule
  (linear warm-up over 5 epochs to 0.1 x B/256, then x0.1 at epochs 30, 60, 80; 90 epochs;
  weight decay 1e-4).
- "goyal": Goyal et al. 2017, "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour"
  (the same steps, with the gradual warm-up starting from the unscaled base lr 0.1).
- "surfsara_4096", "surfsara_14336": Codreanu, Podareanu, Saletore 2017, "Scale out for large
  minibatch SGD: Residual network training on ImageNet-1K with improved accuracy and reduced
  time to train" (SURFsara / Intel), its Caffe solvers and the 2018 SURFsara / Intel / Dell
  EMC slides: warm-up, polynomial decay, weight-decay scaling, collapse and cycles.
- "lars_32k": You, Gitman, Ginsburg 2017, "Large Batch Training of Convolutional Networks"
  (LARS) at batch 32K, with the slides' large-batch weight decay.
Where a source leaves a value open, the comment beside it says it is our pick.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One reference schedule at its reference batch and run length.

    `kind` "step_decay": warm-up then x1, x0.1, x0.01, x0.001 from epochs 30/60/80 (scaled
    with the run length), peak 0.1 per 256 images. `kind` "phased": `phases` are dicts of
    `hooks.practices.schedules.Phase` fields with lengths in epochs (`epochs`, `warmup_epochs`).
    """

    name: str
    source: str
    reference_batch: int
    reference_epochs: float
    kind: str
    optimizer: str = "sgd"  # "sgd" (momentum) or "lars"
    warmup_start_lr: float = 0.0  # step_decay only
    phases: tuple = ()  # phased only


# Batch 4096, 72 epochs. The cycle lengths 15/15/12 are our pick inside the solvers' stated
# 12-15 epochs so that the run sums to 72. Cycles decay fully (stop_fraction 1; the solver's
# cut-off is not recorded) and the warmed-up cycles start from 0, the previous phase's final
# value. Snapshots: the end of each cycle and the collapse (collapsed ensembles).
_SURFSARA_4096 = (
    dict(name="init", epochs=25, peak_lr=1.6, power=1.0, warmup_epochs=5,
         warmup_start_lr=0.1, weight_decay=5e-5),
    dict(name="cycle1", epochs=15, peak_lr=1.02, power=2.0, weight_decay=5e-5, snapshot=True),
    dict(name="cycle2", epochs=15, peak_lr=0.764, power=2.0, warmup_epochs=3,
         weight_decay=5e-5, snapshot=True),
    dict(name="cycle3", epochs=12, peak_lr=0.572, power=2.0, warmup_epochs=3,
         weight_decay=5e-5, snapshot=True),
    dict(name="collapse", epochs=5, peak_lr=0.143, power=2.0, weight_decay=2e-4,
         snapshot=True),
)

# Batch 14336: 90 epochs, peak 4.8, power 1, 5 warm-up epochs from 0.1. The collapse is our
# pick: the linear decay is laid out over the full 90 epochs but cut at 85 (a partial
# collapse, stop_fraction 80/85), and the last 5 epochs collapse with power 2 from the value
# reached (4.8 * 5/85, so the lr is continuous) to 0, weight decay x4 as in the 4096 solver.
_SURFSARA_14336 = (
    dict(name="main", epochs=85, peak_lr=4.8, power=1.0, warmup_epochs=5,
         warmup_start_lr=0.1, weight_decay=5e-5, stop_fraction=80 / 85),
    dict(name="collapse", epochs=5, peak_lr=4.8 * 5 / 85, power=2.0, weight_decay=2e-4,
         snapshot=True),
)

# LARS at batch 32K: peak 34 (inside the slides' 25-41), 12 warm-up epochs from 0, poly
# power 2 to 0; the 90 epochs are our pick; weight decay 5e-5, the slides' large-batch value.
_LARS_32K = (
    dict(name="lars", epochs=90, peak_lr=34.0, power=2.0, warmup_epochs=12,
         weight_decay=5e-5),
)

_RECIPES = (
    Recipe("tpu", "tensorflow/tpu resnet_main.py", 256, 90, "step_decay"),
    Recipe("goyal", "Goyal et al. 2017", 256, 90, "step_decay", warmup_start_lr=0.1),
    Recipe("surfsara_4096", "Codreanu et al. 2017 (SURFsara solvers)", 4096, 72, "phased",
           phases=_SURFSARA_4096),
    Recipe("surfsara_14336", "Codreanu et al. 2017 (SURFsara slides)", 14336, 90, "phased",
           phases=_SURFSARA_14336),
    Recipe("lars_32k", "You, Gitman, Ginsburg 2017 (LARS)", 32768, 90, "phased",
           optimizer="lars", phases=_LARS_32K),
)
RECIPES = {recipe.name: recipe for recipe in _RECIPES}
NAMES = tuple(RECIPES)


def recipe(name):
    """The recipe called `name`; ValueError naming the choices for another name."""
    if name not in RECIPES:
        raise ValueError(f"name must be one of {NAMES}, got {name!r}")
    return RECIPES[name]
