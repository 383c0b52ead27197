"""Launch one measured training job (no launcher, horovodrun --gloo, or mpirun) and read it back.

A job runs resnet_main's train step (DistributedTrainer, synthetic images; ResNet-50 unless
the job names densenet121) on every rank: warm-up steps, a barrier, then `steps` timed
steps. Each rank measures its own wall and CPU seconds over the timed steps only (start-up
and tracing excluded; Horovod's background thread and Gloo/MPI threads are in the rank's
process, so their CPU time counts). Rank 0 prints one `RESULT {json}` line, which
`run_job` returns as a dict.

    python -m bench.hvd_jobs --job '{"ranks": 1, "intra": 1, ...}'   (what run_job starts)
"""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOCAL_RANK_VARS = ("HOROVOD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


@dataclasses.dataclass(frozen=True)
class Job:
    """One configuration. launcher: none | gloo | mpi; env goes to every rank."""
    ranks: int = 1
    intra: int = 1  # TF intra-op threads per rank (0: TF's default, all cores)
    inter: int = 0  # TF inter-op threads per rank (0: TF's default)
    launcher: str = "none"
    pin: bool = False  # bind rank i to core i (sched_setaffinity before TF starts)
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    image_size: int = 128
    global_batch: int = 32
    steps: int = 3
    warmup: int = 1
    precision: str = "float32"
    overlap: bool = False  # per-tensor allreduce as each gradient is ready (see worker)
    timeline: str = ""  # Horovod timeline of the timed steps only, written by rank 0
    architecture: str = "resnet"  # resnet (ResNet-50) or densenet121
    sync_bn: bool = False  # resnet_main's --sync_bn


def command(job: Job) -> list:
    """The command line that starts `job`."""
    worker = [sys.executable, "-m", "bench.hvd_jobs", "--job", json.dumps(dataclasses.asdict(job))]
    if job.launcher == "none":
        if job.ranks != 1:
            raise ValueError("launcher 'none' runs one rank")
        return worker
    if job.launcher == "gloo":
        return [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "-np",
                str(job.ranks), "--gloo", *worker]
    if job.launcher == "mpi":
        passthrough = []
        for var in ["PYTHONPATH", "TF_CPP_MIN_LOG_LEVEL", "PATH", *job.env,
                    *(["HOROVOD_TIMELINE"] if job.timeline else [])]:
            passthrough += ["-x", var]
        return [shutil.which("mpirun") or "mpirun", "--allow-run-as-root", "--oversubscribe",
                "-np", str(job.ranks), *passthrough, "--bind-to", "none", *worker]
    raise ValueError(f"unknown launcher {job.launcher!r}")


def run_job(job: Job, timeout: float = 900) -> dict:
    """Starts the job, waits, returns rank 0's RESULT (plus the launcher's wall seconds)."""
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2",
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               OMPI_MCA_btl_vader_single_copy_mechanism="none", **job.env)
    if job.timeline:
        env["HOROVOD_TIMELINE"] = "DYNAMIC"  # started and stopped around the timed steps
    t0 = time.perf_counter()
    proc = subprocess.run(command(job), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if "RESULT " in l]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"job {job} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n"
                           f"{proc.stderr[-3000:]}")
    result = json.loads(lines[-1].split("RESULT ", 1)[1])
    result["job_seconds"] = time.perf_counter() - t0
    return result



def run_rounds(jobs: dict, rounds: int, width: int, describe, add=None) -> dict:
    """Runs every job once a round, the jobs in turn (interleaved, so that load from other
    work hits them alike); `add(job, result)` may add to a result before it is kept. Prints
    'round R NAME' and describe(result) a run; returns name: [results]."""
    results = {name: [] for name in jobs}
    for r in range(rounds):
        for name, job in jobs.items():
            res = run_job(job)
            if add:
                add(job, res)
            results[name].append(res)
            print(f"round {r + 1} {name:<{width}} {describe(res)}", flush=True)
    return results

# ---------------------------------------------------------------- inside each rank
def _per_tensor_allreduce(grads, context, fp16_compression=False):
    """One allreduce op per gradient: each starts when its gradient exists, so Horovod can
    reduce (and fuse, per cycle) the late layers' gradients while the early layers' are
    still being computed."""
    if context.size == 1:
        return list(grads)
    import horovod.tensorflow as hvd
    compression = hvd.Compression.fp16 if fp16_compression else hvd.Compression.none
    return [None if g is None else hvd.allreduce(g, op=hvd.Average, compression=compression)
            for g in grads]


def worker(job: Job) -> dict | None:
    local_rank = next((int(os.environ[v]) for v in LOCAL_RANK_VARS if v in os.environ), 0)
    if job.pin:
        os.sched_setaffinity(0, {local_rank % os.cpu_count()})
    import keras
    import numpy as np
    import tensorflow as tf
    if job.intra:
        tf.config.threading.set_intra_op_parallelism_threads(job.intra)
    if job.inter:
        tf.config.threading.set_inter_op_parallelism_threads(job.inter)
    keras.mixed_precision.set_global_policy(
        "mixed_bfloat16" if job.precision == "bfloat16" else "float32")
    from bench.common import cpu_seconds
    from hooks.distributed import horovod_glue
    from imagenet import input_pipeline, models

    context = horovod_glue.init() if job.launcher != "none" else horovod_glue.Context()
    if job.overlap:
        horovod_glue.allreduce_gradients = _per_tensor_allreduce
    net = models.build_classifier(job.architecture, 1000, job.image_size, depth=50,
                                  weight_decay=1e-4, sync_bn=job.sync_bn)
    trainer = horovod_glue.DistributedTrainer(
        net, context, metrics=[keras.metrics.SparseCategoricalAccuracy(name="top_1")])
    trainer.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    jit_compile=False)
    horovod_glue.build_and_broadcast(net, trainer.optimizer, context)
    dtype = tf.bfloat16 if job.precision == "bfloat16" else tf.float32
    data = input_pipeline.synthetic_dataset(per_rank_batch=job.global_batch // context.size,
                                            image_size=job.image_size, num_classes=1000,
                                            dtype=dtype)
    trainer.fit(data, steps_per_epoch=job.warmup, epochs=1, verbose=0)
    horovod_glue.allreduce_sum([np.zeros(1)], context)  # barrier
    if job.timeline:
        import horovod.tensorflow as hvd
        hvd.start_timeline(job.timeline)
    wall, cpu = time.perf_counter(), cpu_seconds()
    trainer.fit(data, steps_per_epoch=job.steps, epochs=1, verbose=0)
    mine = np.array([[time.perf_counter() - wall, cpu_seconds() - cpu]])
    if job.timeline:
        hvd.stop_timeline()
    every = horovod_glue.allgather(mine, context)
    if not context.is_chief:
        return None
    images = job.global_batch * job.steps
    wall_s, cpu_s = float(every[:, 0].max()), float(every[:, 1].sum())
    return {"images": images, "wall_s": wall_s, "cpu_s": cpu_s, "ranks": context.size,
            "images_per_sec": images / wall_s, "images_per_cpu_sec": images / cpu_s,
            "cpu_utilisation": cpu_s / (wall_s * os.cpu_count()),
            "per_rank_cpu_s": every[:, 1].tolist()}


def main():
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="a Job as JSON")
    job = Job(**json.loads(parser.parse_args().job))
    result = worker(job)
    if result is not None:
        print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    from hooks import entry

    entry.quiet_startup()  # before TensorFlow is imported
    main()
