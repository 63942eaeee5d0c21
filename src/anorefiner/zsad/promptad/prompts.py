"""PromptAD's prompt learner, its text features and its three losses (``FuNz-0/PromptAD@0f86ce0``).

Prompts (``PromptAD/model.py`` PromptLearner l.28-155, ``PromptAD/ad_prompts.py``):

* ``n_pro`` normal prompts ``[SOS] N_1..N_{n_ctx} <class>. [EOS]``: ``n_ctx`` learned normal context vectors
  per prompt (``normal_ctx [n_pro, n_ctx, D]``, initialised N(0, 0.02));
* handcrafted abnormal prompts (semantic concatenation): every state of the 8 generic ones plus the class's own
  (``state_anomaly + class_state_abnormal[class]``), each with every normal context:
  ``[SOS] N.. <state filled with the class>. [EOS]``, state-major (``n_pro`` per state);
* learned abnormal prompts ``[SOS] N.. A_1..A_{n_ctx_ab} <class>. [EOS]``: ``n_pro_ab x n_pro`` of them, prompt j
  holding normal context ``j mod n_pro`` and abnormal context ``j mod n_pro_ab`` (model.py l.139-140 expand the
  two banks in opposite orders).

Text features (``model.py`` build_text_feature_gallery l.255-288, version V1): the mean of the *un-normalised*
normal features and the mean of the un-normalised abnormal ones (handcrafted then learned), each L2-normalised.

Losses (``train_cls.py`` l.69-110, ``train_seg.py`` l.68-109; ``PromptAD/__init__.py`` TripletLoss):
``CE(scale x [f . n_anchor, f . a_k], target 0) + triplet(f, n_anchor, a_anchor) + lambda1 x match``, where the
anchors are the L2-normalised means of the normal and abnormal features, ``a_k`` the normalised abnormal
features, ``scale`` CLIP's *raw* ``logit_scale`` parameter (model.py l.299 and train_*.py use it without
``exp``, ~4.6 for trained CLIPs), the triplet term ``mean(relu(sum_dim1 (f - p)^2 - sum_dim1 (f - n)^2 + margin))``
summed over dimension 1 as written (the channels for image features ``[N, D]``, the *tokens* for token features
``[N, L, D]``), and ``match = ||mean(norm(handcrafted)) - mean(norm(learned))||^2``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backbones.clip_prompting import encode_text_embeddings, eot_index, token_embeddings, tokenize

#: ``ad_prompts.py`` class_mapping: the words used for a category folder name
CLASS_MAPPING = {"macaroni1": "macaroni", "macaroni2": "macaroni", "pcb1": "printed circuit board",
                 "pcb2": "printed circuit board", "pcb3": "printed circuit board", "pcb4": "printed circuit board",
                 "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut"}
#: ``ad_prompts.py`` state_anomaly: the generic abnormal states
GENERIC_STATES = ("damaged {}", "flawed {}", "abnormal {}", "imperfect {}", "blemished {}", "{} with flaw",
                  "{} with defect", "{} with damage")
#: ``ad_prompts.py`` class_state_abnormal: each category's own states (spelling kept as published)
CLASS_STATES = {
    "bottle": ("{} with large breakage", "{} with small breakage", "{} with contamination"),
    "toothbrush": ("{} with defect", "{} with anomaly"),
    "carpet": ("{} with hole", "{} with color stain", "{} with metal contamination", "{} with thread residue",
               "{} with thread", "{} with cut"),
    "hazelnut": ("{} with crack", "{} with cut", "{} with hole", "{} with print"),
    "leather": ("{} with color stain", "{} with cut", "{} with fold", "{} with glue", "{} with poke"),
    "cable": ("{} with bent wire", "{} with missing part", "{} with missing wire", "{} with cut", "{} with poke"),
    "capsule": ("{} with crack", "{} with faulty imprint", "{} with poke", "{} with scratch",
                "{} squeezed with compression"),
    "grid": ("{} with breakage", "{} with thread residue", "{} with thread", "{} with metal contamination",
             "{} with glue", "{} with a bent shape"),
    "pill": ("{} with color stain", "{} with contamination", "{} with crack", "{} with faulty imprint",
             "{} with scratch", "{} with abnormal type"),
    "transistor": ("{} with bent lead", "{} with cut lead", "{} with damage", "{} with misplaced transistor"),
    "metal_nut": ("{} with a bent shape ", "{} with color stain", "{} with a flipped orientation", "{} with scratch"),
    "screw": ("{} with manipulated front", "{} with scratch neck", "{} with scratch head"),
    "zipper": ("{} with broken teeth", "{} with fabric border", "{} with defect fabric", "{} with broken fabric",
               "{} with split teeth", "{} with squeezed teeth"),
    "tile": ("{} with crack", "{} with glue strip", "{} with gray stroke", "{} with oil", "{} with rough surface"),
    "wood": ("{} with color stain", "{} with hole", "{} with scratch", "{} with liquid"),
    "candle": ("{} with melded wax", "{} with foreign particals", "{} with extra wax", "{} with chunk of wax missing",
               "{} with weird candle wick", "{} with damaged corner of packaging", "{} with different colour spot"),
    "capsules": ("{} with scratch", "{} with discolor", "{} with misshape", "{} with leak", "{} with bubble"),
    "cashew": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
               "{} with spot"),
    "chewinggum": ("{} with corner missing", "{} with scratches", "{} with chunk of gum missing",
                   "{} with colour spot", "{} with cracks"),
    "fryum": ("{} with breakage", "{} with scratches", "{} with burnt", "{} with colour spot",
              "{} with fryum stuck together", "{} with colour spot"),
    "macaroni1": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "macaroni2": ("{} with color spot", "{} with small chip around edge", "{} with small scratches",
                  "{} with breakage", "{} with cracks"),
    "pcb1": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb2": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb3": ("{} with bent", "{} with scratch", "{} with missing", "{} with melt"),
    "pcb4": ("{} with scratch", "{} with extra", "{} with missing", "{} with wrong place", "{} with damage",
             "{} with burnt", "{} with dirt"),
    "pipe_fryum": ("{} with breakage", "{} with small scratches", "{} with burnt", "{} with stuck together",
                   "{} with colour spot", "{} with cracks"),
}


class PromptLearner(torch.nn.Module):
    """PromptAD's learned context vectors and the fixed token embeddings around them (one learner = one task)."""

    def __init__(self, backbone, category: str, n_pro: int, n_ctx: int = 4, n_pro_ab: int = 4, n_ctx_ab: int = 1,
                 seed: int = 111):
        super().__init__()
        if min(n_pro, n_ctx, n_pro_ab, n_ctx_ab) < 1:
            raise ValueError(f"promptad: prompt counts must be >= 1 (n_pro {n_pro}, n_ctx {n_ctx}, "
                             f"n_pro_ab {n_pro_ab}, n_ctx_ab {n_ctx_ab})")
        states = GENERIC_STATES + CLASS_STATES.get(category, ())  # a category outside MVTec AD/VisA: generic only
        name = CLASS_MAPPING.get(category, category)
        dim = int(backbone.model.token_embedding.weight.shape[1])
        gen = torch.Generator().manual_seed(int(seed))
        self.normal_ctx = torch.nn.Parameter(torch.randn(n_pro, n_ctx, dim, generator=gen) * 0.02)
        self.abnormal_ctx = torch.nn.Parameter(torch.randn(n_pro_ab, n_ctx_ab, dim, generator=gen) * 0.02)
        self.n_pro, self.n_ctx, self.n_pro_ab, self.n_ctx_ab = n_pro, n_ctx, n_pro_ab, n_ctx_ab
        lead = " ".join(["N"] * n_ctx)
        texts = {"normal": [f"{lead} {name}."] * n_pro,
                 "handle": [f"{lead} {s.format(name)}." for s in states for _ in range(n_pro)],
                 "learned": [f"{lead} {' '.join(['A'] * n_ctx_ab)} {name}."] * (n_pro_ab * n_pro)}
        self.n_states = len(states)
        for key, sentences in texts.items():
            tokens = tokenize(backbone, sentences)
            n_learned = n_ctx + (n_ctx_ab if key == "learned" else 0)
            slots = tokens[:, 1 : 1 + n_learned]
            words = torch.tensor([int(tokens[0, 1])] * n_ctx + [int(tokens[0, n_learned])] * (n_learned - n_ctx))
            if not bool((slots == words.to(slots.device)).all()):
                raise ValueError(f"promptad: the {n_learned} placeholder words of {sentences[0]!r} are not one token "
                                 f"each for this tokenizer")
            with torch.no_grad():
                emb = token_embeddings(backbone, tokens).float().cpu()
            self.register_buffer(f"{key}_prefix", emb[:, :1], persistent=False)
            self.register_buffer(f"{key}_suffix", emb[:, 1 + n_learned:], persistent=False)
            self.register_buffer(f"{key}_eot", eot_index(tokens).cpu(), persistent=False)
        self.backbone = [backbone]  # not a submodule: the frozen CLIP stays out of parameters() and state_dict()

    def forward(self) -> dict[str, torch.Tensor]:
        """Token embeddings ``[T, 77, D]`` of the normal, handcrafted abnormal and learned abnormal prompts."""
        p, ab = self.n_pro, self.n_pro_ab
        normal = torch.cat([self.normal_prefix, self.normal_ctx, self.normal_suffix], 1)
        handle_ctx = self.normal_ctx.repeat(self.n_states, 1, 1)  # prompt i: context i mod n_pro
        handle = torch.cat([self.handle_prefix, handle_ctx, self.handle_suffix], 1)
        j = torch.arange(p * ab, device=self.normal_ctx.device)
        learned = torch.cat([self.learned_prefix, self.normal_ctx[j % p], self.abnormal_ctx[j % ab],
                             self.learned_suffix], 1)
        return {"normal": normal, "handle": handle, "learned": learned}

    def encode(self) -> dict[str, torch.Tensor]:
        """Un-normalised text features ``[T, D']`` of the three prompt groups (gradients reach the contexts)."""
        bb = self.backbone[0]
        return {k: encode_text_embeddings(bb, x.to(bb.device), getattr(self, f"{k}_eot"))
                for k, x in self.forward().items()}


def text_features(feats: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[2, D']`` (normal, abnormal): means of the un-normalised features, L2-normalised (version V1)."""
    abnormal = torch.cat([feats["handle"], feats["learned"]], 0)
    return F.normalize(torch.stack([feats["normal"].mean(0), abnormal.mean(0)]), dim=-1)


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.0):
    """``PromptAD/__init__.py`` TripletLoss: squared distances summed over dimension 1, relu, mean."""
    pos = (anchor - positive).pow(2).sum(dim=1)
    neg = (anchor - negative).pow(2).sum(dim=1)
    return torch.relu(pos - neg + margin).mean()


def prompt_loss(image_feats: torch.Tensor, feats: dict[str, torch.Tensor], scale, lambda1: float,
                margin: float = 0.0) -> torch.Tensor:
    """The training loss of one batch: ``image_feats`` L2-normalised ``[N, D']`` (class embeddings, ``cls``
    learner) or ``[N, L, D']`` (token features, ``seg`` learner), ``feats`` from :meth:`PromptLearner.encode`."""
    abnormal = torch.cat([feats["handle"], feats["learned"]], 0)
    match = (F.normalize(feats["handle"], dim=-1).mean(0) - F.normalize(feats["learned"], dim=-1).mean(0)).norm() ** 2
    n_anchor = F.normalize(feats["normal"].mean(0, keepdim=True), dim=-1)
    a_anchor = F.normalize(abnormal.mean(0, keepdim=True), dim=-1)
    logits = torch.cat([image_feats @ n_anchor.T, image_feats @ F.normalize(abnormal, dim=-1).T], -1) * scale
    target = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    v2t = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return v2t + triplet(image_feats, n_anchor, a_anchor, margin) + lambda1 * match
