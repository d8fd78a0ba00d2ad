"""Data-parallel scaling: mnn on MPI against PyTorch DistributedDataParallel (gloo), N ranks each.

    python -m bench.scaling                          # N = 1, 2, the CNN and the GPT, one thread per rank
    python -m bench.scaling --ranks 1,2,4,8 --steps 30 --json bench/scaling.json

Weak scaling: every rank trains on its own batch of the size ``bench.run`` uses (CNN 128,
GPT 12 windows of 64), so the global batch grows with N. Each rank runs one BLAS/OpenMP
thread. mnn runs as ``mpiexec -n N`` (its data-parallel training step: all-reduce of the
flat gradient buffer, the loss's mean and the stop flag, as ``mnn.train`` does); torch as N
processes under DistributedDataParallel with the gloo backend, on the same model and
weights. Reported: samples per second (median step time, the slowest rank's) and the
parallel efficiency, throughput(N) / (N x throughput(1)); and, for mnn, the time of one
all-reduce of the gradient buffer alone.
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy

from mnn.arguments import integer

from .run import CASES, TINY, cpu_name, make_batch

MODELS = {"cnn": "cnn-128", "gpt": "gpt-12"}
REPOSITORY = Path(__file__).resolve().parent.parent


def worker_mnn(case, steps, warmup):
    """One rank of mnn's data-parallel step; rank 0 returns the timings."""
    from mnn import backend, distributed, models, optim
    from mnn.train import join

    ranks = distributed.connect()
    backend.tune_cpu(1)
    backend.seed(0)
    net = models.build(case["model"])
    net.input_grad = False
    flat = net.flatten()
    join(ranks, net, flat)
    net.optimizer = optim.AdamW(net, lr=1e-4)
    x, y = make_batch(case, numpy.random.default_rng(ranks.rank + 1))

    def step():
        net.zero_grads()
        loss = net(x, y)
        net.backward()
        ranks.average(flat.grads.values())
        ranks.mean(float(loss))
        ranks.any(False)
        net.step()

    times = timed_steps(step, steps, warmup, barrier=lambda: ranks.any(False))
    allreduce = timed_steps(lambda: ranks.average(flat.grads.values()), steps, 2, barrier=lambda: ranks.any(False))
    return {"step_s": times, "allreduce_s": allreduce, "gradient_bytes": int(flat.size * 4)} if ranks.is_root else None


def worker_torch(case, steps, warmup):
    """One rank of torch DistributedDataParallel (gloo); rank 0 returns the timings."""
    import torch
    import torch.distributed as dist

    from mnn import backend, models

    from .torch_mirror import mirror

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    backend.seed(0)
    model, loss_fn, _ = mirror(models.build(case["model"]))
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = map(torch.tensor, make_batch(case, numpy.random.default_rng(dist.get_rank() + 1)))
    stop = torch.zeros(1)

    def step():
        optimizer.zero_grad(set_to_none=False)
        loss = loss_fn(model(x), y)
        loss.backward()
        dist.all_reduce(loss.detach())  # as mnn's step: the mean loss and the stop flag
        dist.all_reduce(stop)
        optimizer.step()

    times = timed_steps(step, steps, warmup, barrier=dist.barrier)
    rank = dist.get_rank()
    dist.barrier()  # no rank leaves while another still talks to it (gloo aborted at exit without this)
    dist.destroy_process_group()
    return {"step_s": times} if rank == 0 else None


def timed_steps(step, steps, warmup, barrier):
    """Median seconds per step: every rank starts each step together, so rank 0 waits for the slowest."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        barrier()
        started = time.perf_counter()
        step()
        barrier()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def launch(framework, model, ranks, args):
    """Run ``ranks`` workers of ``framework`` and return rank 0's result."""
    worker = [sys.executable, "-m", "bench.scaling", "--worker", framework, "--models", model,
              "--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--tiny"] if args.tiny else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if framework == "mnn":
        commands = [[str(Path(sys.executable).parent / "mpiexec"), "-n", str(ranks), *worker]]
        envs = [env]
    else:
        port = free_port()
        commands = [worker] * ranks
        envs = [{**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                 "WORLD_SIZE": str(ranks)} for rank in range(ranks)]
    processes = [subprocess.Popen(command, env=e, cwd=REPOSITORY, stdout=subprocess.PIPE, text=True)
                 for command, e in zip(commands, envs)]
    outputs = [process.communicate(timeout=1800)[0] for process in processes]
    failed = [process.returncode for process in processes if process.returncode]
    if failed:
        raise RuntimeError(f"{framework} on {ranks} ranks failed (exit {failed[0]})")
    lines = [line for output in outputs for line in output.splitlines() if line.startswith("{")]
    return json.loads(lines[0])


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scaling(args):
    cases = TINY if args.tiny else CASES
    results = {}
    for model in args.models.split(","):
        rows = []
        for ranks in args.ranks:
            row = {"ranks": ranks}
            for framework in ("mnn", "torch"):
                measured = launch(framework, model, ranks, args)
                batch = cases[MODELS[model]]["batch"] * ranks
                row[f"{framework}_samples_per_s"] = batch / measured["step_s"]
                row.update({f"{framework}_{key}": value for key, value in measured.items()})
            rows.append(row)
        for row in rows:
            for framework in ("mnn", "torch"):
                single = rows[0][f"{framework}_samples_per_s"] / rows[0]["ranks"]
                row[f"{framework}_efficiency"] = row[f"{framework}_samples_per_s"] / (row["ranks"] * single)
        results[model] = rows
    return results


def table(results):
    lines = [f"{cpu_name()}, {os.cpu_count()} cores, one thread per rank; per-rank batch: CNN "
             f"{CASES['cnn-128']['batch']}, GPT {CASES['gpt-12']['batch']}", "",
             "| model | ranks | mnn samples/s | mnn efficiency | torch DDP samples/s | torch efficiency "
             "| mnn all-reduce ms (MB) |", "|---|---|---|---|---|---|---|"]
    for model, rows in results.items():
        for r in rows:
            lines.append(f"| {model} | {r['ranks']} | {r['mnn_samples_per_s']:.0f} | {100 * r['mnn_efficiency']:.0f}% "
                         f"| {r['torch_samples_per_s']:.0f} | {100 * r['torch_efficiency']:.0f}% "
                         f"| {1e3 * r['mnn_allreduce_s']:.2f} ({r['mnn_gradient_bytes'] / 1e6:.1f}) |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2", help="comma-separated rank counts, the first the baseline")
    parser.add_argument("--models", default="cnn,gpt", help="comma-separated, from cnn, gpt")
    parser.add_argument("--steps", type=integer(1), default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=integer(0), default=3)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--tiny", action="store_true", help="tiny models: checks that everything runs (not timed)")
    parser.add_argument("--worker", choices=["mnn", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        parser.error(f"argument --models: no model {', '.join(map(repr, unknown))}; choose from cnn, gpt")
    if args.worker:
        case = (TINY if args.tiny else CASES)[MODELS[args.models]]
        result = (worker_mnn if args.worker == "mnn" else worker_torch)(case, args.steps, args.warmup)
        if result is not None:
            print(json.dumps(result))
        return 0
    try:
        args.ranks = [int(n) for n in args.ranks.split(",")]
        assert args.ranks and min(args.ranks) >= 1
    except (ValueError, AssertionError):
        parser.error(f"argument --ranks: expected positive integers separated by commas, got {args.ranks!r}")
    results = scaling(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_name(), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
