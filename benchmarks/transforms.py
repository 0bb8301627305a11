"""Per-sample augmentation throughput: randkit's batched pipeline against two peers that a
user would otherwise pick, on the same batches in the same run:

- torchvision v2 applied sample by sample (the only way to get per-sample parameters there);
- Kornia's ``AugmentationSequential`` with ``same_on_batch=False`` (per-sample parameters,
  batched tensor ops).

Pipeline: random crop (padding 4, zero fill) + horizontal flip + Gaussian noise (std 0.1,
clipped to [0, 1]) + random erasing (p 0.5, scale 0.02-0.33, ratio 0.3-3.3, zeros), on
batches of 256 images of 3x32x32, CPU. Kornia's noise stage has no clipping, so its pipeline
ends with a ``clamp_(0, 1)`` (exactly equivalent: crop padding and erasing only write zeros).
Also shown: torchvision v2 on the whole batch at once, which is fast but gives every image
the same crop, flip and erasing box.

    python benchmarks/transforms.py [--batches 20] [--batch-size 256] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import kornia
import kornia.augmentation as K
import torch
import torchvision
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


def kornia_pipeline(noise: bool = True) -> K.AugmentationSequential:
    """The same stages in Kornia, each drawing its parameters per sample."""
    stages = [
        K.RandomCrop((32, 32), padding=4, fill=0, p=1.0),
        K.RandomHorizontalFlip(p=0.5),
        K.RandomGaussianNoise(mean=0.0, std=0.1, p=1.0),  # Kornia's default p is 0.5
        K.RandomErasing(scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0.0, p=0.5),
    ]
    kept = [t for t in stages if noise or not isinstance(t, K.RandomGaussianNoise)]
    return K.AugmentationSequential(*kept, same_on_batch=False)


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


TARGETS = {"torchvision_v2_per_sample_loop": 10.0, "kornia_per_sample_batched": 4.0}


def pipelines(generator: torch.Generator, noise: bool) -> dict:  # type: ignore[type-arg]
    """The timed functions of one pipeline variant, named by system."""
    suffix = "" if noise else "_without_noise"
    ours, tv, kornia = randkit_pipeline(noise), torchvision_pipeline(noise), kornia_pipeline(noise)

    def per_sample(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([tv(image) for image in batch])

    def kornia_batched(batch: torch.Tensor) -> torch.Tensor:
        out = kornia(batch)
        return out.clamp_(0, 1) if noise else out  # torchvision and randkit clip the noise

    return {
        f"randkit_per_sample_batched{suffix}": lambda b: ours(b, generator),
        f"kornia_per_sample_batched{suffix}": kornia_batched,
        f"torchvision_v2_per_sample_loop{suffix}": per_sample,
        f"torchvision_v2_whole_batch_shared_params{suffix}": tv,
    }


def report(rates: dict[str, float], args: argparse.Namespace, device: torch.device) -> None:
    """Print the table, the ratios with their targets, then the JSON line."""
    ratios = {}
    for suffix in ("", "_without_noise"):
        ours = rates[f"randkit_per_sample_batched{suffix}"]
        for peer in TARGETS:
            ratios[peer + suffix] = ours / rates[peer + suffix]
    print(f"{'system':56s} {'images/s':>10} {'us/sample':>10}")
    for name, rate in rates.items():
        print(f"{name:56s} {rate:10.0f} {1e6 / rate:10.2f}")
    print()
    for peer, target in TARGETS.items():
        met = "met" if ratios[peer] >= target else "MISSED"
        print(
            f"ratio randkit / {peer}: {ratios[peer]:6.1f}x (target >= {target:g}x: {met}); "
            f"without the Gaussian-noise stage: {ratios[peer + '_without_noise']:6.1f}x"
        )
    print(
        json.dumps(
            {
                "benchmark": "transforms",
                "ratio": round(ratios["torchvision_v2_per_sample_loop"], 2),
                "ratio_kornia": round(ratios["kornia_per_sample_batched"], 2),
                "ratio_without_noise": round(
                    ratios["torchvision_v2_per_sample_loop_without_noise"], 2
                ),
                "ratio_kornia_without_noise": round(
                    ratios["kornia_per_sample_batched_without_noise"], 2
                ),
                **{k: round(v) for k, v in rates.items()},
                "batch_size": args.batch_size,
                "batches": args.batches,
                "rounds": args.rounds,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "keep_freed_memory": not args.default_malloc,
                "machine": platform.machine(),
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "kornia": kornia.__version__,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 batches, 1 round: a smoke run")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc returning freed memory to the kernel (the randkit commands don't)",
    )
    args = parser.parse_args()
    if args.quick:
        args.batches, args.rounds = 2, 1
    if not args.default_malloc:
        # What the randkit commands do at start; process-wide, so every side runs under it.
        keep_freed_memory()
    device = torch.device(args.device)
    data = torch.Generator(device=device).manual_seed(0)
    batches = [
        torch.rand(args.batch_size, 3, 32, 32, generator=data, device=device)
        for _ in range(args.batches)
    ]
    generator = torch.Generator(device=device).manual_seed(1)
    torch.manual_seed(2)  # Kornia and torchvision draw from torch's global RNG
    rates: dict[str, float] = {}
    for noise in (True, False):
        rates.update(best_rates(pipelines(generator, noise), batches, args.rounds))
    report(rates, args, device)


if __name__ == "__main__":
    main()
