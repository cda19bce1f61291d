"""Knowledge distillation: a student learns a teacher's next-token distributions.

At every position with a target, the student's loss mixes the data's cross-entropy with the
Kullback-Leibler divergence from the teacher's distribution (Hinton et al., 2015):

    loss = (1 - w) * CE(student, data) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

T^2 keeps the KL term's gradients on the cross-entropy's scale when T softens both sides. The
teacher runs frozen, in eval mode, under the same autocast as the student. Its main use here is a
draft for speculative decoding: a draft that learned the target's distributions guesses what the
target would say, which is what the target accepts, rather than what the data says.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.config import DistillConfig
from gptkit.errors import GptkitError, quote
from gptkit.loader import load_model
from gptkit.model import GPT
from gptkit.tokenizer import Tokenizer, fingerprint


def load_teacher(
    dc: DistillConfig, tok: Tokenizer, block_size: int, device: torch.device
) -> GPT | None:
    """The frozen teacher the config names, checked against the student's data: the same
    tokenizer, and a context at least as long as the student's sequences."""
    if not dc.teacher:
        return None
    teacher, teacher_tok, _ = load_model(dc.teacher, device, merge_adapters=True)
    if fingerprint(teacher_tok) != fingerprint(tok) or teacher_tok.vocab_size != tok.vocab_size:
        raise GptkitError(
            f"distill.teacher {quote(dc.teacher)} reads text with another tokenizer than this "
            "run's data; a teacher and its student must share one (prepare the data with "
            f"data.tokenizer=run:{dc.teacher})"
        )
    if teacher.config.block_size < block_size:
        raise GptkitError(
            f"distill.teacher {quote(dc.teacher)} has a context of {teacher.config.block_size} "
            f"tokens, shorter than this run's model.block_size ({block_size}); use "
            f"model.block_size={teacher.config.block_size} or less"
        )
    teacher.requires_grad_(False)
    return teacher.eval()


def resolved_teacher(dc: DistillConfig) -> str:
    """The teacher's folder as an absolute path, so that a resume from elsewhere finds it."""
    return str(Path(dc.teacher).resolve()) if dc.teacher else ""


def distill_loss(
    logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    weight: float,
    temperature: float,
    vocab: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, cross-entropy, KL) over the positions with a target (targets != -100), in fp32.
    Only the first `vocab` logits count on either side: rows past the tokenizer's (a padded
    embedding) are never tokens."""
    keep = targets.reshape(-1) != -100
    student = logits.reshape(-1, logits.size(-1))[keep, :vocab].float()
    teacher = teacher_logits.reshape(-1, teacher_logits.size(-1))[keep, :vocab].float()
    ce = F.cross_entropy(student, targets.reshape(-1)[keep])
    log_p = F.log_softmax(teacher / temperature, dim=-1)
    log_q = F.log_softmax(student / temperature, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    return (1 - weight) * ce + weight * temperature**2 * kl, ce, kl
