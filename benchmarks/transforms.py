"""Per-sample augmentation throughput: randkit's batched pipeline against torchvision v2
applied sample by sample (the only way to get per-sample parameters there).

Pipeline: random crop (padding 4) + horizontal flip + Gaussian noise (std 0.1) + random
erasing, on batches of 256 images of 3x32x32, CPU. Also shown: torchvision v2 on the whole
batch at once, which is fast but gives every image the same crop, flip and erasing box.

    python benchmarks/transforms.py [--batches 20] [--batch-size 256] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from torchvision.transforms import v2

from randkit.memory import keep_freed_memory
from randkit.randomize import Compose, HorizontalFlip, InputNoise, RandomCrop, RandomErasing


def randkit_pipeline(noise: bool = True) -> Compose:
    stages = [
        RandomCrop(padding=4),
        HorizontalFlip(p=0.5),
        InputNoise("gaussian", 0.1),
        RandomErasing(p=0.5),
    ]
    return Compose([t for t in stages if noise or not isinstance(t, InputNoise)])


def torchvision_pipeline(noise: bool = True) -> v2.Compose:
    stages = [
        v2.RandomCrop(32, padding=4),
        v2.RandomHorizontalFlip(p=0.5),
        v2.GaussianNoise(sigma=0.1),
        v2.RandomErasing(p=0.5),
    ]
    return v2.Compose([t for t in stages if noise or not isinstance(t, v2.GaussianNoise)])


def best_rates(fns: dict, batches: list[torch.Tensor], rounds: int) -> dict[str, float]:  # type: ignore[type-arg]
    """Images per second of each function, best of ``rounds`` passes over ``batches``.

    The passes of the functions are interleaved, so that a slow phase of this shared machine
    (other virtual machines on the same cores) hits every side alike instead of one.
    """
    for fn in fns.values():
        fn(batches[0])  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for batch in batches:
                fn(batch)
            if batches[0].device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    images = sum(len(b) for b in batches)
    return {name: images / seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc returning freed memory to the kernel (the randkit commands don't)",
    )
    args = parser.parse_args()
    if not args.default_malloc:
        # What the randkit commands do at start; process-wide, so both sides run under it.
        keep_freed_memory()
    device = torch.device(args.device)
    data = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.rand(args.batch_size, 3, 32, 32, generator=data, device=device)
        for _ in range(args.batches)
    ]

    generator = torch.Generator(device=device).manual_seed(1)
    rates = {}
    for noise, suffix in ((True, ""), (False, "_without_noise")):
        ours, tv = randkit_pipeline(noise), torchvision_pipeline(noise)

        def per_sample(batch: torch.Tensor, tv: v2.Compose = tv) -> torch.Tensor:
            return torch.stack([tv(image) for image in batch])

        fns = {
            f"randkit_per_sample_batched{suffix}": lambda b, ours=ours: ours(b, generator),
            f"torchvision_v2_per_sample_loop{suffix}": per_sample,
            f"torchvision_v2_whole_batch_shared_params{suffix}": tv,
        }
        rates.update(best_rates(fns, batches, args.rounds))
    ratio = rates["randkit_per_sample_batched"] / rates["torchvision_v2_per_sample_loop"]
    ratio_without_noise = (
        rates["randkit_per_sample_batched_without_noise"]
        / rates["torchvision_v2_per_sample_loop_without_noise"]
    )
    for name, rate in rates.items():
        print(f"{name:56s} {rate:10.0f} images/s")
    print(f"ratio randkit / torchvision per-sample loop: {ratio:6.1f}x  (target >= 10x)")
    print(f"same, without the Gaussian-noise stage:      {ratio_without_noise:6.1f}x")
    print(
        json.dumps(
            {
                "benchmark": "transforms",
                "ratio": round(ratio, 2),
                "ratio_without_noise": round(ratio_without_noise, 2),
                **{k: round(v) for k, v in rates.items()},
                "batch_size": args.batch_size,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "keep_freed_memory": not args.default_malloc,
                "machine": platform.machine(),
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
