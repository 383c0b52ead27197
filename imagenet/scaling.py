"""Scaling model: throughput, efficiency and time-to-train of data-parallel training on N nodes.

    python -m imagenet.scaling --check_published [--plot=docs/scaling.png]
    python -m imagenet.scaling --system=marenostrum4_caffe --nodes=64,256,512 --global_batch=8192
    python -m imagenet.scaling --system=this_machine --nodes=1,2,4,8 --bandwidth_gbps=10

One step on N nodes with r ranks per node (p = N r ranks), per-node batch b = global_batch / N,
S gradient bytes allreduced in m messages (allreduce calls) per step:

    t_compute   = b / R                       R: one node's images/s, computing only
    t_bandwidth = 2 (q-1)/q S / B             ring of q members; B: slowest link of the ring
    t_latency   = 2 (q-1) m alpha             alpha: one ring step of one message
    t_coord     = p gamma                     central negotiation (rank 0 hears every rank)
    t_exposed   = t_latency + max(0, t_bandwidth - phi f_bwd t_compute)
    t_step      = t_compute + t_exposed + t_coord
    throughput  = N b / t_step,  efficiency = throughput / (N R)
    time        = epochs * 1,281,167 / throughput

Flat ring: q = p (each step is as slow as the network link). Hierarchical: reduce inside the
node (shared memory: B_local, alpha_local), a ring over q = N nodes, broadcast inside the node.
Only bandwidth time overlaps the backward pass (phi of its f_bwd share of the compute); the
latency steps and the negotiation are on the critical path. The 2018 systems are fitted on
the seed's published points by least squares (`fit`) and checked leave-one-out
(`leave_one_out`); docs/scaling.md quotes each point and gives each parameter's source.
"""
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

import numpy as np

from hooks.plot_schedule import IMAGENET_TRAIN_IMAGES

# ResNet-50 v1.5 as imagenet/models.py builds it (no conv biases, BN gamma/beta, 1000-way fc).
RESNET50_STAGES = ((64, 3), (128, 4), (256, 6), (512, 3))  # (bottleneck width, blocks)


def resnet50_counts(num_classes: int = 1000, image_size: int = 224) -> dict[str, int]:
    """Trainable parameters, parameter tensors and forward multiply-adds of ResNet-50 v1.5."""
    params = tensors = macs = 0

    def conv(c_in, c_out, k, out_hw):
        nonlocal params, tensors, macs
        params += k * k * c_in * c_out + 2 * c_out  # kernel + the BN's gamma and beta
        tensors += 3
        macs += out_hw * out_hw * k * k * c_in * c_out

    hw = image_size // 2
    conv(3, 64, 7, hw)
    hw //= 2  # max pool
    c_in = 64
    for stage, (width, blocks) in enumerate(RESNET50_STAGES):
        for block in range(blocks):
            stride = 2 if (block == 0 and stage > 0) else 1
            conv(c_in, width, 1, hw)
            hw //= stride  # v1.5: the stride sits on the 3x3 convolution
            conv(width, width, 3, hw)
            conv(width, 4 * width, 1, hw)
            if block == 0:
                conv(c_in, 4 * width, 1, hw)  # projection shortcut
            c_in = 4 * width
    params += c_in * num_classes + num_classes
    tensors += 2
    macs += c_in * num_classes
    return {"parameters": params, "tensors": tensors, "forward_macs": macs}


_RN50 = resnet50_counts()
RESNET50_GRADIENT_BYTES = 4 * _RN50["parameters"]  # float32 gradients
# Forward (inference, evaluation): 2 FLOP per multiply-add, 8.18 GFLOP per 224 px image.
RESNET50_FORWARD_FLOP_PER_IMAGE = 2 * _RN50["forward_macs"]
# Training = forward + two backward GEMMs per layer (input and weight gradients): 24.5 GFLOP.
RESNET50_TRAIN_FLOP_PER_IMAGE = 3 * RESNET50_FORWARD_FLOP_PER_IMAGE


@dataclasses.dataclass(frozen=True)
class System:
    """A cluster + software stack. Units: seconds, bytes, images."""
    name: str
    node_images_per_sec: float  # R
    ranks_per_node: int  # r
    link_bytes_per_sec: float  # B
    latency_sec: float  # alpha
    messages_per_step: int  # m
    coordination_sec_per_rank: float = 0.0  # gamma
    overlap: float = 1.0  # phi
    hierarchical: bool = False
    local_bytes_per_sec: float = 10e9  # B_local (shared memory)
    local_latency_sec: float = 1e-6  # alpha_local
    gradient_bytes: float = RESNET50_GRADIENT_BYTES  # S
    backward_fraction: float = 2.0 / 3.0  # f_bwd


@dataclasses.dataclass(frozen=True)
class Step:
    """Where one training step's time goes (seconds) and what it gives."""
    nodes: int
    per_node_batch: float
    compute: float
    bandwidth: float
    latency: float
    coordination: float
    exposed: float
    total: float
    images_per_sec: float
    efficiency: float


def ring_allreduce(bytes_: float, members: int, link_bytes_per_sec: float, latency_sec: float,
                   messages: int) -> tuple[float, float]:
    """(bandwidth seconds, latency seconds) of a ring allreduce: 2(q-1) steps per message."""
    if members <= 1:
        return 0.0, 0.0
    steps = 2 * (members - 1)
    return steps / members * bytes_ / link_bytes_per_sec, steps * messages * latency_sec


def allreduce_times(system: System, nodes: int) -> tuple[float, float]:
    """(bandwidth, latency) seconds of one step's gradient allreduce on `nodes` nodes."""
    s, r, m = system.gradient_bytes, system.ranks_per_node, system.messages_per_step
    if not system.hierarchical:
        # The ring visits every rank; its slowest edge (the network once nodes > 1) sets each
        # step's time. One node alone runs the ring over shared memory.
        net = nodes > 1
        return ring_allreduce(s, nodes * r,
                              system.link_bytes_per_sec if net else system.local_bytes_per_sec,
                              system.latency_sec if net else system.local_latency_sec, m)
    # Reduce-scatter then all-gather inside the node: each one ring pass of r - 1 steps.
    local_bw, local_lat = ring_allreduce(s, r, system.local_bytes_per_sec,
                                         system.local_latency_sec, m)
    net_bw, net_lat = ring_allreduce(s, nodes, system.link_bytes_per_sec, system.latency_sec, m)
    return local_bw + net_bw, local_lat + net_lat


def step(system: System, nodes: int, global_batch: float) -> Step:
    """The model's step on `nodes` nodes at `global_batch` images per step (all ranks)."""
    if nodes < 1:
        raise ValueError(f"nodes must be >= 1, got {nodes}")
    b = global_batch / nodes
    compute = b / system.node_images_per_sec
    bandwidth, latency = allreduce_times(system, nodes)
    ranks = nodes * system.ranks_per_node
    coordination = system.coordination_sec_per_rank * ranks if ranks > 1 else 0.0
    hidden = system.overlap * system.backward_fraction * compute
    exposed = latency + max(0.0, bandwidth - hidden)
    total = compute + exposed + coordination
    rate = nodes * b / total
    return Step(nodes, b, compute, bandwidth, latency, coordination, exposed, total, rate,
                rate / (nodes * system.node_images_per_sec))


def time_to_train_sec(images_per_sec: float, epochs: float,
                      images_per_epoch: int = IMAGENET_TRAIN_IMAGES) -> float:
    return epochs * images_per_epoch / images_per_sec


# ---------------------------------------------------------------- the 2018 systems
@dataclasses.dataclass(frozen=True)
class Published:
    """One published 2018 throughput, in the seed's words, and the batch it is modelled at."""
    system: str
    nodes: int
    global_batch: int
    images_per_sec: float
    quote: str  # the seed's own words (docs/scaling.md)
    batch_source: str  # how global_batch follows from the quote
    minutes: float | None = None  # published time-to-train


PUBLISHED = (
    Published("marenostrum4_caffe", 256, 8192, 15170,
              '256 nodes, "Global BS=8192", "15170 Img/sec", "90% Scaling Efficiency", '
              "70 minutes", "quoted", 70),
    Published("marenostrum4_caffe", 400, 6400, 19047,
              '400 nodes, "Global BS= 6400 & 50 Epochs", 19047 img/s, 56 minutes', "quoted",
              56),
    Published("marenostrum4_caffe", 512, 8192, 24240,
              '512 nodes, "Global BS= 8192 & 50 Epochs", 24240 img/s, 44 minutes', "quoted",
              44),
    Published("stampede2_tf_horovod", 256, 64 * 1024, 16400,
              '"Batch size of 64 per worker: Global BS=64K", "16400 Images/sec on 256 nodes"',
              "quoted: 64K / 64 per worker = 1024 workers = 4 per node"),
    Published("stampede2_tf_horovod", 512, 512 * 4 * 64, 26700,
              '"26700 images/sec on 512 nodes"',
              "chosen: 64 per worker and 4 workers per node, as at 256 nodes"),
)


@dataclasses.dataclass(frozen=True)
class Efficiency:
    """A published efficiency against one node, stated with the point at `nodes`."""
    system: str
    nodes: int
    efficiency: float
    quote: str


# R = X / (N E) for MareNostrum 4 (one rank per node: one node alone has no allreduce).
# Stampede2's "81% scaling efficiency" is 26700 / (2 x 16400) = 81.4%, the 512-node point
# against the 256-node one: it holds nothing its two points do not, so it is not used.
EFFICIENCIES = (Efficiency("marenostrum4_caffe", 256, 0.90, '"90% Scaling Efficiency"'),)
# The reading this model used before (81% = the 256-node point against one node), shown as
# an alternative by --check_published.
STAMPEDE2_81_VS_ONE_NODE = Efficiency("stampede2_tf_horovod", 256, 0.81,
                                      '"81% scaling efficiency"')

OMNIPATH_BYTES_PER_SEC = 100e9 / 8  # 100 Gb/s per port (BSC MN4 and TACC Stampede2 pages)
# Intel Caffe/MLSL reduces every parameter blob on its own; Horovod 0.1x negotiated every
# gradient tensor with rank 0 and reduced what was ready each 5 ms cycle (<= 64 MiB fused).
RESNET50_TENSORS = _RN50["tensors"]
RANKS_PER_NODE = {"marenostrum4_caffe": 1, "stampede2_tf_horovod": 4}
# What a fit solves for: each system's node seconds per image (1/R), one ring-step latency
# alpha for both (the same Omni-Path fabric) and Horovod's negotiation gamma (Intel
# Caffe/MLSL has no central coordinator: gamma = 0 there).
UNKNOWNS = ("sec_per_image:marenostrum4_caffe", "sec_per_image:stampede2_tf_horovod",
            "latency_sec", "coordination_sec_per_rank")


def _template(name: str) -> System:
    return System(name, node_images_per_sec=1.0, ranks_per_node=RANKS_PER_NODE[name],
                  link_bytes_per_sec=OMNIPATH_BYTES_PER_SEC, latency_sec=0.0,
                  messages_per_step=RESNET50_TENSORS, overlap=1.0)


def _step_row(system: str, nodes: int, global_batch: float) -> tuple[dict[str, float], float]:
    """(coefficients, constant) with step time = sum(coefficient x unknown) + constant.

    Linear while the bandwidth term hides behind the backward pass; `fit` checks that.
    """
    s = _template(system)
    latency_0 = allreduce_times(s, nodes)[1]
    latency_1 = allreduce_times(dataclasses.replace(s, latency_sec=1.0), nodes)[1]
    coef = {f"sec_per_image:{system}": global_batch / nodes, "latency_sec": latency_1 - latency_0}
    ranks = nodes * s.ranks_per_node
    if system == "stampede2_tf_horovod" and ranks > 1:
        coef["coordination_sec_per_rank"] = ranks
    return coef, latency_0


def fit(points: Sequence[Published],
        efficiencies: Sequence[Efficiency] = EFFICIENCIES) -> dict[str, System]:
    """The systems of `points`, their unknowns fitted by least squares (relative step times).

    An efficiency counts only while the point it was stated with is among `points`. Raises
    ValueError when the statements do not determine every unknown they involve.
    """
    rows, targets = [], []
    for p in points:
        coef, const = _step_row(p.system, p.nodes, p.global_batch)
        t = p.global_batch / p.images_per_sec
        rows.append([coef.get(u, 0.0) / t for u in UNKNOWNS])
        targets.append(1.0 - const / t)
    for e in efficiencies:
        for p in points:
            if (p.system, p.nodes) == (e.system, e.nodes):
                rate = p.images_per_sec / (p.nodes * e.efficiency)  # R = X / (N E)
                rows.append([rate * (u == f"sec_per_image:{e.system}") for u in UNKNOWNS])
                targets.append(1.0)
    a = np.array(rows)
    used = [j for j in range(len(UNKNOWNS)) if a[:, j].any()]
    a = a[:, used]
    rank = np.linalg.matrix_rank(a)
    if rank < len(used):
        # The unknowns that move along the null space are the undetermined ones.
        null = np.linalg.svd(a)[2][rank:]
        free = [UNKNOWNS[j] for k, j in enumerate(used) if np.abs(null[:, k]).max() > 1e-9]
        raise ValueError(f"{', '.join(free)} not determined ({len(rows)} statements for "
                         f"{len(used)} unknowns, rank {rank})")
    theta = dict(zip((UNKNOWNS[j] for j in used),
                     np.linalg.lstsq(a, np.array(targets), rcond=None)[0]))
    out = {}
    for name in dict.fromkeys(p.system for p in points):
        sec = theta[f"sec_per_image:{name}"]
        if sec <= 0:
            raise ValueError(f"{name}: the fit gives a node rate <= 0 (1/R = {sec:.3g} s)")
        out[name] = dataclasses.replace(
            _template(name), node_images_per_sec=1.0 / float(sec),
            latency_sec=float(theta.get("latency_sec", 0.0)),
            coordination_sec_per_rank=(float(theta.get("coordination_sec_per_rank", 0.0))
                                       if name == "stampede2_tf_horovod" else 0.0))
    for p in points:  # the linear rows hold only while the bandwidth time is hidden
        coef, const = _step_row(p.system, p.nodes, p.global_batch)
        linear = const + sum(c * theta.get(u, 0.0) for u, c in coef.items())
        if not math.isclose(step(out[p.system], p.nodes, p.global_batch).total, linear,
                            rel_tol=1e-9):
            raise ValueError(f"{p.system} at {p.nodes} nodes: allreduce bandwidth not hidden")
    return out


def calibrated_2018() -> dict[str, System]:
    """Both 2018 systems fitted on every published point (see docs/scaling.md)."""
    return fit(PUBLISHED)


def leave_one_out(points: Sequence[Published] = PUBLISHED,
                  efficiencies: Sequence[Efficiency] = EFFICIENCIES) -> list[dict]:
    """Each point predicted by the model fitted on the other points only (an efficiency
    stated with the point leaves with it); predicted None where the others do not
    determine the model."""
    rows = []
    for p in points:
        others = [q for q in points if q is not p]
        row = {"system": p.system, "nodes": p.nodes, "global_batch": p.global_batch,
               "published": p.images_per_sec, "predicted": None, "error_pct": None,
               "calibrated_on": [f"{q.system}@{q.nodes}" for q in others], "note": ""}
        try:
            rate = step(fit(others, efficiencies)[p.system], p.nodes,
                        p.global_batch).images_per_sec
        except ValueError as err:
            row["note"] = f"without it: {err}"
        else:
            row.update(predicted=round(float(rate), 1),
                       error_pct=round(100 * (float(rate) / p.images_per_sec - 1), 2))
        rows.append(row)
    return rows


def check_published() -> list[dict]:
    """Leave-one-out rows, each with the in-sample prediction (fit on all points) beside."""
    systems = calibrated_2018()
    rows = leave_one_out()
    for row in rows:
        rate = step(systems[row["system"]], row["nodes"], row["global_batch"]).images_per_sec
        row["in_sample_error_pct"] = round(100 * (float(rate) / row["published"] - 1), 2)
    return rows


def seed_consistency() -> dict:
    """What the seed's own numbers say about each other (no model involved)."""
    pub = {(p.system, p.nodes): p for p in PUBLISHED}
    mn4 = {n: pub[("marenostrum4_caffe", n)] for n in (256, 400, 512)}
    s2 = {n: pub[("stampede2_tf_horovod", n)] for n in (256, 512)}
    return {
        "marenostrum4_256_to_512": mn4[512].images_per_sec / (2 * mn4[256].images_per_sec),
        "stampede2_256_to_512": s2[512].images_per_sec / (2 * s2[256].images_per_sec),
        "marenostrum4_per_node": {n: p.images_per_sec / n for n, p in mn4.items()},
        "epochs_from_minutes": {n: p.minutes * 60 * p.images_per_sec / IMAGENET_TRAIN_IMAGES
                                for n, p in mn4.items()},
    }


# Dell EMC's Zenith (2S Xeon Gold 6148, Omni-Path, Intel Caffe + MLSL, global batch <= 8K):
# efficiency vs one node of 90% up to 128 nodes, 83% at 256 and 76% at 314 (Filby and
# Dandapanthula, March 2018). (nodes, per-node batch, efficiency); none of it is calibrated on.
ZENITH = ((128, 64.0, 0.90), (256, 32.0, 0.83), (314, 8192 / 314, 0.76))


def check_zenith(system: System) -> list[dict]:
    """Efficiency relative to 128 nodes on Zenith, published and predicted with `system`.

    Relative to 128 nodes, so what is not communication (input, the one-node baseline)
    cancels; assumes a Gold 6148 node computes like a Platinum 8160 node (same R).
    """
    base = step(system, ZENITH[0][0], ZENITH[0][0] * ZENITH[0][1]).efficiency
    return [{"nodes": n, "per_node_batch": round(b, 1), "published": round(e / ZENITH[0][2], 4),
             "predicted": round(step(system, n, n * b).efficiency / base, 4)}
            for n, b, e in ZENITH[1:]]


# ---------------------------------------------------------------- this machine
def this_machine(node_images_per_sec: float = 7.2, ranks_per_node: int = 2,
                 bandwidth_gbps: float = 10.0, latency_us: float = 50.0) -> System:
    """Our code on nodes like this one: Horovod 0.28, one fused message, no overlap.

    Defaults: R from docs/benchmarks.md (ResNet-50 fp32, 2 cores, best uncapped rounds);
    the network figures are flags, since this machine has no network of its own.
    """
    return System("this_machine", node_images_per_sec=node_images_per_sec,
                  ranks_per_node=ranks_per_node, link_bytes_per_sec=bandwidth_gbps * 1e9 / 8,
                  latency_sec=latency_us * 1e-6, messages_per_step=1, overlap=0.0,
                  hierarchical=ranks_per_node > 1)


# ---------------------------------------------------------------- output
def format_steps(system: System, steps: Sequence[Step], epochs: float) -> str:
    lines = [f"{system.name}: R={system.node_images_per_sec:.2f} img/s/node, "
             f"{system.ranks_per_node} ranks/node, B={system.link_bytes_per_sec / 1e9:.3g} GB/s, "
             f"alpha={system.latency_sec * 1e6:.3g} us, m={system.messages_per_step}, "
             f"gamma={system.coordination_sec_per_rank * 1e6:.3g} us/rank, "
             f"phi={system.overlap}, {'hierarchical' if system.hierarchical else 'flat ring'}, "
             f"S={system.gradient_bytes / 1e6:.1f} MB",
             f"{'nodes':>6} {'b/node':>7} {'compute':>8} {'bw':>7} {'lat':>7} {'coord':>7} "
             f"{'step s':>7} {'img/s':>9} {'eff':>6} {f'{epochs:g} ep (h)':>10}"]
    for s in steps:
        lines.append(f"{s.nodes:>6} {s.per_node_batch:>7.1f} {s.compute:>8.3f} "
                     f"{s.bandwidth:>7.3f} {s.latency:>7.3f} {s.coordination:>7.3f} "
                     f"{s.total:>7.3f} {s.images_per_sec:>9.1f} {s.efficiency:>6.1%} "
                     f"{time_to_train_sec(s.images_per_sec, epochs) / 3600:>10.2f}")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{round(value, 1) + 0.0:+.1f}%"  # no "-0.0%"


def format_check(rows: Sequence[dict], systems: dict[str, System]) -> str:
    """--check_published: the seed's numbers, the fits, leave-one-out errors, the seed's
    consistency, an alternative reading and the Zenith check."""
    lines = ["The seed's numbers and the global batch each point is modelled at:"]
    for p in PUBLISHED:
        lines.append(f"  {p.system:<21} {p.nodes:>4} nodes  {p.images_per_sec:>6.0f} img/s  "
                     f"global batch {p.global_batch:>6} ({p.global_batch // p.nodes}/node, "
                     f"{p.batch_source}): {p.quote}")
    lines.append("\nFitted on all five points and the 90% (in-sample; --system uses these):")
    for s in systems.values():
        lines.append(f"  {s.name}: R={s.node_images_per_sec:.2f} img/s/node, "
                     f"{s.ranks_per_node} rank(s)/node, alpha={s.latency_sec * 1e6:.3f} us, "
                     f"gamma={s.coordination_sec_per_rank * 1e6:.1f} us/rank")
    lines.append("\nLeave-one-out: each point predicted by the model fitted on the other four:")
    lines.append(f"{'system':<22} {'nodes':>5} {'batch':>6} {'published':>9} {'predicted':>9} "
                 f"{'error':>7} {'in-sample':>9}")
    for r in rows:
        predicted = "n/a" if r["predicted"] is None else f"{r['predicted']:.0f}"
        lines.append(f"{r['system']:<22} {r['nodes']:>5} {r['global_batch']:>6} "
                     f"{r['published']:>9.0f} {predicted:>9} {_pct(r['error_pct']):>7} "
                     f"{_pct(r['in_sample_error_pct']):>9}" + (f"  {r['note']}" if r["note"]
                                                               else ""))
    lines += ["", *format_consistency(seed_consistency())]
    alt = leave_one_out(efficiencies=EFFICIENCIES + (STAMPEDE2_81_VS_ONE_NODE,))
    lines.append('\nAlternative reading, Stampede2\'s "81%" as its 256-node efficiency against '
                 "one node: leave-one-out " + ", ".join(
                     f"{r['nodes']} nodes {_pct(r['error_pct'])}" for r in alt
                     if r["system"] == "stampede2_tf_horovod"))
    lines.append("\nIndependent check, Dell EMC Zenith (Intel Caffe, Omni-Path), efficiency "
                 "relative to 128 nodes:")
    for z in check_zenith(systems["marenostrum4_caffe"]):
        lines.append(f"  {z['nodes']} nodes ({z['per_node_batch']:g}/node): published "
                     f"{z['published']:.3f}, predicted {z['predicted']:.3f}")
    return "\n".join(lines)


def format_consistency(c: dict) -> list[str]:
    per_node = c["marenostrum4_per_node"]
    return [
        "The seed against itself (no model):",
        "  MareNostrum 4, 256 -> 512 nodes, both at global batch 8192: 24240 / (2 x 15170) = "
        f"{c['marenostrum4_256_to_512']:.1%}, beside the seed's \">85%\" claims",
        "  Stampede2, 256 -> 512 nodes: 26700 / (2 x 16400) = "
        f"{c['stampede2_256_to_512']:.1%}, the quoted \"81% scaling efficiency\"",
        "  MareNostrum 4 img/s per node: " + ", ".join(
            f"{v:.1f} at {n} nodes ({b}/node)" for (n, v), b in zip(per_node.items(),
                                                                  (32, 16, 16))),
        "  epochs in the published minutes: " + ", ".join(
            f"{v:.1f} at {n} nodes" for n, v in c["epochs_from_minutes"].items())]


def format_markdown(rows: Sequence[dict]) -> str:
    """The leave-one-out table as docs/scaling.md has it."""
    names = {"marenostrum4_caffe": "MareNostrum 4, Intel Caffe",
             "stampede2_tf_horovod": "Stampede2, TF + Horovod"}
    lines = ["| system | nodes | global batch (per node) | published img/s | leave-one-out "
             "prediction | error | in-sample error |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        predicted = "n/a" if r["predicted"] is None else f"{r['predicted']:,.0f}"
        lines.append(f"| {names[r['system']]} | {r['nodes']} | {r['global_batch']:,} "
                     f"({r['global_batch'] // r['nodes']}) | {r['published']:,.0f} | "
                     f"{predicted} | {_pct(r['error_pct'])} | "
                     f"{_pct(r['in_sample_error_pct'])} |")
    return "\n".join(lines)


def plot_published(rows: Sequence[dict], systems: dict[str, System], path: str) -> None:
    """Model curves (fitted on all points), published points and leave-one-out predictions."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    curves = {"marenostrum4_caffe": ((lambda n: 8192, "global batch 8192", "-"),
                                     (lambda n: 16 * n, "16 per node", "--")),
              "stampede2_tf_horovod": ((lambda n: 256 * n, "4 x 64 per node", "-"),)}
    nodes = list(range(16, 1025, 8))
    for (name, system), color in zip(systems.items(), ("tab:blue", "tab:orange")):
        for batch, label, ls in curves[name]:
            ax.plot(nodes, [step(system, n, batch(n)).images_per_sec for n in nodes],
                    color=color, ls=ls, lw=1, label=f"model: {name}, {label}")
        for r in (r for r in rows if r["system"] == name):
            ax.plot(r["nodes"], r["published"], "o", color=color, mfc="none", ms=8)
            if r["predicted"] is not None:
                ax.plot(r["nodes"], r["predicted"], "x", color=color, ms=7)
            ax.annotate(f"{_pct(r['error_pct'])} (batch {r['global_batch']})",
                        (r["nodes"], r["published"]), textcoords="offset points",
                        xytext=(8, -4), fontsize=7, color=color)
    ax.set_xlabel("nodes (2S Xeon Platinum 8160, Omni-Path)")
    ax.set_ylabel("images / s")
    ax.set_title("ResNet-50 scaling model vs 2018: o published, x leave-one-out prediction",
                 fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------- command line
SYSTEMS = ("marenostrum4_caffe", "stampede2_tf_horovod", "this_machine")


def define_flags(flag_values=None) -> None:
    """Registers this tool's flags (only the command line calls this)."""
    from absl import flags
    fv = flag_values if flag_values is not None else flags.FLAGS
    flags.DEFINE_boolean("check_published", False, "Print the seed's five 2018 points, "
                         "each predicted leave-one-out, and a SUMMARY json line.", flag_values=fv)
    flags.DEFINE_string("plot", None, "With --check_published: write this PNG.", flag_values=fv)
    flags.DEFINE_boolean("markdown", False, "With --check_published: print the leave-one-out "
                         "table as docs/scaling.md has it.", flag_values=fv)
    flags.DEFINE_enum("system", "this_machine", SYSTEMS, "Which system to predict: a "
                      "calibrated 2018 one, or ours on nodes like this machine.", flag_values=fv)
    flags.DEFINE_list("nodes", ["1", "2", "4", "8", "16", "64", "256"], "Node counts.",
                      flag_values=fv)
    flags.DEFINE_float("global_batch", None, "Images per step, all ranks (default: "
                       "--per_node_batch x nodes).", flag_values=fv)
    flags.DEFINE_float("per_node_batch", 64, "Images per node per step when --global_batch "
                       "is unset.", flag_values=fv)
    flags.DEFINE_float("epochs", 90, "Epochs for the time-to-train column.", flag_values=fv)
    flags.DEFINE_float("node_images_per_sec", None, "R: one node's measured images/s "
                       "(this_machine default 7.2).", flag_values=fv)
    flags.DEFINE_integer("ranks_per_node", None, "r: processes per node.", flag_values=fv)
    flags.DEFINE_float("bandwidth_gbps", None, "B: per-node network bandwidth in Gb/s.",
                       flag_values=fv)
    flags.DEFINE_float("latency_us", None, "alpha: latency of one ring step in microseconds.",
                       flag_values=fv)
    flags.DEFINE_integer("messages_per_step", None, "m: allreduce calls per step.",
                         flag_values=fv)
    flags.DEFINE_float("overlap", None, "phi in [0, 1]: share of the backward pass that "
                       "hides allreduce bandwidth time.", flag_values=fv)
    flags.DEFINE_boolean("hierarchical", None, "Reduce inside each node first.", flag_values=fv)
    flags.DEFINE_float("local_bandwidth_gbps", None, "B_local: bandwidth between the ranks of "
                       "one node in Gb/s.", flag_values=fv)
    flags.DEFINE_float("local_latency_us", None, "alpha_local in microseconds.", flag_values=fv)
    flags.DEFINE_float("gradient_mb", None, "S in MB (default ResNet-50 fp32: "
                       f"{RESNET50_GRADIENT_BYTES / 1e6:.1f}).", flag_values=fv)
    for name in ("per_node_batch", "epochs", "node_images_per_sec", "bandwidth_gbps",
                 "gradient_mb", "global_batch", "local_bandwidth_gbps"):
        flags.register_validator(name, lambda v: v is None or (math.isfinite(v) and v > 0),
                                 message=f"--{name} must be > 0", flag_values=fv)
    for name in ("ranks_per_node", "messages_per_step"):
        flags.register_validator(name, lambda v: v is None or v >= 1,
                                 message=f"--{name} must be >= 1", flag_values=fv)
    for name in ("latency_us", "local_latency_us"):
        flags.register_validator(name, lambda v: v is None or v >= 0,
                                 message=f"--{name} must be >= 0", flag_values=fv)
    flags.register_validator("overlap", lambda v: v is None or 0 <= v <= 1,
                             message="--overlap must be in [0, 1]", flag_values=fv)
    flags.register_validator("nodes", lambda v: all(x.isdigit() and int(x) >= 1 for x in v),
                             message="--nodes must be a comma-separated list of integers >= 1",
                             flag_values=fv)


def system_from_flags(fv) -> System:
    """The chosen system with every flag the user gave applied on top."""
    system = (this_machine() if fv.system == "this_machine" else calibrated_2018()[fv.system])
    overrides = {"node_images_per_sec": fv.node_images_per_sec,
                 "ranks_per_node": fv.ranks_per_node,
                 "link_bytes_per_sec": fv.bandwidth_gbps and fv.bandwidth_gbps * 1e9 / 8,
                 "latency_sec": None if fv.latency_us is None else fv.latency_us * 1e-6,
                 "messages_per_step": fv.messages_per_step, "overlap": fv.overlap,
                 "hierarchical": fv.hierarchical,
                 "local_bytes_per_sec": (fv.local_bandwidth_gbps
                                         and fv.local_bandwidth_gbps * 1e9 / 8),
                 "local_latency_sec": None if fv.local_latency_us is None
                 else fv.local_latency_us * 1e-6,
                 "gradient_bytes": fv.gradient_mb and fv.gradient_mb * 1e6}
    return dataclasses.replace(system, **{k: v for k, v in overrides.items() if v is not None})


def main(argv) -> None:
    from absl import flags
    if len(argv) > 1:
        sys.exit(f"scaling: error: unexpected arguments {' '.join(argv[1:])}")
    fv = flags.FLAGS
    if fv.check_published:
        systems = calibrated_2018()
        rows = check_published()
        print(format_markdown(rows) if fv.markdown else format_check(rows, systems))
        if fv.plot:
            plot_published(rows, systems, fv.plot)
            print(f"wrote {fv.plot}")
        keys = ("system", "nodes", "global_batch", "published", "predicted", "error_pct",
                "in_sample_error_pct", "calibrated_on")
        checked = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
        print("SUMMARY " + json.dumps({
            "points": [{k: r[k] for k in keys} for r in rows],
            "max_abs_error_pct": max(checked),
            "not_determined": [f"{r['system']}@{r['nodes']}" for r in rows
                               if r["predicted"] is None]}))
        return
    if fv.plot or fv.markdown:
        sys.exit(f"scaling: error: --{'plot' if fv.plot else 'markdown'} needs "
                 "--check_published")
    system = system_from_flags(fv)
    nodes = [int(n) for n in fv.nodes]
    steps = [step(system, n, fv.global_batch or fv.per_node_batch * n) for n in nodes]
    print(format_steps(system, steps, fv.epochs))
    print("SUMMARY " + json.dumps({"system": dataclasses.asdict(system),
                                   "steps": [dataclasses.asdict(s) for s in steps]}))


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
