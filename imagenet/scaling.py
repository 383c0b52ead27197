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
latency steps and the negotiation are on the critical path. docs/scaling.md has each
parameter's source and what was calibrated on what.
"""
import dataclasses
import json
import math
import sys
from collections.abc import Sequence

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


def solve_linear(system: System, field: str, nodes: int, global_batch: float,
                 images_per_sec: float) -> System:
    """The system with `field` set so the model gives `images_per_sec` there.

    Step time is linear in alpha and gamma (the max() holds no latency or negotiation),
    so two evaluations give the exact value.
    """
    target = nodes * (global_batch / nodes) / images_per_sec
    t0 = step(dataclasses.replace(system, **{field: 0.0}), nodes, global_batch).total
    t1 = step(dataclasses.replace(system, **{field: 1.0}), nodes, global_batch).total
    value = (target - t0) / (t1 - t0)
    if value < 0:
        raise ValueError(f"{system.name}: {images_per_sec:.0f} img/s on {nodes} nodes needs "
                         f"{field} < 0: the other terms already cost more than that")
    return dataclasses.replace(system, **{field: value})


# ---------------------------------------------------------------- the 2018 systems
@dataclasses.dataclass(frozen=True)
class Published:
    """One published 2018 throughput and the batch it ran at."""
    system: str
    nodes: int
    global_batch: int
    images_per_sec: float
    role: str  # "calibration" or "check"
    note: str


PUBLISHED = (
    Published("marenostrum4_caffe", 256, 8192, 15170, "calibration",
              "Intel Caffe + MLSL, 90% efficiency, batch 8192 (32 per node)"),
    Published("marenostrum4_caffe", 400, 8000, 19047, "check",
              "batch not published: 20 per node, the whole per-node batch nearest 8K"),
    Published("marenostrum4_caffe", 512, 8192, 24240, "check",
              "74% top-1 in 44 min; batch 8192 assumed (16 per node)"),
    Published("stampede2_tf_horovod", 256, 256 * 2 * 64, 16400, "calibration",
              "TF 1.x + Horovod + Intel MPI, 81% efficiency, 64 images per worker"),
    Published("stampede2_tf_horovod", 512, 512 * 2 * 64, 26700, "check",
              "64 images per worker, 2 workers per node"),
)
PUBLISHED_EFFICIENCY = {"marenostrum4_caffe": 0.90, "stampede2_tf_horovod": 0.81}

OMNIPATH_BYTES_PER_SEC = 100e9 / 8  # 100 Gb/s per port (BSC MN4 and TACC Stampede2 pages)
# Intel Caffe/MLSL reduces every parameter blob on its own; Horovod 0.1x negotiated every
# gradient tensor with rank 0 and reduced what was ready each 5 ms cycle (<= 64 MiB fused).
RESNET50_TENSORS = _RN50["tensors"]


def _template(name: str) -> System:
    if name == "marenostrum4_caffe":
        return System(name, node_images_per_sec=0.0, ranks_per_node=1,
                      link_bytes_per_sec=OMNIPATH_BYTES_PER_SEC, latency_sec=0.0,
                      messages_per_step=RESNET50_TENSORS, overlap=1.0)
    return System(name, node_images_per_sec=0.0, ranks_per_node=2,
                  link_bytes_per_sec=OMNIPATH_BYTES_PER_SEC, latency_sec=0.0,
                  messages_per_step=RESNET50_TENSORS, overlap=1.0)


def calibrated_2018() -> dict[str, System]:
    """Both 2018 systems, calibrated on their 256-node points only (see docs/scaling.md).

    R = published 256-node throughput / (256 x published efficiency). MareNostrum 4's
    alpha is what remains of the 256-node step after compute; Stampede2 shares the fabric
    (Omni-Path) and so alpha, and its remaining 256-node time gives gamma.
    """
    cal = {p.system: p for p in PUBLISHED if p.role == "calibration"}
    out = {}
    for name, field in (("marenostrum4_caffe", "latency_sec"),
                        ("stampede2_tf_horovod", "coordination_sec_per_rank")):
        p = cal[name]
        rate = p.images_per_sec / (p.nodes * PUBLISHED_EFFICIENCY[name])
        system = dataclasses.replace(_template(name), node_images_per_sec=rate)
        if field == "coordination_sec_per_rank":
            system = dataclasses.replace(system,
                                         latency_sec=out["marenostrum4_caffe"].latency_sec)
        out[name] = solve_linear(system, field, p.nodes, p.global_batch, p.images_per_sec)
    return out


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


def check_published(systems: dict[str, System] | None = None) -> list[dict]:
    """Each published point with the model's prediction and its error in percent."""
    systems = systems or calibrated_2018()
    rows = []
    for p in PUBLISHED:
        s = step(systems[p.system], p.nodes, p.global_batch)
        rows.append({"system": p.system, "nodes": p.nodes, "global_batch": p.global_batch,
                     "published": p.images_per_sec, "predicted": round(s.images_per_sec, 1),
                     "error_pct": round(100 * (s.images_per_sec / p.images_per_sec - 1), 2),
                     "efficiency": round(s.efficiency, 4), "role": p.role})
    return rows


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


def format_check(rows: Sequence[dict], systems: dict[str, System]) -> str:
    lines = ["Calibrated (on the 256-node points only):"]
    for s in systems.values():
        lines.append(f"  {s.name}: R={s.node_images_per_sec:.2f} img/s/node, "
                     f"alpha={s.latency_sec * 1e6:.3f} us, "
                     f"gamma={s.coordination_sec_per_rank * 1e6:.1f} us/rank")
    lines.append(f"\n{'system':<22} {'nodes':>5} {'batch':>6} {'published':>9} "
                 f"{'predicted':>9} {'error':>7} {'eff':>6}  role")
    for r in rows:
        lines.append(f"{r['system']:<22} {r['nodes']:>5} {r['global_batch']:>6} "
                     f"{r['published']:>9.0f} {r['predicted']:>9.0f} {r['error_pct']:>+6.1f}% "
                     f"{r['efficiency']:>6.1%}  {r['role']}")
    lines.append("\nIndependent check, Dell EMC Zenith (Intel Caffe, Omni-Path), efficiency "
                 "relative to 128 nodes:")
    for z in check_zenith(systems["marenostrum4_caffe"]):
        lines.append(f"  {z['nodes']} nodes ({z['per_node_batch']:g}/node): published "
                     f"{z['published']:.3f}, predicted {z['predicted']:.3f}")
    return "\n".join(lines)


def plot_published(rows: Sequence[dict], systems: dict[str, System], path: str) -> None:
    """Predicted throughput against nodes for both systems, published points on top."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=90)
    batches = {"marenostrum4_caffe": (lambda n: 8192, "global batch 8192"),
               "stampede2_tf_horovod": (lambda n: n * 128, "128 per node")}
    for (name, system), color, dy in zip(systems.items(), ("tab:blue", "tab:orange"), (-14, 6)):
        nodes = list(range(16, 1025, 8))
        batch, label = batches[name]
        ax.plot(nodes, [step(system, n, batch(n)).images_per_sec for n in nodes],
                color=color, label=f"model: {name}, {label}")
        ax.plot(nodes, [n * system.node_images_per_sec for n in nodes], color=color, lw=0.6,
                ls=":", label="N x R (linear)" if color == "tab:orange" else None)
        for r in (r for r in rows if r["system"] == name):
            marker = "s" if r["role"] == "calibration" else "o"
            ax.plot(r["nodes"], r["published"], marker, color=color, mfc="none", ms=8)
            ax.annotate(f"{r['error_pct']:+.1f}%", (r["nodes"], r["published"]),
                        textcoords="offset points", xytext=(8, dy), fontsize=8, color=color)
    ax.set_xlabel("nodes (2S Xeon Platinum 8160, Omni-Path)")
    ax.set_ylabel("images / s")
    ax.set_title("ResNet-50 scaling model vs 2018 (square: calibration, circle: check)",
                 fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
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
    flags.DEFINE_boolean("check_published", False, "Print the model against the five "
                         "published 2018 points and a SUMMARY json line.", flag_values=fv)
    flags.DEFINE_string("plot", None, "With --check_published: write this PNG.", flag_values=fv)
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
        rows = check_published(systems)
        print(format_check(rows, systems))
        if fv.plot:
            plot_published(rows, systems, fv.plot)
            print(f"wrote {fv.plot}")
        summary = [{k: r[k] for k in ("system", "nodes", "published", "predicted", "error_pct",
                                      "role")} for r in rows]
        print("SUMMARY " + json.dumps({"points": summary,
                                       "max_abs_error_pct": max(abs(r["error_pct"])
                                                                for r in rows)}))
        return
    if fv.plot:
        sys.exit("scaling: error: --plot needs --check_published")
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
