#!/usr/bin/env python3
"""Writes a synthetic Megatron indexed dataset (PREFIX.bin + PREFIX.idx, layout in
io/indexed_dataset.h) of uniformly random token ids, for runs that need no tokenizer.

usage: synthetic_dataset.py PREFIX [--documents N] [--mean_tokens M] [--vocab_size V] [--seed S]
Standard library only, so that any python3 runs it.
"""
import argparse
import random
import struct
import sys
from array import array

MAGIC = b"MMIDIDX\x00\x00"
UINT16, INT32 = 8, 4  # Megatron's dtype codes


def little_endian(values):
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


def write_dataset(prefix, documents, mean_tokens, vocab_size, seed):
    """Writes PREFIX.bin/.idx, one sequence per document; returns the number of tokens."""
    rng = random.Random(seed)
    small = vocab_size <= 65536
    # Lengths vary around the mean so that packed samples straddle document boundaries.
    lengths = [rng.randint(max(1, mean_tokens // 2), max(1, mean_tokens * 3 // 2))
               for _ in range(documents)]
    item = 2 if small else 4
    with open(prefix + ".bin", "wb") as f:
        for n in lengths:
            f.write(little_endian(array("H" if small else "i",
                                        (rng.randrange(vocab_size) for _ in range(n)))))
    pointers, offset = [], 0
    for n in lengths:
        pointers.append(offset)
        offset += n * item
    with open(prefix + ".idx", "wb") as f:
        f.write(MAGIC)
        f.write(struct.pack("<QBQQ", 1, UINT16 if small else INT32, documents, documents + 1))
        f.write(struct.pack(f"<{documents}i", *lengths))
        f.write(struct.pack(f"<{documents}q", *pointers))
        f.write(struct.pack(f"<{documents + 1}q", *range(documents + 1)))
    return sum(lengths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prefix")
    parser.add_argument("--documents", type=int, default=1000)
    parser.add_argument("--mean_tokens", type=int, default=512)
    parser.add_argument("--vocab_size", type=int, default=32000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.documents < 1 or args.mean_tokens < 1 or args.vocab_size < 1:
        parser.error("--documents, --mean_tokens and --vocab_size must be positive")
    total = write_dataset(args.prefix, args.documents, args.mean_tokens, args.vocab_size, args.seed)
    print(f"{args.prefix}.bin/.idx: {args.documents} documents, {total} tokens")


if __name__ == "__main__":
    main()
