"""Classification predictions: the top-k labels of each image, printed and written as JSON."""

from __future__ import annotations

import json

import torch

__all__ = ["imagenet_categories", "class_names_of", "predict"]


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in label order (they ship with torchvision; nothing is downloaded)."""
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_of(model) -> list[str]:
    """The names stored with the weights, else ImageNet's for a 1000-class model, else "0", "1", ..."""
    if model.class_names is not None and len(model.class_names) == model.num_classes:
        return list(model.class_names)
    if model.num_classes == 1000:
        return imagenet_categories()
    return [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def predict(cfg, model, paths: list[str], out: str | None = None, topk: int = 5,
            **_options) -> list[dict]:
    """Top-k labels of each image (printed); ``out``: also ``<out>/predictions.json`` -- or
    ``predictions-1.json``, ``-2``... when that name is taken (an existing file is never overwritten;
    the printed line names the file written)."""
    from tasks.config import resolve_image_size
    from tasks.data.images import image_options, read_image
    from tasks.data.transforms.classification import eval_transform_for

    model.eval()
    device = next(model.parameters()).device
    classes = class_names_of(model)
    transform = eval_transform_for(cfg, resolve_image_size(cfg))
    results = []
    for path in paths:
        image = transform(read_image(path, **image_options(cfg))).unsqueeze(0).to(device)
        probs = model(image).float().softmax(dim=1)[0]
        top = probs.topk(min(topk, probs.numel()))
        labels = [{"label": classes[i], "index": int(i), "prob": round(float(p), 5)}
                  for p, i in zip(top.values.tolist(), top.indices.tolist())]
        results.append({"image": str(path), "top": labels})
        print(f"{path}: " + ", ".join(f"{item['label']} {item['prob']:.3f}" for item in labels))
    if out:
        from tasks.data.outputs import output_folder, unique_path, write_new

        json_path = unique_path(output_folder(out) / "predictions.json")
        write_new(json_path, json.dumps(results, indent=1).encode())
        print(f"wrote {json_path}")
    return results
