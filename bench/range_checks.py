"""What the range checks of class labels and token indices cost a step, where reading their
result back waits for the device: ``python -m bench``'s measure, as shipped, then with the loss's
label check and the embedding's index check taken out (an experiment: mnn keeps both checks).

    python -m bench.range_checks --device cuda
"""
import argparse

from mnn.arguments import integer
from mnn.layers import embedding, losses

from .device import Device
from .run import CASES, measure

MODELS = ["gpt-12", "cnn-128", "mlp-64", "gpt-nano"]


def unchecked_embedding_forward(self, indices):
    self.save(indices)
    return self.params["weight"][indices]  # EmbeddingLayer's Eq. (1), without the range check


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.range_checks", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=integer(1), default=20)
    args = parser.parse_args(argv)
    device, names = Device(args.device), args.models.split(",")
    shipped = {name: measure(CASES[name], args.repeats, 2, device) for name in names}
    losses.check_in_range = lambda *args: None
    embedding.EmbeddingLayer.forward = unchecked_embedding_forward
    unchecked = {name: measure(CASES[name], args.repeats, 2, device) for name in names}
    print("| case | mnn ms, checked | mnn ms, unchecked | torch ms (both runs) |")
    print("|---|---|---|---|")
    for name in names:
        a, b = shipped[name], unchecked[name]
        print(f"| {name} | {a['mnn_ms']:.2f} | {b['mnn_ms']:.2f} | {a['torch_ms']:.2f}, {b['torch_ms']:.2f} |")


if __name__ == "__main__":
    main()
