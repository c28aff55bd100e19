"""How peaked a teacher's class distributions are at each KD temperature: the analysis of "Towards Comparable
Knowledge Distillation in Semantic Image Segmentation" (Shannon entropy of softmax(logits / tau) per pixel),
which found most pixels of a segmentation teacher at tau = 1 given one class with probability close to 1.

:func:`softmax_entropy` is the per-pixel maths; :class:`TeacherEntropy` accumulates it over batches for several
temperatures (mean, share of near-certain pixels, a histogram of the normalised entropy) and
:func:`entropy_table` prints the result. ``tools/teacher_entropy.py`` runs it on a KD config's teacher.
"""
import math

import torch
import torch.nn.functional as F

__all__ = ["softmax_entropy", "TeacherEntropy", "entropy_table"]


def softmax_entropy(logits, tau=1.0):
    """Per-pixel Shannon entropy (nats) and top probability of ``softmax(logits / tau)`` over the class
    dimension: ``logits`` N x C x H x W -> two N x H x W tensors."""
    if tau <= 0:
        raise ValueError(f"temperature tau must be > 0, got {tau}")
    log_p = F.log_softmax(logits.float() / tau, dim=1)
    p = log_p.exp()
    return -(p * log_p).sum(dim=1), p.max(dim=1).values


class TeacherEntropy:
    """Running statistics of the teacher's per-pixel entropy at each temperature in ``taus``.

    ``summary()`` gives, per tau: ``mean_entropy`` (nats), ``mean_normalised`` (entropy / log C, 0 = one
    class certain, 1 = uniform), ``share_confident`` (pixels whose top probability is at least
    ``confident``) and ``histogram`` (shares of pixels in ``bins`` equal bins of the normalised entropy).
    """

    def __init__(self, taus, bins=10, confident=0.99):
        if not taus:
            raise ValueError("TeacherEntropy needs at least one temperature")
        self.taus = [float(t) for t in taus]
        self.bins, self.confident = int(bins), float(confident)
        self.num_classes = None
        self.pixels = 0
        self._sum = {t: 0.0 for t in self.taus}
        self._confident = {t: 0 for t in self.taus}
        self._hist = {t: torch.zeros(self.bins, dtype=torch.float64) for t in self.taus}

    def update(self, logits):
        """Add the pixels of ``logits`` (N x C x H x W class scores)."""
        if logits.dim() != 4:
            raise ValueError(f"expected N x C x H x W class scores, got shape {tuple(logits.shape)}")
        c = int(logits.shape[1])
        if c < 2:
            raise ValueError(f"entropy needs at least 2 classes, the scores have {c}")
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise ValueError(f"class scores changed from {self.num_classes} to {c} classes between batches")
        self.pixels += logits.numel() // c
        for tau in self.taus:
            entropy, top = softmax_entropy(logits, tau)
            normalised = (entropy / math.log(c)).clamp(0.0, 1.0).flatten().double()
            self._sum[tau] += float(entropy.double().sum())
            self._confident[tau] += int((top >= self.confident).sum())
            self._hist[tau] += torch.histc(normalised, bins=self.bins, min=0.0, max=1.0).cpu()

    def summary(self):
        if not self.pixels:
            raise ValueError("TeacherEntropy saw no pixels")
        log_c = math.log(self.num_classes)
        return [
            {
                "tau": tau,
                "mean_entropy": self._sum[tau] / self.pixels,
                "mean_normalised": self._sum[tau] / self.pixels / log_c,
                "share_confident": self._confident[tau] / self.pixels,
                "histogram": (self._hist[tau] / self.pixels).tolist(),
            }
            for tau in self.taus
        ]


def entropy_table(summary, confident=0.99, num_classes=None):
    """Markdown table of :meth:`TeacherEntropy.summary`: one row per temperature."""
    bins = len(summary[0]["histogram"])
    edges = [f"{i / bins:.1f}-{(i + 1) / bins:.1f}" for i in range(bins)]
    head = ["tau", "mean H (nats)", "mean H / log C", f"top p >= {confident}"] + [f"H/logC {e}" for e in edges]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        cells = [f"{row['tau']:g}", f"{row['mean_entropy']:.3f}", f"{row['mean_normalised']:.3f}",
                 f"{100 * row['share_confident']:.1f}%"] + [f"{100 * h:.1f}%" for h in row["histogram"]]
        lines.append("| " + " | ".join(cells) + " |")
    if num_classes:
        lines.append(f"\n{num_classes} classes: log C = {math.log(num_classes):.3f} nats (uniform distribution).")
    return "\n".join(lines)
