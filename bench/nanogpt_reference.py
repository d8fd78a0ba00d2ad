"""nanoGPT's small CPU run, rebuilt in plain PyTorch, as an independent yardstick for the GPT.

    python -m bench.nanogpt_reference --seeds 1337 1338 1339
    python -m bench.nanogpt_reference --set bias=1 weight_decay=0 --device cuda   # a variant, on a GPU
    python -m bench.nanogpt_reference --preset gpu --device cuda   # nanoGPT's GPU run (6 x 384, dropout 0.2)

nanoGPT's README trains Tiny Shakespeare on a CPU with
``config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
--log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
--max_iters=2000 --lr_decay_iters=2000 --dropout=0.0``. This file follows that run as
nanoGPT's ``train.py`` and ``model.py`` do it, written independently of mnn and of
``bench/torch_mirror.py``: torch's own RNG for weights and batches, exact GELU, nanoGPT's
warm-up formula, its weight-decay groups, and its noisy 20-batch ``estimate_loss``.
It also reports the loss over the whole validation split, so the two estimates can be
compared. ``--set`` changes one setting of CONFIG (the settings the issue leaves open:
warm-up, final learning rate, betas, weight decay, clipping, biases, weight tying).
``--preset gpu`` starts from nanoGPT's own ``config/train_shakespeare_char.py`` instead (6 layers,
6 heads, width 384, context 256, batch 64, dropout 0.2, 5000 iterations, 200-batch estimates);
dropout sits where nanoGPT's ``model.py`` puts it: the embeddings' sum, the attention weights,
and each residual branch's output.
mnn never imports this file; only torch does the work here.
"""
import argparse
import math
import time
from pathlib import Path

import numpy
import torch
from torch import nn
from torch.nn import functional as F

CONFIG = {"layers": 4, "heads": 4, "width": 128, "context": 64, "batch": 12, "iters": 2000,
          "lr": 1e-3, "min_lr": 1e-4, "warmup": 100, "beta2": 0.99, "weight_decay": 0.1, "clip": 1.0,
          "eval_interval": 250, "eval_iters": 20, "bias": 0, "tie": 1, "dropout": 0.0}
PRESETS = {"cpu": {}, "gpu": {"layers": 6, "heads": 6, "width": 384, "context": 256, "batch": 64, "iters": 5000,
                              "eval_iters": 200, "dropout": 0.2}}


class Block(nn.Module):
    def __init__(self, width, heads, bias, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1 = nn.LayerNorm(width, bias=bias)
        self.c_attn = nn.Linear(width, 3 * width, bias=bias)
        self.attn_proj = nn.Linear(width, width, bias=bias)
        self.ln_2 = nn.LayerNorm(width, bias=bias)
        self.c_fc = nn.Linear(width, 4 * width, bias=bias)
        self.mlp_proj = nn.Linear(4 * width, width, bias=bias)

    def attention(self, x):
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(batch, length, width))

    def forward(self, x):
        x = x + F.dropout(self.attention(self.ln_1(x)), self.dropout, self.training)
        return x + F.dropout(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))), self.dropout, self.training)


class GPT(nn.Module):
    def __init__(self, vocab, config):
        super().__init__()
        width, bias = config["width"], bool(config["bias"])
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(config["context"], width)
        self.dropout = config["dropout"]
        self.blocks = nn.ModuleList(Block(width, config["heads"], bias, self.dropout) for _ in range(config["layers"]))
        self.ln_f = nn.LayerNorm(width, bias=bias)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        if config["tie"]:
            self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config["layers"]))

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        x = F.dropout(x, self.dropout, self.training)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))


def learning_rate(it, c):
    if it < c["warmup"]:
        return c["lr"] * (it + 1) / (c["warmup"] + 1)
    ratio = (it - c["warmup"]) / (c["iters"] - c["warmup"])
    return c["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (c["lr"] - c["min_lr"])


def get_batch(data, c):
    ix = torch.randint(len(data) - c["context"], (c["batch"],))
    x = torch.stack([torch.from_numpy(data[i:i + c["context"]].astype(numpy.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + c["context"]].astype(numpy.int64)) for i in ix])
    return x.to(c["device"]), y.to(c["device"])


@torch.no_grad()
def estimate_loss(model, splits, c):
    model.eval()
    out = {name: float(torch.stack([model(*get_batch(data, c)) for _ in range(c["eval_iters"])]).mean())
           for name, data in splits.items()}
    model.train()
    return out


@torch.no_grad()
def whole_split_loss(model, data, context):
    """Mean loss over every non-overlapping window of the split and a last, shorter one (as mnn's
    ``TextTask.evaluate``: every character after the split's first predicted once)."""
    model.eval()
    count, rest = divmod(len(data) - 1, context)
    device = next(model.parameters()).device
    x = torch.from_numpy(data[:count * context].astype(numpy.int64)).view(count, context).to(device)
    y = torch.from_numpy(data[1:count * context + 1].astype(numpy.int64)).view(count, context).to(device)
    losses = [float(model(x[i:i + 256], y[i:i + 256])) * len(x[i:i + 256]) * context for i in range(0, count, 256)]
    if rest:
        tail = torch.from_numpy(data[count * context:].astype(numpy.int64)).to(device)
        losses.append(float(model(tail[None, :-1], tail[None, 1:])) * rest)
    return sum(losses) / (count * context + rest)


def optimizer_for(model, c):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": c["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=c["lr"], betas=(0.9, c["beta2"]))


def train(text, seed, c=CONFIG):
    chars = sorted(set(text))
    index = {ch: i for i, ch in enumerate(chars)}
    data = numpy.array([index[ch] for ch in text], dtype=numpy.uint16)
    split = int(0.9 * len(data))
    splits = {"train": data[:split], "val": data[split:]}
    torch.manual_seed(seed)
    model = GPT(len(chars), c).to(c["device"])
    optimizer = optimizer_for(model, c)
    x, y = get_batch(splits["train"], c)
    for it in range(c["iters"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, c)
        if it % c["eval_interval"] == 0:
            losses = estimate_loss(model, splits, c)
            print(f"{c['label']}seed {seed} step {it}: train {losses['train']:.4f}, val {losses['val']:.4f}",
                  flush=True)
        if it == c["iters"]:
            break
        loss = model(x, y)
        x, y = get_batch(splits["train"], c)
        loss.backward()
        if c["clip"]:
            torch.nn.utils.clip_grad_norm_(model.parameters(), c["clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return losses["val"], whole_split_loss(model, splits["val"], c["context"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", default=str(Path(__file__).parents[1] / "src/mnn/data/tinyshakespeare.txt"),
                        help="the corpus (default: the Tiny Shakespeare shipped in mnn)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu",
                        help="cpu: nanoGPT's README CPU run (the default); gpu: its train_shakespeare_char.py")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help=f"change CONFIG: {sorted(CONFIG)}")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (float32: TF32 off)")
    args = parser.parse_args()
    changes = dict(item.split("=") for item in args.set)
    if set(changes) - set(CONFIG):
        parser.error(f"unknown settings {sorted(set(changes) - set(CONFIG))}; known: {sorted(CONFIG)}")
    changes = {key: type(CONFIG[key])(float(value)) for key, value in changes.items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    config = {**CONFIG, **PRESETS[args.preset], **changes, "device": args.device,
              "label": " ".join(args.set) + (": " if args.set else "")}
    text = Path(args.text).read_text(encoding="utf-8")
    for seed in args.seeds:
        start = time.perf_counter()
        estimate, whole = train(text, seed, config)
        print(f"{config['label']}seed {seed}: val loss {estimate:.4f} (nanoGPT's {config['eval_iters']}-batch estimate), "
              f"{whole:.4f} (whole validation split), {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
