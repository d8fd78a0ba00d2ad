"""``mnn generate``: sample text from a GPT or LSTM checkpoint, one character at a time."""
import numpy

from . import backend
from .checkpoint import load_checkpoint
from .data.text import CharTokenizer, newlines
from .layers.embedding import EmbeddingLayer
from .layers.softmax import softmax
from .optim import COUNT, NON_NEGATIVE, POSITIVE_COUNT, require
from .seq_layers import walk
from .tasks import evaluating


def next_token_probabilities(logits, temperature, top_k):
    """Softmax of logits / temperature, keeping only the top k (all when k is 0).

    Temperature 0 is the limit: all probability on the likeliest token (greedy decoding)."""
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = numpy.asarray(logits, dtype=numpy.float64)
    if not numpy.isfinite(logits).all():
        raise ValueError("the model's scores for the next character are not all finite numbers: its weights "
                         "overflowed in training (train it again with a lower --lr)")
    if temperature == 0:
        return numpy.eye(len(logits))[numpy.argmax(logits)]
    with numpy.errstate(over="ignore"):  # the largest is 0; a tiny temperature sends the others to -inf
        logits = (logits - logits.max()) / temperature
    if 0 < top_k < len(logits):
        logits[logits < numpy.sort(logits)[-top_k]] = -numpy.inf
    return softmax(logits)


def generate(net, tokenizer, prompt, tokens, context, temperature=0.8, top_k=0, seed=0, on_text=None):
    """``prompt`` followed by ``tokens`` sampled characters; the same seed gives the same text.

    Each character is predicted from the last ``context`` characters, as the model saw text in
    training (the LSTM too: every window from a zero state).

    ``prompt`` None starts from a newline, or from the vocabulary's first character where the text
    had no newline. ``on_text``, if given, receives the prompt and then each character as it is sampled."""
    check_sampling(prompt, tokens, context, temperature, top_k, seed)
    if prompt is None:
        prompt = "\n" if "\n" in tokenizer.index else tokenizer.chars[0]
    prompt = newlines(prompt)  # as the text trained on has them
    ids = list(tokenizer.encode(prompt))
    if not ids:
        raise ValueError("the prompt must hold at least one character")
    for _, layer in walk(net):
        if isinstance(layer, EmbeddingLayer):  # told before its range check would speak of token indices
            check_vocabulary(layer.num_embeddings, tokenizer)
            break
    rng = numpy.random.default_rng(seed)
    emit = on_text or (lambda text: None)
    emit(prompt)
    with evaluating(net):
        for _ in range(tokens):
            window = backend.to_device(numpy.array(ids[-context:])[None])
            logits = backend.to_numpy(net(window)[0, -1])
            check_vocabulary(len(logits), tokenizer)
            ids.append(int(rng.choice(len(tokenizer), p=next_token_probabilities(logits, temperature, top_k))))
            emit(tokenizer.decode(ids[-1:]))
    return tokenizer.decode(ids)


def check_vocabulary(size, tokenizer):
    if size != len(tokenizer):
        raise ValueError(f"the network knows {size} tokens and the tokenizer has {len(tokenizer)}: generate with "
                         "the tokenizer of the text the network was trained on")


def check_sampling(prompt, tokens, context, temperature, top_k, seed):
    """The checks ``mnn generate``'s flags get, for callers of ``generate`` from Python (``seed`` None:
    fresh randomness)."""
    if prompt is not None and not isinstance(prompt, str):
        raise TypeError(f"generate: prompt must be a string or None, got {type(prompt).__name__}")
    require("generate", "tokens", tokens, COUNT)
    require("generate", "context", context, POSITIVE_COUNT)
    require("generate", "temperature", temperature, NON_NEGATIVE)
    require("generate", "top_k", top_k, COUNT)
    if seed is not None:
        require("generate", "seed", seed, COUNT)


def generate_from_checkpoint(path, prompt=None, tokens=500, temperature=0.8, top_k=0, seed=0, on_text=None):
    net, document = load_checkpoint(path)
    if "vocab" not in document:
        raise ValueError(f"{path}: not a text model's checkpoint (no vocabulary stored; mnn generate samples "
                         "from a gpt or lstm run)")
    context = document["architecture"]["kwargs"]["context"]
    return generate(net, CharTokenizer(document["vocab"]), prompt, tokens, context, temperature, top_k, seed, on_text)
