"""Per-GPU parameter + gradient + optimizer-state memory under DDP and under FSDP2, counted on the meta device.

    python benchmarks/sharded_memory.py [--model vit_huge_patch14_224] [--ranks 8] [--optimizer adamw]

Nothing is allocated: the network is built on the meta device and its trainable parameters counted. Per rank:

* DDP keeps a full copy of the fp32 weights, their gradients and the optimizer state (AdamW: 2 fp32 moments).
* FSDP2 (``--trainer.strategy fsdp2``) keeps 1/ranks of each (``fully_shard`` pads each unit to a multiple of the
  rank count: included), plus, transiently, the largest unit gathered whole (its weights in forward and
  backward, and its unsharded gradient before the reduce-scatter): the two largest units are in flight at once
  when FSDP2 prefetches the next one, which is the bound printed.

Activations are not counted (they do not depend on the strategy). The figures are the theoretical footprint of the
states, not a measured peak.
"""

from __future__ import annotations

import argparse
import json
import math

import timm
import torch

from masksub_lightning.training.sharding import block_units

OPTIMIZER_STATES = {"adamw": 2, "lamb": 2, "sgd": 1, "sgd_nomomentum": 0}  # fp32 tensors per parameter


def count(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


def footprint(model: str, ranks: int, optimizer: str = "adamw") -> dict[str, float]:
    """Bytes per rank of weights + gradients + optimizer state under DDP and FSDP2 (see the module docstring)."""
    with torch.device("meta"):
        net = timm.create_model(model, num_classes=1000)
    unit_sizes = sorted((count(u.parameters()) for u in block_units(net)), reverse=True)
    total = count(net.parameters())
    root = total - sum(unit_sizes)
    per_param = 4 * (2 + OPTIMIZER_STATES[optimizer])  # fp32 weight + gradient + optimizer moments
    padded = sum(math.ceil(n / ranks) for n in [*unit_sizes, root])  # each unit padded to the rank count
    return {
        "parameters": total,
        "blocks": len(unit_sizes),
        "root_parameters": root,
        "ddp_bytes": total * per_param,
        "fsdp2_state_bytes": padded * per_param,
        "fsdp2_in_flight_bytes": 2 * sum(unit_sizes[:2]) * 4,  # two gathered units: weights + gradients, fp32
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_huge_patch14_224")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--optimizer", default="adamw", choices=sorted(OPTIMIZER_STATES))
    args = parser.parse_args()
    f = footprint(args.model, args.ranks, args.optimizer)
    gib = 2**30
    ddp, states, flight = f["ddp_bytes"], f["fsdp2_state_bytes"], f["fsdp2_in_flight_bytes"]
    print(
        f"{args.model}: {f['parameters'] / 1e6:.1f} M trainable parameters in {f['blocks']} blocks + root "
        f"({f['root_parameters'] / 1e6:.2f} M); optimizer {args.optimizer}; {args.ranks} ranks"
    )
    print(f"{'strategy':<10}{'states / rank':>16}{'+ in flight':>14}{'total / rank':>15}{'vs DDP':>9}")
    print(f"{'ddp':<10}{ddp / gib:>13.2f} GiB{0:>11.2f} GiB{ddp / gib:>12.2f} GiB{1:>9.3f}")
    print(
        f"{'fsdp2':<10}{states / gib:>13.2f} GiB{flight / gib:>11.2f} GiB{(states + flight) / gib:>12.2f} GiB"
        f"{(states + flight) / ddp:>9.3f}"
    )
    print(json.dumps({"model": args.model, "ranks": args.ranks, "optimizer": args.optimizer, **f}))


if __name__ == "__main__":
    main()
