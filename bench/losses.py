"""Forward + backward time of every registered loss on a realistic batch; prints a markdown table.

    .venv/bin/python bench/losses.py [--repeats 7] [--seg-shape 4,3,32,64,64] [--device cpu]

Classification/ordinal/distillation: B = 256, K = 3 (features 512-d). Segmentation: logits
``(4, 3, 32, 64, 64)`` by default. Each row is the median over ``--repeats`` timed runs (after one
warm-up), ours and the reference interleaved so that both see the same machine load. ``ratio`` is
ours / the library implementation of the same loss where one exists (goal ≤ 1.2). Numbers only, no
asserts (DESIGN.md: benchmarks print numbers).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from losslab.losses import build_loss, list_losses


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fwd_bwd(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], device: str) -> float:
    for leaf in leaves:
        leaf.grad = None
    _sync(device)
    start = time.perf_counter()
    fn().backward()
    _sync(device)
    return time.perf_counter() - start


def bench_pair(ours, ref, leaves, repeats, device):
    ours_t, ref_t = [], []
    time_fwd_bwd(ours, leaves, device)
    if ref is not None:
        time_fwd_bwd(ref, leaves, device)
    for _ in range(repeats):
        ours_t.append(time_fwd_bwd(ours, leaves, device))
        if ref is not None:
            ref_t.append(time_fwd_bwd(ref, leaves, device))
    return statistics.median(ours_t), (statistics.median(ref_t) if ref_t else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--seg-shape", default="4,3,32,64,64")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--filter", default="*")
    args = parser.parse_args()
    device, B, K = args.device, args.batch, args.classes
    torch.manual_seed(0)
    counts = [int(1000 / (i + 1) ** 2) for i in range(K)]
    common = dict(class_counts=counts, num_classes=K)

    logits = torch.randn(B, K, device=device, requires_grad=True)
    target = torch.randint(0, K, (B,), device=device)
    ord_logits = torch.randn(B, K - 1, device=device, requires_grad=True)
    bin_logits = torch.randn(B, 1, device=device, requires_grad=True)
    bin_target = torch.randint(0, 2, (B,), device=device)
    seg_shape = tuple(int(s) for s in args.seg_shape.split(","))
    seg_logits = torch.randn(*seg_shape, device=device, requires_grad=True)
    seg_target = torch.randint(0, seg_shape[1], (seg_shape[0], 1) + seg_shape[2:], device=device)
    dist_maps = torch.randn(*seg_shape, device=device)
    teacher = torch.randn(B, K, device=device)
    f_s = torch.randn(B, 512, device=device, requires_grad=True)
    f_t = torch.randn(B, 512, device=device)
    index = torch.randint(0, 10_000, (B,), device=device)

    from monai.losses import DiceCELoss, DiceLoss, FocalLoss, TverskyLoss
    from torchvision.ops import sigmoid_focal_loss

    seg_onehot_args = dict(to_onehot_y=True, softmax=True)
    rows = []  # (name, shape, ours_fn, ref_fn, ref_name, leaves)

    def cls(name, **kw):
        loss = build_loss(name, **common, **kw).to(device)
        return lambda: loss(logits, target)

    rows += [
        ("ce", "(256, 3)", cls("ce"), lambda: F.cross_entropy(logits, target), "F.cross_entropy", [logits]),
        ("ce (weights [1,2,4])", "(256, 3)", cls("ce", class_weights=[1.0, 2.0, 4.0][:K] + [1.0] * (K - 3)),
         lambda: F.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 4.0][:K] + [1.0] * (K - 3), device=device)),
         "F.cross_entropy(weight)", [logits]),
        ("focal (softmax)", "(256, 3)", cls("focal"), None, "—", [logits]),
    ]
    bin_focal = build_loss("focal", mode="sigmoid", alpha=0.25, num_classes=2).to(device)
    rows.append(("focal (sigmoid, binary)", "(256, 1)", lambda: bin_focal(bin_logits, bin_target),
                 lambda: sigmoid_focal_loss(bin_logits, bin_target.unsqueeze(1).float(), 0.25, 2.0, "mean"),
                 "torchvision sigmoid_focal_loss", [bin_logits]))
    for name in ["ldam", "logit_adjusted", "balanced_softmax", "class_balanced"]:
        rows.append((name, "(256, 3)", cls(name), None, "—", [logits]))
    comp = build_loss("compound", terms=[{"name": "ce", "weight": 0.5}, {"name": "focal", "weight": 0.5}],
                      weighting="learnable_softmax", **common).to(device)
    rows.append(("compound (ce+focal, learnable)", "(256, 3)", lambda: comp(logits, target), None, "—", [logits]))
    for name in ["coral", "corn"]:
        loss = build_loss(name, **common).to(device)
        rows.append((name, "(256, 2)", (lambda l=loss: l(ord_logits, target)), None, "—", [ord_logits]))

    seg_desc = str(seg_shape)

    def seg(name, **kw):
        loss = build_loss(name, **common | {"num_classes": seg_shape[1]}, **kw).to(device)
        if name in ("boundary", "dice_boundary"):
            return lambda: loss(seg_logits, seg_target, dist_maps)
        return lambda: loss(seg_logits, seg_target)

    monai_dice = DiceLoss(**seg_onehot_args)
    monai_tversky = TverskyLoss(alpha=0.3, beta=0.7, **seg_onehot_args)
    monai_focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=2.0, alpha=0.25)
    monai_dice_ce = DiceCELoss(**seg_onehot_args)
    rows += [
        ("dice", seg_desc, seg("dice"), lambda: monai_dice(seg_logits, seg_target), "monai DiceLoss", [seg_logits]),
        ("dice_ce", seg_desc, seg("dice_ce"), lambda: monai_dice_ce(seg_logits, seg_target), "monai DiceCELoss",
         [seg_logits]),
        ("tversky", seg_desc, seg("tversky", alpha=0.3, beta=0.7), lambda: monai_tversky(seg_logits, seg_target),
         "monai TverskyLoss", [seg_logits]),
        ("focal_tversky", seg_desc, seg("focal_tversky"), lambda: monai_tversky(seg_logits, seg_target),
         "monai TverskyLoss", [seg_logits]),
        ("focal_seg", seg_desc, seg("focal_seg", alpha=0.25), lambda: monai_focal(seg_logits, seg_target),
         "monai FocalLoss", [seg_logits]),
        ("boundary", seg_desc, seg("boundary"), None, "—", [seg_logits]),
        ("dice_boundary", seg_desc, seg("dice_boundary"), None, "—", [seg_logits]),
    ]
    comp_seg = build_loss("compound", terms=[{"name": "dice", "weight": 0.5},
                                             {"name": "focal_seg", "weight": 0.3, "alpha": 0.25, "gamma": 2},
                                             {"name": "boundary", "weight": 0.2}],
                          weighting="learnable_softmax").to(device)
    rows.append(("compound_seg (dice+focal_seg+boundary)", seg_desc,
                 lambda: comp_seg(seg_logits, seg_target, dist_maps=dist_maps), None, "—", [seg_logits]))

    kd_pure = build_loss("kd", alpha=1.0, temperature=4.0).to(device)
    rows.append(("kd (alpha=1)", "(256, 3)", lambda: kd_pure(logits, teacher, target),
                 lambda: F.kl_div(F.log_softmax(logits / 4, 1), F.softmax(teacher / 4, 1), reduction="batchmean") * 16,
                 "F.kl_div", [logits]))

    def dist(name, **kw):
        loss = build_loss(name, **common, **kw).to(device)
        return lambda: loss(logits, teacher, target, student_features=f_s, teacher_features=f_t, index=index)

    rows += [
        ("kd", "(256, 3)", dist("kd"), None, "—", [logits]),
        ("combined", "(256, 3) + 512-d", dist("combined", student_dim=512, teacher_dim=512), None, "—", [logits, f_s]),
        ("rkd", "(256, 3) + 512-d", dist("rkd"), None, "—", [logits, f_s]),
        ("crd (in_batch)", "(256, 3) + 512-d", dist("crd", student_dim=512, teacher_dim=512), None, "—", [logits, f_s]),
        ("crd (memory_bank, 10k, 1024 neg)", "(256, 3) + 512-d",
         dist("crd", student_dim=512, teacher_dim=512, mode="memory_bank", num_data=10_000, num_negatives=1024),
         None, "—", [logits, f_s]),
        ("mmd", "(256, 3) + 512-d", dist("mmd"), None, "—", [logits, f_s]),
    ]

    import fnmatch

    covered = set()
    print(f"device: {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}\n")
    print("| loss | input | ours (ms) | reference | reference (ms) | ratio |")
    print("|---|---|---:|---|---:|---:|")
    for name, shape, ours, ref, ref_name, leaves in rows:
        if not fnmatch.fnmatchcase(name, args.filter):
            continue
        covered.add(name.split(" ")[0])
        t_ours, t_ref = bench_pair(ours, ref, leaves, args.repeats, device)
        ratio = f"{t_ours / t_ref:.2f}" if t_ref else "—"
        ref_ms = f"{t_ref * 1e3:.2f}" if t_ref else "—"
        print(f"| {name} | {shape} | {t_ours * 1e3:.2f} | {ref_name} | {ref_ms} | {ratio} |", flush=True)
    missing = [n for n in list_losses() if n not in covered and fnmatch.fnmatchcase(n, args.filter)]
    if missing:
        print(f"\nnot benchmarked: {', '.join(missing)}")


if __name__ == "__main__":
    main()
