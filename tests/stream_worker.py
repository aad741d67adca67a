"""Two gloo processes read one streamed corpus; ``test_streaming.py`` starts it.

Usage: ``python tests/stream_worker.py CORPUS TOKENIZER_JSON OUT_DIR``. Each rank reads 3 batches,
saves the loader's state (a collective: both ranks' positions), reads 3 more, then a fresh loader
loads the state and reads 3; ``OUT_DIR/rank<r>.pt`` holds the three lists of batches.
"""

from __future__ import annotations

import sys
from pathlib import Path

import datasets
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_efficient.data.streaming import PackedStream, StreamingDataLoader
from lightning_efficient.data.text import PackBlocks
from lightning_efficient.data.tokenizers import load_tokenizer


def loader(corpus: str, tokenizer_json: str, rank: int) -> StreamingDataLoader:
    source = datasets.load_dataset("text", data_files=[corpus], split="train", streaming=True)
    packer = PackBlocks(load_tokenizer(tokenizer_json), "text", cls_id=2, sep_id=3, max_length=12)
    stream = PackedStream([source], "text", packer, buffer_size=16, seed=0, rank=rank, world_size=2)
    return StreamingDataLoader(stream, batch_size=4, collate_fn=torch.tensor)


def worker(rank: int, corpus: str, tokenizer_json: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{out}/process_group", rank=rank, world_size=2)
    first_loader = loader(corpus, tokenizer_json, rank)
    batches = iter(first_loader)
    first = [next(batches) for _ in range(3)]
    state = first_loader.state_dict()
    rest = [next(batches) for _ in range(3)]
    resumed = loader(corpus, tokenizer_json, rank)
    resumed.load_state_dict(state)
    again = [batch for _, batch in zip(range(3), resumed)]
    torch.save(
        {"first": first, "rest": rest, "again": again, "states": len(state["ranks"])}, Path(out) / f"rank{rank}.pt"
    )
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=tuple(sys.argv[1:4]), nprocs=2)
