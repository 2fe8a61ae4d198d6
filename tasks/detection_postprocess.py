"""The old import path of ``tasks.detection.postprocess`` (named by earlier READMEs): the same objects."""

from tasks.detection.postprocess import PostProcess, postprocess, select_candidates

__all__ = ["PostProcess", "postprocess", "select_candidates"]
