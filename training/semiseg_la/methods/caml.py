"""CAML: Correlation-Aware Mutual Learning (Gao et al., MICCAI 2023; docs/methods.md 2, docs/methods/caml.md).

Two sub-networks (V: V-Net; A: V-Net encoder with Cross-sample Mutual Attention and a trilinear
decoder) learn from each other:

    L = 0.5 L_s + lambda_c(t) L_c + lambda_o(t) L_o,   t = iteration // 150 (sigmoid ramp-up of R)

- L_s: MC-Net Dice on the labelled samples, for both sub-networks;
- L_c: MSE between each sub-network's softmax and the other's sharpened softmax (T = 0.1), all samples;
- L_o: Omni-Correlation Consistency. Labelled voxels both sub-networks get right feed a memory of
  projected features; unlabelled voxels on which they agree (top-K most confident per class) are
  compared with 256 memory features per class, and A's correlation rows teach V's (cross-entropy).

Project defaults fix the official code's bugs (docs/methods.md 7, C1-C3), each with a switch back to
the official behaviour; the memory bank is a bounded, device-side subsample (C5).
Inference and export use sub-network V alone (a plain V-Net).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models.caml import CamlHeads, SubNetworkA, SubNetworkV
from .base import Batch, Method, StepResult, check_param_names, unwrap
from .losses import consistency_weight, dice_loss_linear

NUM_CLASSES = 2

DEFAULTS: Dict[str, Any] = {
    "dropout": True,
    "supervised_weight": 0.5,          # lambda
    "consistency": 1.0,                # lambda_c
    "occ_weight": 0.05,                # lambda_o
    "consistency_rampup": 40.0,        # R, in units of 150 iterations (40 / 20 / 15 for 4 / 8 / 16 labels)
    "rampup_unit": 150,                # iterations per ramp-up unit (1 for a short fine-tune)
    "sharpen_temperature": 0.1,
    "embedding_dim": 32,               # d: the width the released runs really used (C4)
    "memory_per_class": 256,
    "num_filtered": 12800,
    "occ_temperature": 0.1,
    "memory_slots": None,              # None: labeled_num when given, else 8 (one slot per labelled case)
    "memory_keep_fraction": 1.0 / 32,  # uniform fraction of each sample's correct voxels kept, per class
    "memory_min_keep": 256,            # ... but at least this many per class (all when fewer)
    "detach_consistency_target": True,   # C2; False = official (gradient through the sharpened target)
    "detach_correlation_target": True,   # C3; False = official (gradient through A's correlation)
    "memory_flatten": "voxel",           # C1; "official" = the channel-first flattening of e_a
    "occ_head_rows": "agreeing",         # heads (and their BatchNorm statistics) on all agreeing voxels as
                                         # in the official code; "selected" = only the top-K rows (cheaper)
    "cma_heads": 4,
    "cma_ffn": 512,
    "cma_dropout": 0.5,
}


# -- losses ---------------------------------------------------------------------------------------
def sharpen(prob: torch.Tensor, temperature: float) -> torch.Tensor:
    """P^(1/T) / (P^(1/T) + (1 - P)^(1/T)), element-wise."""
    power = 1.0 / temperature
    high, low = prob ** power, (1.0 - prob) ** power
    return high / (high + low)


def mutual_consistency(prob_v: torch.Tensor, prob_a: torch.Tensor, temperature: float,
                       detach_target: bool = True) -> torch.Tensor:
    """MSE(p_v, sharpen(p_a)) + MSE(p_a, sharpen(p_v)); targets detached unless official (C2)."""
    target_a, target_v = sharpen(prob_a, temperature), sharpen(prob_v, temperature)
    if detach_target:
        target_a, target_v = target_a.detach(), target_v.detach()
    return F.mse_loss(prob_v, target_a) + F.mse_loss(prob_a, target_v)


def occ_loss(query_v: torch.Tensor, query_a: torch.Tensor, query_labels: torch.Tensor,
             memory: List[Optional[torch.Tensor]], temperature: float = 0.1,
             detach_target: bool = True) -> Optional[torch.Tensor]:
    """Omni-correlation consistency, or None when no correlation can be formed.

    Rows of a class with fewer than two queries and memory blocks with fewer than two rows are left
    out. For each kept query n: C^s_n = softmax_m(z^s_n . mu_m / tau) over every memory row m (raw dot
    products); L = mean_n sum_m -C^a_{n,m} log(C^v_{n,m} + 1e-8), C^a detached unless official (C3).
    """
    blocks = [m for m in memory if m is not None and m.shape[0] > 1]
    if not blocks:
        return None
    counts = torch.bincount(query_labels, minlength=NUM_CLASSES)
    keep = counts[query_labels] > 1
    if not bool(keep.any()):
        return None
    bank = torch.cat(blocks).float()
    with torch.autocast(query_v.device.type, enabled=False):  # raw dot products / 0.1: keep float32
        corr_v = torch.softmax(query_v[keep].float() @ bank.T / temperature, dim=1)
        corr_a = torch.softmax(query_a[keep].float() @ bank.T / temperature, dim=1)
        if detach_target:
            corr_a = corr_a.detach()
        return (-corr_a * torch.log(corr_v + 1e-8)).sum(dim=1).mean()


def select_confident(labels: torch.Tensor, confidence: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` most confident rows of each class, class 0 block first (OCC filtering)."""
    picked = []
    for c in range(NUM_CLASSES):
        ids = torch.nonzero(labels == c).squeeze(1)
        if ids.numel():
            top = torch.topk(confidence[ids], min(k, ids.numel())).indices
            picked.append(ids[top])
    return torch.cat(picked) if picked else labels.new_zeros(0)


# -- voxel rows of (B, C, X, Y, Z) embeddings ------------------------------------------------------
def voxel_rows(embedding: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(n, C) feature vectors of the voxels at flat (B, X, Y, Z) positions `index`."""
    flat = embedding.flatten(2)  # (B, C, V), a view
    voxels = flat.shape[2]
    return flat[index // voxels, :, index % voxels]


def official_rows(embedding: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of the channel-first tensor read as (B*C*V/C, C): the official memory write of e_a (C1),
    whose rows are runs of C consecutive z-values of one channel, not per-voxel features."""
    return embedding.reshape(-1, embedding.shape[1])[index]


# -- the labelled-feature memory ---------------------------------------------------------------------
class FeatureMemory:
    """Device-side memory of labelled features: a ring of `slots` entries, one per written sample.

    The official bank keeps every correct voxel of every labelled case (about 1 M x 32 floats each) on
    CPU and concatenates all of them every step. Here each written sample keeps, per class c, a uniform
    random subset of k_c = min(n_c, max(ceil(q n_c), min_keep)) of its n_c correct voxels, each row
    weighted n_c / k_c, and `sample` draws rows with probability proportional to that weight (Gumbel
    top-k, without replacement). That matches the official uniform draw over all correct voxels in
    distribution, while a slot holds at most ceil(q V) + 2 (min_keep + 1) rows.
    """

    def __init__(self, slots: int, keep_fraction: float, min_keep: int) -> None:
        if slots < 1 or not 0 < keep_fraction <= 1 or min_keep < 0:
            raise ConfigError("CAML memory: memory_slots >= 1, 0 < memory_keep_fraction <= 1, "
                              "memory_min_keep >= 0 required")
        self.slots, self.keep_fraction, self.min_keep = slots, keep_fraction, min_keep
        self.features: Optional[torch.Tensor] = None  # (slots, rows, d)
        self.labels: Optional[torch.Tensor] = None    # (slots, rows) int8, -1 = empty
        self.weights: Optional[torch.Tensor] = None   # (slots, rows) voxels each row stands for
        self.next_slot = 0
        self.voxels = 0

    def capacity(self, voxels: int) -> int:
        return math.ceil(self.keep_fraction * voxels) + NUM_CLASSES * (self.min_keep + 1)

    def choose(self, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Positions (into `labels`) of the rows to keep and their weights, per class."""
        positions, weights = [], []
        for c in range(NUM_CLASSES):
            ids = torch.nonzero(labels == c).squeeze(1)
            n = ids.numel()
            if n == 0:
                continue
            k = min(n, max(math.ceil(self.keep_fraction * n), self.min_keep))
            positions.append(ids[torch.randperm(n, device=ids.device)[:k]])
            weights.append(torch.full((k,), n / k, device=ids.device))
        if not positions:
            return labels.new_zeros(0), torch.zeros(0, device=labels.device)
        return torch.cat(positions), torch.cat(weights)

    def write(self, features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, voxels: int) -> None:
        """Overwrite the oldest slot with one sample's chosen rows (features detached, on their device)."""
        if self.features is None or voxels != self.voxels or self.features.shape[2] != features.shape[1] \
                or self.features.device != features.device:
            self._allocate(voxels, features.shape[1], features.device)
        rows = features.shape[0]
        if rows > self.features.shape[1]:
            raise ValueError(f"CAML memory: {rows} rows exceed the slot capacity {self.features.shape[1]}")
        slot = self.next_slot
        self.features[slot, :rows] = features.detach().float()
        self.labels[slot] = -1
        self.labels[slot, :rows] = labels.to(torch.int8)
        self.weights[slot] = 0
        self.weights[slot, :rows] = weights.float()
        self.next_slot = (slot + 1) % self.slots

    def _allocate(self, voxels: int, dim: int, device: torch.device) -> None:
        rows = self.capacity(voxels)
        self.voxels = voxels
        self.features = torch.zeros(self.slots, rows, dim, device=device)
        self.labels = torch.full((self.slots, rows), -1, dtype=torch.int8, device=device)
        self.weights = torch.zeros(self.slots, rows, device=device)
        self.next_slot = 0

    def sample(self, per_class: int) -> List[Optional[torch.Tensor]]:
        """Per class, `per_class` rows drawn without replacement, or None when fewer are stored."""
        if self.features is None:
            return [None] * NUM_CLASSES
        labels, weights = self.labels.reshape(-1), self.weights.reshape(-1)
        features = self.features.reshape(-1, self.features.shape[2])
        out: List[Optional[torch.Tensor]] = []
        for c in range(NUM_CLASSES):
            ids = torch.nonzero(labels == c).squeeze(1)
            if ids.numel() < max(per_class, 1):
                out.append(None)
                continue
            gumbel = -torch.log(-torch.log(torch.rand(ids.numel(), device=ids.device).clamp_min(1e-20)))
            keys = torch.log(weights[ids]) + gumbel
            out.append(features[ids[torch.topk(keys, per_class).indices]])
        return out

    def stored_rows(self) -> int:
        return 0 if self.labels is None else int((self.labels >= 0).sum())

    def nbytes(self) -> int:
        if self.features is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.features, self.labels, self.weights))

    def state_dict(self) -> Dict[str, Any]:
        state: Dict[str, Any] = {"next_slot": self.next_slot, "voxels": self.voxels}
        if self.features is not None:
            state.update(features=self.features, labels=self.labels, weights=self.weights)
        return state

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        if "features" not in state:
            self.features = self.labels = self.weights = None
        else:
            self.features = state["features"].to(device)
            self.labels = state["labels"].to(device)
            self.weights = state["weights"].to(device)
            if self.features.shape[0] != self.slots:
                raise ConfigError(f"CAML memory: checkpoint has {self.features.shape[0]} slots, the run "
                                  f"{self.slots}; resume with the same memory_slots")
        self.next_slot = int(state.get("next_slot", 0))
        self.voxels = int(state.get("voxels", 0))


# -- the method --------------------------------------------------------------------------------------
class Caml(Method):
    name = "caml"
    trainable = ("net_v", "net_a", "heads")
    networks = ("net_v", "net_a", "heads")

    def __init__(self, params: Mapping[str, Any], max_iterations: int) -> None:
        super().__init__({**DEFAULTS, **params}, max_iterations)
        p = self.params
        self._check_params()
        in_channels, dropout = int(p.get("in_channels", 1)), bool(p["dropout"])
        self.net_v = SubNetworkV(in_channels, NUM_CLASSES, has_dropout=dropout)
        self.net_a = SubNetworkA(in_channels, NUM_CLASSES, has_dropout=dropout, cma_heads=int(p["cma_heads"]),
                                 cma_ffn=int(p["cma_ffn"]), cma_dropout=float(p["cma_dropout"]))
        self.heads = CamlHeads(16, int(p["embedding_dim"]))
        slots = p["memory_slots"] or p.get("labeled_num") or 8
        self.memory = FeatureMemory(int(slots), float(p["memory_keep_fraction"]), int(p["memory_min_keep"]))

    def _check_params(self) -> None:
        p = self.params
        check_param_names(self.name, p, (*DEFAULTS, "labeled_num"))
        if p["memory_flatten"] not in ("voxel", "official"):
            raise ConfigError(f"CAML memory_flatten must be 'voxel' or 'official', got {p['memory_flatten']!r}")
        if p["occ_head_rows"] not in ("agreeing", "selected"):
            raise ConfigError(f"CAML occ_head_rows must be 'agreeing' or 'selected', got {p['occ_head_rows']!r}")

    # -- one batch ----------------------------------------------------------------------------
    def training_step(self, batch: Batch, iteration: int) -> StepResult:
        p = self.params
        logits_v, emb_v = self.net_v(batch.image)
        logits_a, emb_a = self.net_a(batch.image)
        prob_v, prob_a = torch.softmax(logits_v.float(), dim=1), torch.softmax(logits_a.float(), dim=1)
        lab = batch.labeled
        target = batch.label[lab] == 1
        loss_s = dice_loss_linear(prob_v[lab, 1], target) + dice_loss_linear(prob_a[lab, 1], target)
        loss_c = mutual_consistency(prob_v, prob_a, float(p["sharpen_temperature"]),
                                    bool(p["detach_consistency_target"]))
        loss_o, occ_logs = self.omni_correlation(batch, prob_v, prob_a, emb_v, emb_a)
        # the official loop counts iterations from 1 when it evaluates the ramps
        unit = int(p["rampup_unit"])
        weight_c = consistency_weight(float(p["consistency"]), iteration + 1, float(p["consistency_rampup"]), unit)
        weight_o = consistency_weight(float(p["occ_weight"]), iteration + 1, float(p["consistency_rampup"]), unit)
        loss = float(p["supervised_weight"]) * loss_s + weight_c * loss_c + weight_o * loss_o
        logs = {"loss_s": float(loss_s.detach()), "loss_c": float(loss_c.detach()),
                "loss_o": float(loss_o.detach()), "weight_c": weight_c, "weight_o": weight_o, **occ_logs}
        return StepResult(loss, logs)

    def omni_correlation(self, batch: Batch, prob_v: torch.Tensor, prob_a: torch.Tensor, emb_v: torch.Tensor,
                         emb_a: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, float]]:
        """Write the memory from the labelled half, read it, correlate the unlabelled half (L_o)."""
        p = self.params
        lab, unl = batch.labeled, batch.unlabeled
        pred_v, pred_a = prob_v.argmax(dim=1), prob_a.argmax(dim=1)
        truth = batch.label[lab]
        correct = (pred_v[lab] == truth) & (pred_a[lab] == truth)
        self.write_memory(emb_v[lab], emb_a[lab], truth, correct)
        memory = self.memory.sample(int(p["memory_per_class"]))
        confidence, pseudo = prob_v[unl].max(dim=1)
        agree = torch.nonzero((pseudo == pred_a[unl]).reshape(-1)).squeeze(1)
        labels, conf = pseudo.reshape(-1)[agree], confidence.reshape(-1)[agree].detach()
        chosen = select_confident(labels, conf, int(p["num_filtered"]))
        if p["occ_head_rows"] == "selected":
            index = agree[chosen]
            query_v, query_a = self.heads(voxel_rows(emb_v[unl], index), voxel_rows(emb_a[unl], index))
        else:
            query_v, query_a = self.heads(voxel_rows(emb_v[unl], agree), voxel_rows(emb_a[unl], agree))
            if query_v.shape[0]:  # the heads return no query for fewer than 2 rows (BatchNorm1d)
                query_v, query_a = query_v[chosen], query_a[chosen]
        loss = None
        if query_v.shape[0]:
            loss = occ_loss(query_v, query_a, labels[chosen], memory, float(p["occ_temperature"]),
                            bool(p["detach_correlation_target"]))
        logs = {"occ_rows": float(chosen.numel()), "memory_rows": float(self.memory.stored_rows()),
                "occ_available": float(loss is not None)}
        if loss is None:  # zero, but keeps the heads in the graph (DDP sees every parameter used)
            loss = (query_v.sum() + query_a.sum()) * 0.0
        return loss, logs

    @torch.no_grad()
    def write_memory(self, emb_v: torch.Tensor, emb_a: torch.Tensor, truth: torch.Tensor,
                     correct: torch.Tensor) -> None:
        """Store a subsample of each labelled sample's correct voxels, projected with the heads in eval
        mode (running BatchNorm statistics), as (g_v(e_v) + g_a(e_a)) / 2 with its ground-truth class."""
        heads = unwrap(self.heads)
        was_training = heads.training
        heads.eval()
        voxels = truth[0].numel()
        rows_a = official_rows if self.params["memory_flatten"] == "official" else voxel_rows
        try:
            for i in range(truth.shape[0]):
                where = torch.nonzero(correct[i].reshape(-1)).squeeze(1)
                labels = truth[i].reshape(-1)[where]
                positions, weights = self.memory.choose(labels)
                index = where[positions]
                feats = heads.memory_features(voxel_rows(emb_v[i:i + 1], index), rows_a(emb_a[i:i + 1], index))
                self.memory.write(feats.float(), labels[positions], weights, voxels)
        finally:
            heads.train(was_training)

    # -- engine hooks -------------------------------------------------------------------------
    def inference_network(self) -> nn.Module:
        """Sub-network V's plain V-Net (CMA and sub-network A are training-only)."""
        return unwrap(self.net_v).vnet

    def extra_state(self) -> Dict[str, Any]:
        return {"memory": self.memory.state_dict()}

    def load_extra_state(self, state: Mapping[str, Any]) -> None:
        if "memory" in state:
            device = next(unwrap(self.net_v).parameters()).device
            self.memory.load_state_dict(state["memory"], device)

    @property
    def ddp_find_unused_parameters(self) -> bool:
        """With C3's detach, A's projection and prediction heads get no gradient once the memory holds rows,
        so DDP must expect parameters without gradients (it stops with "Expected to have finished reduction"
        otherwise)."""
        return bool(self.params["detach_correlation_target"])

    def load_initial_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Fine-tuning from a V-Net: V takes it strictly; A takes its encoder and every decoder tensor
        whose name and shape match (its trilinear up-layers and the CMA keep their initialisation)."""
        unwrap(self.net_v).vnet.load_state_dict(state_dict, strict=True)
        net_a = unwrap(self.net_a)
        encoder = {k[len("encoder."):]: v for k, v in state_dict.items() if k.startswith("encoder.")}
        net_a.encoder.load_state_dict(encoder, strict=True)
        own = net_a.decoder.state_dict()
        decoder = {k[len("decoder."):]: v for k, v in state_dict.items() if k.startswith("decoder.")}
        own.update({k: v for k, v in decoder.items() if k in own and own[k].shape == v.shape})
        net_a.decoder.load_state_dict(own, strict=True)
