"""Where an mnn training step's time goes: each kind of layer's forward and backward, and the optimizer.

    python -m bench.profile                                   # the CPU cases of python -m bench
    python -m bench.profile --models gpt-nano --device cuda --steps 10 --json profile.json

Every layer's ``forward`` and ``backward`` is timed with the device synchronised before and
after, and each is charged its own time: a composite layer (an attention, a residual block)
only what its sub-layers' calls do not account for. On a GPU those waits take away the
overlap of the Python that queues one layer's launches with the device's work on the last
one, so the table's sum exceeds the step; it says which layers hold the device, and the
step timed whole, without the waits, is printed beside it.
"""
import argparse
import json
import time
from collections import defaultdict

import numpy

from mnn import backend, models, optim
from mnn.arguments import integer

from .device import Device
from .run import CASES, GPU_SIZES, TINY, make_batch


class LayerClock:
    """Times every layer of a network, forward and backward, charging each its own time."""

    def __init__(self, sync, now=time.perf_counter):
        self.sync, self.now = sync, now
        self.seconds = defaultdict(float)  # (layer class, "forward" or "backward") -> own seconds
        self.calls = defaultdict(int)
        self.children = []  # a stack: the time the calls in progress have spent in timed calls within them

    def watch(self, layer):
        """Wrap ``layer``'s and its sub-layers' forward and backward (on the instances)."""
        for sub in getattr(layer, "sublayers", dict)().values():
            self.watch(sub)
        for what in ("forward", "backward"):
            setattr(layer, what, self.timed(getattr(layer, what), (type(layer).__name__, what)))

    def timed(self, method, key):
        def call(*args, **kwargs):
            self.sync()
            self.children.append(0.0)
            started = self.now()
            try:
                return method(*args, **kwargs)
            finally:
                self.sync()
                elapsed = self.now() - started
                self.seconds[key] += elapsed - self.children.pop()
                self.calls[key] += 1
                if self.children:
                    self.children[-1] += elapsed
        return call


def training_step(net, batch, clock=None):
    """One step; with a clock, the zeroing of the gradients and the optimizer's update timed apart."""
    zero_grads, step = (net.zero_grads, net.step) if clock is None else (
        clock.timed(net.zero_grads, ("optimizer", "zero_grads")), clock.timed(net.step, ("optimizer", "step")))
    zero_grads()
    net(*batch)
    net.backward()
    step()


def profile(case, device, steps, warmup):
    """({(layer class, part): ms per step}, the step's ms timed whole) for one case."""
    backend.seed(0)
    net = models.build(case["model"])
    net.input_grad = False
    net.optimizer = optim.AdamW(net, lr=1e-4)
    net.flatten()  # as python -m bench and mnn train
    batch = tuple(map(device.mnn_array, make_batch(case, numpy.random.default_rng(0))))
    for _ in range(warmup):
        training_step(net, batch)
    device.sync_mnn()
    started = time.perf_counter()
    for _ in range(steps):
        training_step(net, batch)
    device.sync_mnn()
    whole_ms = (time.perf_counter() - started) / steps * 1e3
    clock = LayerClock(device.sync_mnn)
    clock.watch(net)
    for _ in range(steps):
        training_step(net, batch, clock)
    return {key: seconds / steps * 1e3 for key, seconds in clock.seconds.items()}, whole_ms


def table(name, parts, whole_ms):
    total = sum(parts.values())
    lines = [f"\n{name}: step {whole_ms:.2f} ms timed whole; {total:.2f} ms in the parts below, each timed alone",
             "| layer | part | ms per step | share |", "|---|---|---|---|"]
    for (layer, part), ms in sorted(parts.items(), key=lambda item: -item[1]):
        lines.append(f"| {layer} | {part} | {ms:.3f} | {ms / total:.1%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help=f"comma-separated, from {', '.join(CASES)}")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=integer(1), default=10, help="steps timed, whole and by parts (10)")
    parser.add_argument("--warmup", type=integer(0), default=3, help="untimed steps first (3)")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: checks that it runs")
    parser.add_argument("--json", default=None, help="also write the times here")
    args = parser.parse_args(argv)
    cases = TINY if args.tiny else CASES
    default = [name for name in cases if args.device == "cuda" or name not in GPU_SIZES]
    names = args.models.split(",") if args.models else default
    unknown = [name for name in names if name not in cases]
    if unknown:
        parser.error(f"--models: unknown {', '.join(unknown)}; expected some of {', '.join(cases)}")
    if args.device == "cpu":
        backend.tune_cpu()
    device, results = Device(args.device), {}
    try:
        for name in names:
            parts, whole_ms = profile(cases[name], device, args.steps, args.warmup)
            print(table(name, parts, whole_ms), flush=True)
            results[name] = {"step_ms": whole_ms,
                             "parts_ms": {f"{layer}.{part}": ms for (layer, part), ms in parts.items()}}
    finally:
        device.close()
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"device": device.describe(), "results": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
