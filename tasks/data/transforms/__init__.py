"""The augmentation and eval transforms of each task (torchvision transforms.v2 with tv_tensors)."""
