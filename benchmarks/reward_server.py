"""Overhead of scoring through `trl-nft serve-reward` (loopback HTTP, JSON + base64 PNG) against in-process.

    python benchmarks/reward_server.py [--size 512] [--images 64] [--batch-size 32] [--repeats 3]

Scores `--images` random images of `--size` px with the cheap `brightness` reward, in-process and through a
`RewardServer` on 127.0.0.1 with `RemoteReward`, and prints images per second and the per-image overhead. With a cheap
reward the figure is the wire cost (PNG encode/decode, base64, JSON, HTTP), which a real reward model's forward pass
then hides or not.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from trl_nft.rewards import RemoteReward, brightness
from trl_nft.rewards.server import RewardServer, ServerLimits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images = torch.rand(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    images = (images * 255).round() / 255  # 8-bit values: served scores then equal in-process scores exactly
    prompts = [f"prompt {i}" for i in range(args.images)]
    server = RewardServer(brightness, "127.0.0.1", 0, token="bench", limits=ServerLimits(max_batch_size=256))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    remote = RemoteReward(server.url, token="bench", batch_size=args.batch_size)
    try:
        timings = {}
        for label, fn in (("in-process", brightness), ("served", remote)):
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                scores = fn(prompts, images)
                best = min(best, time.perf_counter() - start)
            timings[label] = (best, scores)
        assert timings["served"][1] == timings["in-process"][1], "served scores differ from in-process ones"
        local, served = timings["in-process"][0], timings["served"][0]
        print(f"{args.images} images of {args.size}px, requests of {args.batch_size}, best of {args.repeats}:")
        print(f"  in-process: {args.images / local:9.1f} images/s")
        print(
            f"  served:     {args.images / served:9.1f} images/s  (+{(served - local) / args.images * 1e3:.1f} ms/image)"
        )
        print("  scores identical: yes")
    finally:
        server.shutdown()
        server.server_close()


if __name__ == "__main__":
    main()
