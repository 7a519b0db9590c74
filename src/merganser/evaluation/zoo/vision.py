"""The vision zoo: a tiny ViT pretrained on generated images and fine-tuned into one expert per
task, FusionBench's protocol in miniature (offline, deterministic, a few minutes on two cores).

Images are 16×16 RGB scenes drawn procedurally: a striped, tinted background and one to four
objects (square, disc, triangle or cross) in six colours and three sizes, with pixel noise.
Each task draws its own scenes and labels one attribute (:data:`VISION_TASKS`). The backbone is
transformers' ``ViTModel``, pretrained on one coarse yes/no question per task's scenes (is the
class in the upper half of the task's classes). Each task's head is a linear
probe of the *pretrained* backbone's CLS feature on a few labelled examples (the stand-in for
CLIP's zero-shot heads), and each expert fine-tunes the backbone with its head frozen. So every
merge is a backbone, evaluated on task k through head k, as FusionBench does.

Layout of a zoo folder: ``base/`` and ``experts/<task>/`` (ViTModel folders), ``heads/<task>.
safetensors`` (``weight``, ``bias``), ``calib/<task>.safetensors`` (``pixel_values`` of 256 train
images, for ``merganser calibrate --data``) and ``zoo.json`` (the spec and each expert's scores).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from merganser.storage.writer import publish

VISION_ZOO_VERSION = 3
SIZE = 16
COLORS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32
)
RADII = torch.tensor([1.6, 2.8, 4.2])
FREQS = torch.tensor([1.0, 2.0, 4.0])  # stripe cycles across the image
ANGLES = torch.tensor([0.0, math.pi / 4, math.pi / 2, 3 * math.pi / 4])

# task -> number of classes
VISION_TASKS: dict[str, int] = {
    "shape": 4,
    "color": 6,
    "quadrant": 4,
    "size": 3,
    "count": 4,
    "orientation": 4,
    "frequency": 3,
    "tint": 3,
}
SPLITS = {"train": 0, "dev": 1, "test": 2, "probe": 3, "calib": 4}


@dataclass(frozen=True)
class VisionZooSpec:
    """Everything that determines the vision zoo's weights; a changed spec rebuilds it."""

    seed: int = 0
    tasks: tuple[str, ...] = tuple(VISION_TASKS)
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 128
    patch: int = 4
    base_steps: int = 1500
    base_lr: float = 2e-3
    probe_examples: int = 32  # labelled examples per class for each head
    expert_steps: int = 400
    expert_lr: float = 1e-4
    batch: int = 64

    @classmethod
    def reduced(cls, seed: int = 0) -> VisionZooSpec:
        """A small zoo for tests (seconds)."""
        return cls(
            seed=seed, tasks=("shape", "color", "orientation"), hidden=32, layers=2,
            intermediate=64, base_steps=120, expert_steps=60, batch=32,
        )  # fmt: skip

    def digest(self) -> str:
        blob = json.dumps({"v": VISION_ZOO_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _gen(task: str, split: str, seed: int) -> torch.Generator:
    h = int(hashlib.sha256(f"{task}/{split}/{seed}".encode()).hexdigest()[:8], 16)
    return torch.Generator().manual_seed(h)


def _rand(g: torch.Generator, n: int) -> torch.Tensor:
    return torch.rand(n, generator=g)


def _choice(g: torch.Generator, n: int, k: int) -> torch.Tensor:
    return torch.randint(0, k, (n,), generator=g)


def render(
    g: torch.Generator,
    n: int,
    *,
    shape: torch.Tensor | None = None,
    color: torch.Tensor | None = None,
    size: torch.Tensor | None = None,
    count: torch.Tensor | None = None,
    quadrant: torch.Tensor | None = None,
    angle: torch.Tensor | None = None,
    freq: torch.Tensor | None = None,
    tint: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``n`` scenes, ``[n, 3, 16, 16]`` in [-1, 1], and every attribute drawn (as labels).

    Attributes not given are drawn at random. Objects past the first share its shape, colour
    and size; ``quadrant`` places the first object in that quadrant.
    """
    shape = _choice(g, n, 4) if shape is None else shape
    color = _choice(g, n, 6) if color is None else color
    size = _choice(g, n, 3) if size is None else size
    count = torch.ones(n, dtype=torch.long) if count is None else count
    angle = _choice(g, n, 4) if angle is None else angle
    freq = _choice(g, n, 3) if freq is None else freq
    tint = _choice(g, n, 3) if tint is None else tint
    yy, xx = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    th = ANGLES[angle][:, None, None]
    phase = _rand(g, n)[:, None, None] * 2 * math.pi
    wave = torch.sin(
        2 * math.pi * FREQS[freq][:, None, None] * (xx * torch.cos(th) + yy * torch.sin(th)) / SIZE
        + phase
    )
    base_tint = 0.15 + 0.1 * _rand(g, n * 3).reshape(n, 3)
    base_tint[torch.arange(n), tint] += 0.25  # the dominant background channel
    img = base_tint[:, :, None, None] * (1.0 + 0.6 * wave[:, None])
    multi = (count > 1)[:, None, None]
    r = RADII[size][:, None, None] * (0.9 + 0.2 * _rand(g, n)[:, None, None])
    rr = torch.where(multi, r.clamp_max(2.2), r)  # several objects: small, one per grid cell
    rgb = COLORS[color][:, :, None, None]
    cells = torch.tensor([[4.0, 4.0], [12.0, 4.0], [4.0, 12.0], [12.0, 12.0]])
    for k in range(4):
        lo = r[:, 0, 0] + 0.5
        cx = lo + _rand(g, n) * (SIZE - 2 * lo)
        cy = lo + _rand(g, n) * (SIZE - 2 * lo)
        if k == 0 and quadrant is not None:
            half = SIZE / 2
            span = (half - 2 * lo).clamp_min(0.0)
            cx = lo + _rand(g, n) * span + (quadrant % 2) * half
            cy = lo + _rand(g, n) * span + (quadrant // 2) * half
        jitter = (_rand(g, n * 2).reshape(2, n) - 0.5) * 2
        cx = torch.where(multi[:, 0, 0], cells[k, 0] + jitter[0], cx)
        cy = torch.where(multi[:, 0, 0], cells[k, 1] + jitter[1], cy)
        dx = xx - cx[:, None, None]
        dy = yy - cy[:, None, None]
        masks = torch.stack(
            [
                (dx.abs() <= rr * 0.85) & (dy.abs() <= rr * 0.85),
                dx.square() + dy.square() <= rr.square(),
                (dy >= -rr) & (dy <= rr) & (dx.abs() <= (dy + rr) / 2),
                ((dx.abs() <= rr / 3) & (dy.abs() <= rr))
                | ((dy.abs() <= rr / 3) & (dx.abs() <= rr)),
            ],
            1,
        )
        mask = masks[torch.arange(n), shape] & (k < count)[:, None, None]
        img = torch.where(mask[:, None], rgb, img)
    img = img + 0.08 * torch.randn(img.shape, generator=g)
    labels = {
        "shape": shape, "color": color, "size": size, "count": count - 1,
        "orientation": angle, "frequency": freq, "tint": tint,
    }  # fmt: skip
    if quadrant is not None:
        labels["quadrant"] = quadrant
    return {"pixel_values": (img.clamp(0, 1) * 2 - 1).contiguous(), **labels}


def task_data(task: str, split: str, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of ``task`` and their labels, the same for the same (task, split, seed)."""
    return _task_batch(task, _gen(task, split, seed), n)


def _task_batch(task: str, g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = _choice(g, n, VISION_TASKS[task])
    if task == "quadrant":
        d = render(g, n, quadrant=y, size=torch.zeros(n, dtype=torch.long))
    elif task == "count":
        d = render(g, n, count=y + 1)
    elif task == "shape":  # shapes need a few pixels to tell apart at 16×16
        d = render(g, n, shape=y, size=torch.full((n,), 2))
    else:
        key = {"orientation": "angle", "frequency": "freq"}.get(task, task)
        d = render(g, n, **{key: y})
    return d["pixel_values"], y


def pretrain_data(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pretraining objective, broad but coarse (as CLIP's is for its downstream tasks):
    scenes of every task, each asked one yes/no question about its attribute (is the class in
    the upper half of the task's classes). Returns images, targets and the mask of the
    question asked (one per row)."""
    tasks = list(VISION_TASKS)
    per = n // len(tasks)
    xs, ys, masks = [], [], []
    for i, task in enumerate(tasks):
        x, y = _task_batch(task, g, per)
        target = torch.zeros(per, len(tasks))
        target[:, i] = (y >= (VISION_TASKS[task] + 1) // 2).float()
        mask = torch.zeros(per, len(tasks))
        mask[:, i] = 1.0
        xs.append(x)
        ys.append(target)
        masks.append(mask)
    return torch.cat(xs), torch.cat(ys), torch.cat(masks)


class TaskModel(nn.Module):
    """A backbone and one task's head: logits from the CLS token's final feature."""

    def __init__(self, backbone: nn.Module, head: nn.Linear) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixel_values=pixel_values).last_hidden_state[:, 0]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def new_backbone(spec: VisionZooSpec) -> nn.Module:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=spec.hidden, num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        intermediate_size=spec.intermediate, image_size=SIZE, patch_size=spec.patch,
        num_channels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    cfg.architectures = ["ViTModel"]
    return ViTModel(cfg, add_pooling_layer=False)


def load_backbone(folder: Path) -> nn.Module:
    from transformers import ViTModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    return ViTModel.from_pretrained(folder, add_pooling_layer=False).eval()


def load_head(path: Path) -> nn.Linear:
    from safetensors.torch import load_file

    t = load_file(str(path))
    head = nn.Linear(t["weight"].shape[1], t["weight"].shape[0])
    head.load_state_dict(t)
    return head.requires_grad_(False)


@torch.no_grad()
def accuracy(model: TaskModel, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    pred = torch.cat([model(x).argmax(-1) for x in images.split(500)])
    return 100.0 * float((pred == labels).float().mean())


def _log(msg: str) -> None:
    print(f"[vision zoo] {msg}", file=sys.stderr, flush=True)


def build_vision_zoo(root: Path, spec: VisionZooSpec | None = None, force: bool = False) -> Path:
    """Build (or reuse) the vision zoo for ``spec`` under ``root/<digest>``; returns the folder."""
    spec = spec or VisionZooSpec()
    out = root / f"vision-{spec.digest()}"
    if (out / "zoo.json").is_file() and not force:
        return out
    torch.manual_seed(spec.seed)
    tmp = root / f".vision-{spec.digest()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.time()
    backbone = new_backbone(spec)
    _pretrain(backbone, spec)
    backbone.save_pretrained(tmp / "base")
    _log(f"pretrained backbone ({sum(p.numel() for p in backbone.parameters())} params) "
         f"in {time.time() - t0:.0f} s")  # fmt: skip
    scores: dict[str, dict[str, float]] = {}
    from safetensors.torch import save_file

    (tmp / "heads").mkdir()
    (tmp / "calib").mkdir()
    base_state = {k: v.clone() for k, v in backbone.state_dict().items()}
    for task in spec.tasks:
        backbone.load_state_dict(base_state)
        head = _probe(backbone, task, spec)
        save_file({k: v.contiguous() for k, v in head.state_dict().items()},
                  str(tmp / "heads" / f"{task}.safetensors"))  # fmt: skip
        x_test, y_test = task_data(task, "test", 500, spec.seed)
        before = accuracy(TaskModel(backbone, head), x_test, y_test)
        _finetune(backbone, head, task, spec)
        after = accuracy(TaskModel(backbone, head), x_test, y_test)
        backbone.save_pretrained(tmp / "experts" / task)
        x_cal, _ = task_data(task, "calib", 256, spec.seed)
        save_file({"pixel_values": x_cal}, str(tmp / "calib" / f"{task}.safetensors"))
        scores[task] = {"pretrained": before, "expert": after}
        _log(f"{task}: pretrained+head {before:.1f} -> expert {after:.1f}")
    (tmp / "zoo.json").write_text(
        json.dumps(
            {"version": VISION_ZOO_VERSION, "spec": asdict(spec), "scores": scores}, indent=1
        )
    )
    if out.exists():
        shutil.rmtree(out)
    publish(tmp, out)
    _log(f"built in {time.time() - t0:.0f} s: {out}")
    return out


def _pretrain(backbone: nn.Module, spec: VisionZooSpec) -> None:
    head = nn.Linear(spec.hidden, len(VISION_TASKS))
    model = TaskModel(backbone, head).train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.base_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, spec.base_lr, total_steps=spec.base_steps)
    g = torch.Generator().manual_seed(spec.seed * 1000 + 7)
    for _ in range(spec.base_steps):
        x, y, mask = pretrain_data(spec.batch * 2, g)
        bce = nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="none")
        loss = (bce * mask).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    backbone.eval()


def _probe(backbone: nn.Module, task: str, spec: VisionZooSpec) -> nn.Linear:
    """A linear probe of the frozen backbone on ``probe_examples`` labelled images per class."""
    k = VISION_TASKS[task]
    x, y = task_data(task, "probe", spec.probe_examples * k, spec.seed)
    with torch.no_grad():
        f = TaskModel(backbone, nn.Identity()).features(x)  # type: ignore[arg-type]
    head = nn.Linear(spec.hidden, k)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        loss = nn.functional.cross_entropy(head(f), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.requires_grad_(False)


def _finetune(backbone: nn.Module, head: nn.Linear, task: str, spec: VisionZooSpec) -> None:
    model = TaskModel(backbone, head).train()
    opt = torch.optim.AdamW(backbone.parameters(), lr=spec.expert_lr, weight_decay=0.0)
    x, y = task_data(task, "train", spec.expert_steps * spec.batch, spec.seed)
    for i in range(spec.expert_steps):
        sl = slice(i * spec.batch, (i + 1) * spec.batch)
        loss = nn.functional.cross_entropy(model(x[sl]), y[sl])
        opt.zero_grad()
        loss.backward()
        opt.step()
    backbone.eval()
