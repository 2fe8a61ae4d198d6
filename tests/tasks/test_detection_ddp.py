"""Detection under DDP (two gloo processes): the positive count is global, and the COCO evaluator
gathers every rank's detections (uneven shards) and returns the one-process metrics on every rank."""

import json

import pytest
import torch
import torch.multiprocessing as mp

from tasks.data.coco import CocoDetection
from tasks.data.transforms.detection import DetectionEvalTransform
from tasks.data.synthetic.detection import write_coco
from tasks.detection.evaluate import CocoEvaluator
from tasks.detection.loss import detection_loss, global_positives


def _fake_detections(dataset, indices):
    """Ground-truth boxes shifted by a few pixels (deterministic per image): a non-trivial mAP."""
    detections, targets = [], []
    for i in indices:
        _, target = dataset[i]
        keep = ~target["iscrowd"]
        generator = torch.Generator().manual_seed(i)
        boxes = target["boxes"][keep] + 4 * torch.randn(int(keep.sum()), 4, generator=generator)
        detections.append({"boxes": boxes, "labels": target["labels"][keep],
                           "scores": torch.rand(int(keep.sum()), generator=generator)})
        targets.append(target)
    return detections, targets


def _worker(rank, world, store, root, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        positives = torch.tensor([3.0, 1.0]) if rank == 0 else torch.tensor([6.0])
        count = global_positives(positives)
        logits = torch.zeros(1, 4, 2, requires_grad=True)
        losses = detection_loss([logits], [torch.zeros(1, 4, 4)], [torch.tensor([[0, -1, -1, -1]])],
                                [torch.zeros(1, 4, 4)], positives)
        dataset = CocoDetection(root, "val", DetectionEvalTransform(128))
        shard = [0, 1, 2, 3, 4] if rank == 0 else [5, 6, 7]  # uneven shards
        evaluator = CocoEvaluator(dataset.annotation_file)
        detections, targets = _fake_detections(dataset, shard)
        evaluator.update(detections, targets)
        metrics = evaluator.compute()
        evaluator.save(out)  # rank 0 only: the others hold no gathered detections
        torch.save({"count": count, "class_loss": losses["class_loss"].detach(), "metrics": metrics},
                   f"{out}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    base = tmp_path_factory.mktemp("det_ddp")
    root = write_coco(base / "data", train_images=2, val_images=8, seed=5)
    mp.spawn(_worker, args=(2, str(base / "store"), str(root), str(base)), nprocs=2, join=True)
    return root, base, [torch.load(base / f"rank{r}.pt", weights_only=False) for r in range(2)]


def test_positive_count_is_global(ddp_results):
    _, _, (rank0, rank1) = ddp_results
    assert rank0["count"].item() == rank1["count"].item() == pytest.approx(5.0)  # (4 + 6) / 2 ranks
    one_process = detection_loss([torch.zeros(1, 4, 2)], [torch.zeros(1, 4, 4)], [torch.tensor([[0, -1, -1, -1]])],
                                 [torch.zeros(1, 4, 4)], torch.tensor([5.0]))
    torch.testing.assert_close(rank0["class_loss"], one_process["class_loss"])


def test_evaluator_gathers_all_ranks(ddp_results):
    root, base, (rank0, rank1) = ddp_results
    assert rank0["metrics"] == rank1["metrics"]
    dataset = CocoDetection(root, "val", DetectionEvalTransform(128))
    evaluator = CocoEvaluator(dataset.annotation_file)
    evaluator.update(*_fake_detections(dataset, range(8)))
    assert evaluator.compute() == pytest.approx(rank0["metrics"])
    written = json.loads((base / "detections.json").read_text())
    assert {r["image_id"] for r in written} == {dataset.images[i]["id"] for i in range(1, 8)}  # image 0 is empty
