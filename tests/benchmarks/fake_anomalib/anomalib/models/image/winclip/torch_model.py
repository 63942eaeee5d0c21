"""WinClipModel on the project's tiny CLIP (3x3 grid at 42 px): window embeddings, harmonic aggregation, class and
visual-association scores, one window and one patch at a time (the fake anomalib, see anomalib/__init__.py)."""

from collections import namedtuple

import torch
import torch.nn.functional as F

InferenceBatch = namedtuple("InferenceBatch", "pred_score anomaly_map")


class WinClipModel(torch.nn.Module):
    def __init__(self, scales=(2, 3), apply_transform=False):
        super().__init__()
        import open_clip.factory

        from anorefiner.backbones.clip_vit import register_tiny_clip

        weights = open_clip.factory.download_pretrained({}, cache_dir=None)  # the parity shim's local file
        self.clip = open_clip.create_model(register_tiny_clip(), pretrained=weights).eval()
        self.tokenizer = open_clip.get_tokenizer(register_tiny_clip())
        self.scales, self.grid = scales, 3
        self.windows = [[[(i + a) * 3 + j + b for a in range(k) for b in range(k)] for i in range(4 - k)
                         for j in range(4 - k)] for k in scales]

    def setup(self, class_name, reference_images=None):
        from anorefiner.zsad.prompts import APRIL_NORMAL, WINCLIP_ABNORMAL, WINCLIP_TEMPLATES

        groups = []
        for states in (APRIL_NORMAL, WINCLIP_ABNORMAL):
            sentences = [t.format(s.format(class_name)) for s in states for t in WINCLIP_TEMPLATES]
            groups.append(self.clip.encode_text(self.tokenizer(sentences)).mean(0))
        self.text_embeddings = torch.stack(groups)
        self.references = None if reference_images is None else self.encode_image(reference_images)

    def _run(self, tokens):
        v = self.clip.visual
        return v.ln_post(v.transformer(v.ln_pre(tokens)))  # open_clip 3.x: batch first

    def encode_image(self, batch):
        v = self.clip.visual
        x = v.conv1(batch).flatten(2).transpose(1, 2)
        seq = torch.cat([v.class_embedding.expand(len(x), 1, -1), x], 1) + v.positional_embedding
        full = self._run(seq)
        windows = [torch.stack([self._run(seq[:, [0] + [1 + p for p in w]])[:, 0] @ v.proj for w in scale], 1)
                   for scale in self.windows]
        return full[:, 0] @ v.proj, windows, full[:, 1:]

    def _class_score(self, e):
        cos = F.normalize(e, dim=-1) @ F.normalize(self.text_embeddings, dim=-1).T
        return torch.softmax(cos / 0.07, dim=-1)[..., 1]

    def _harmonic(self, scores, scale):
        out = torch.zeros(len(scores), 9)
        for p in range(9):
            cover = [i for i, w in enumerate(self.windows[scale]) if p in w]
            out[:, p] = len(cover) / sum(1 / scores[:, i] for i in cover)
        return out.view(-1, 3, 3)

    @staticmethod
    def _association(e, reference):
        cos = F.normalize(e, dim=-1) @ F.normalize(reference.reshape(-1, e.shape[-1]), dim=-1).T
        return (1 - cos).min(-1).values / 2

    def forward(self, batch):
        image, windows, patches = self.encode_image(batch)
        score = self._class_score(image)
        maps = [score.view(-1, 1, 1).expand(-1, 3, 3)]
        maps += [self._harmonic(self._class_score(w), s) for s, w in enumerate(windows)]
        result = len(maps) / sum(1 / m for m in maps)
        if self.references is not None:
            _, ref_windows, ref_patches = self.references
            few = [self._association(patches, ref_patches).view(-1, 3, 3)]
            few += [self._harmonic(self._association(w, r), s) for s, (w, r) in enumerate(zip(windows, ref_windows))]
            few = torch.stack(few).mean(0)
            result, score = (result + few) / 2, (score + few.amax(dim=(-2, -1))) / 2
        full = torch.nn.functional.interpolate(result[:, None], size=batch.shape[-2:], mode="bilinear")
        return InferenceBatch(pred_score=score, anomaly_map=full[:, 0])
