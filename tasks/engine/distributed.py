"""Process-group setup from the torchrun environment, the training device, and small collective helpers.

torchrun (``torchrun --nproc-per-node N ...``) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``; with ``WORLD_SIZE > 1`` we join the group (NCCL on CUDA, gloo on
CPU) and bind each process to GPU ``LOCAL_RANK``. Every collective helper here is a no-op (or the
identity) in a single process, so callers never branch on "am I distributed". Also here: moving
batches to the device, the per-epoch loader order (``set_epoch`` / generator re-seed), and stop
signals that all ranks agree on.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tasks.engine.errors import EngineError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer; unset it or launch "
                         f"with torchrun, which sets it") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def pick_device(spec: str, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """``train.device`` -> a device: ``auto`` is CUDA when present; under DDP each rank gets GPU LOCAL_RANK."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EngineError(f"train.device={spec!r} but this machine has no usable CUDA device; "
                              f"set --set train.device=cpu (or auto)")
        count = torch.cuda.device_count()
        if world_size > 1:
            index = local_rank
        else:
            index = int(spec.split(":", 1)[1]) if ":" in spec and spec.split(":", 1)[1].isdigit() else 0
        if index >= count:
            raise EngineError(f"train.device={spec!r} (LOCAL_RANK={local_rank}) asks for GPU {index} but only "
                              f"{count} are visible; use fewer processes or check CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", index)
    raise EngineError(f"train.device={spec!r} is not one of auto|cpu|cuda|cuda:N; fix train.device in the config")


def init_from_env(device: torch.device) -> DistEnv:
    """Join the process group torchrun describes (if ``WORLD_SIZE > 1``) and return this process's place."""
    world_size = env_world_size()
    if world_size <= 1:
        return DistEnv()
    missing = [name for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} is not; launch with "
                         f"'torchrun --nproc-per-node N ...' (or unset WORLD_SIZE for one process)")
    env = DistEnv(rank=_env_int("RANK", 0), local_rank=_env_int("LOCAL_RANK", 0), world_size=world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def to_device(obj: Any, device: torch.device) -> Any:
    """Move a tensor or any nested list/tuple/dict of tensors to ``device`` (non-blocking)."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {key: to_device(value, device) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(value, device) for value in obj)
    return obj


def setup_process(device_spec: str, deterministic: bool = False) -> tuple[torch.device, DistEnv]:
    """Pick this process's device, join the torchrun group if any, and set the cuDNN/determinism flags."""
    device = pick_device(device_spec, _env_int("LOCAL_RANK", 0), env_world_size())
    env = init_from_env(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # autotuned convolutions unless asked not to
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return device, env


def set_loader_epoch(loader, seed: int, epoch: int) -> None:
    """Make ``loader``'s order for ``epoch`` a pure function of (seed, epoch).

    Calls ``set_epoch`` on a sampler that has it (``DistributedSampler``) and re-seeds the loader's
    ``generator`` (which drives ``RandomSampler`` and the workers' base seed) from (seed, epoch, rank),
    so that each rank's workers draw their own augmentations.
    """
    for sampler in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
            break
    if isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.manual_seed(seed + epoch + 1_000_003 * get_rank())


def is_enabled() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_enabled() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_enabled() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all ranks (identity in one process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` in place over all ranks (identity in one process)."""
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def global_mean(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all ranks and divided by the world size, as a new tensor (itself in one
    process). The normaliser for a loss divided by a global count: DDP averages gradients over ranks, so
    ``local_sum / global_mean(count)`` gives every rank's gradient the weight of the global mean."""
    tensor = tensor.detach().clone()
    return all_reduce_mean_(tensor)


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    if is_enabled():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_buffers_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm statistics) into every rank's ``module``."""
    if is_enabled():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=src)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small things such as a run directory name)."""
    if not is_enabled():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Every rank's ``obj`` as a list on rank ``dst`` (``None`` elsewhere); ``[obj]`` in one process."""
    if not is_enabled():
        return [obj]
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, gathered, dst=dst)
    return gathered


def barrier() -> None:
    if is_enabled():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun process)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class StopSignals:
    """SIGTERM/SIGINT set ``signum`` instead of killing the process; the training loop polls it.

    ``agreed(device)`` makes every rank see the same answer (a MAX all-reduce; call it at the same
    point on every rank). A second SIGINT raises ``KeyboardInterrupt`` at once. ``restore`` puts the
    previous handlers back.
    """

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # handlers can only be set from the main thread; signals then keep their default action
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self.signum = signum

    def agreed(self, device: torch.device) -> int:
        if is_enabled():
            flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
            self.signum = int(all_reduce_max_(flag).item())
        return self.signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()


def check_sharded(loaders: dict, world_size: int) -> None:
    """Under DDP every loader must shard across the ranks; a loader built before the process group was
    joined would silently feed every rank the whole dataset."""
    if world_size <= 1:
        return
    for name, loader in loaders.items():
        sampler = getattr(loader, "sampler", None)
        if getattr(sampler, "num_replicas", None) != world_size:
            raise EngineError(f"loaders[{name!r}] is not sharded across the {world_size} processes (its sampler is "
                              f"{type(sampler).__name__}); build loaders with tasks.data.build_loaders, which joins the "
                              f"process group first, or give them a DistributedSampler")
