"""The residual stream of a freshly initialised SeqLM, layer by layer, for every registered mixer.

    python benchmarks/init_scale.py                        # d 64, 4 layers, default block, V 8192
    python benchmarks/init_scale.py --d-model 128 --no-mlp --n-layers 2

Prints one Markdown table: for each mixer, the RMS of the embedding output and of the residual stream
after each block, and the largest block update (block output minus block input) as a multiple of the
embedding RMS. A block update far above 1x drowns the token identity that the embedding carries (what
the default PyTorch init of the projections did before the model init of seqarch.models.block).
"""

from __future__ import annotations

import argparse

import torch

import seqarch
from seqarch.models.lm import SeqLM


def rms(x: torch.Tensor) -> float:
    return x.pow(2).mean().sqrt().item()


@torch.no_grad()
def residual_stream(mixer: str, d_model: int, n_layers: int, mlp: bool, vocab_size: int, seq_len: int,
                    seed: int) -> tuple[float, list[float], list[float]]:
    """(embedding RMS, residual RMS after each block, update RMS of each block) at init, averaged over 8 rows."""
    torch.manual_seed(seed)
    model = SeqLM(vocab_size, d_model, n_layers, mixer=mixer, mlp=mlp).eval()
    tokens = torch.randint(vocab_size, (8, seq_len), generator=torch.Generator().manual_seed(seed))
    x = model._embed(tokens, 0)
    embedding = rms(x)
    streams, updates = [], []
    for layer in model.layers:
        y = layer(x)
        updates.append(rms(y - x))
        streams.append(rms(y))
        x = y
    return embedding, streams, updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--n-layers", type=int, default=4)
    parser.add_argument("--no-mlp", action="store_true", help="mixer-only blocks (Zoology's figure-2 setting)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    layers = " | ".join(f"after block {index}" for index in range(args.n_layers))
    print(f"d_model {args.d_model}, {args.n_layers} layers, mlp={not args.no_mlp}, V {args.vocab_size}, "
          f"L {args.seq_len}, seed {args.seed}\n")
    print(f"| mixer | embedding | {layers} | largest update / embedding |")
    print("|---" * (args.n_layers + 3) + "|")
    for mixer in seqarch.list_mixers():
        embedding, streams, updates = residual_stream(mixer, args.d_model, args.n_layers, not args.no_mlp,
                                                      args.vocab_size, args.seq_len, args.seed)
        cells = " | ".join(f"{value:.4f}" for value in streams)
        print(f"| {mixer} | {embedding:.4f} | {cells} | {max(updates) / embedding:.2f}x |")


if __name__ == "__main__":
    main()
