"""Worker for test_segmentation's DDP evaluator test (torch.multiprocessing.spawn, gloo on CPU).

Rank 0 evaluates every image, rank 1 an empty shard; both must return the same metrics.
"""

import torch
import torch.distributed as dist

from tasks.segmentation.evaluate import SegmentationEvaluator


def evaluate_rank(rank: int, world: int, init_file: str, logits: torch.Tensor, masks: torch.Tensor, out: str):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        evaluator = SegmentationEvaluator(logits.shape[1])
        if rank == 0:
            evaluator.update(logits, masks)
        torch.save(evaluator.compute(), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
