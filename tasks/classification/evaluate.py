"""Classification evaluation: top-1 / top-5 accuracy over a whole split, summed over every process."""

from __future__ import annotations

import torch

from tasks.engine.distributed import all_reduce_sum_

__all__ = ["TopKEvaluator"]


class TopKEvaluator:
    """Top-1/top-5 accuracy over a whole split; counts stay on the device until ``compute``."""

    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, topk: tuple[int, ...] = (1, 5), device: torch.device | str = "cpu"):
        self.topk, self.device = topk, torch.device(device)
        self.reset()

    def reset(self) -> None:
        # Counts exist from the start, so a rank whose shard is empty still joins the all-reduce.
        self.correct = torch.zeros(len(self.topk), dtype=torch.long, device=self.device)
        self.total = torch.zeros((), dtype=torch.long, device=self.device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        top = logits.topk(max(self.topk), dim=1).indices
        hits = top.eq(targets.view(-1, 1))
        self.correct += torch.stack([hits[:, :k].any(dim=1).sum() for k in self.topk]).to(self.device)
        self.total += targets.numel()

    def compute(self) -> dict[str, float]:
        counts = torch.cat([self.correct, self.total.view(1)]).double()
        all_reduce_sum_(counts)
        total = counts[-1].item()
        if total == 0:
            raise RuntimeError("TopKEvaluator.compute(): no samples were evaluated (empty validation split?)")
        return {f"top{k}": counts[i].item() / total for i, k in enumerate(self.topk)}
